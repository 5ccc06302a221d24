"""Reliability inside a real ComfyUI (COMFYUI_PATH): bad files and numbers refused at validation, odd inputs,
interrupted decodes, two checkpoints at once, and a long session of queued prompts without memory growth.

One server (tests/host/harness.py) with tiny random checkpoints plus, in models/checkpoints/, files the loader
must refuse: truncated, not a checkpoint, other model families, partial, and a pickle whose payload would
create a marker file. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest

from harness import require_comfyui

require_comfyui()

import torch  # noqa: E402
from harness import comfy_server, error_message, prepare_base, write_checkpoint, write_image  # noqa: E402

from vc_model.config import tiny_config  # noqa: E402

WIDTH, HEIGHT, FRAMES = 128, 64, 4  # tiny models: latent 4 x 8 x 16
T2V, T2V_V1, I2V = "tiny_vc2.safetensors", "tiny_vc1.safetensors", "tiny_i2v.safetensors"
CHECKPOINTS = {T2V: tiny_config(), T2V_V1: tiny_config(v1=True), I2V: tiny_config(i2v=True)}
LONG_PROMPT = ("a corgi running on the beach at sunset, waves crashing, golden light, seagulls in the sky, "
               "sand flying from its paws, a lighthouse in the distance, clouds drifting slowly, cinematic, "
               "highly detailed, shallow depth of field, slow motion, 4k, film grain, warm colours, "
               "gentle breeze moving the grass on the dunes, footprints in the wet sand, reflections") * 2


class Payload:
    """Unpickling this would run `touch <marker>` in the server process."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(folder: Path, marker: Path) -> None:
    good = folder / "whole.safetensors"
    write_checkpoint(good, tiny_config(), seed=7)
    data = good.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) * 3 // 4])
    good.unlink()
    (folder / "notes.ckpt").write_text("not a model\n" * 50)
    z = lambda *shape: torch.zeros(shape)  # noqa: E731
    u = "model.diffusion_model."
    write_checkpoint(folder / "sdxl_base.safetensors", {
        u + "input_blocks.0.0.weight": z(8, 4, 3, 3), u + "label_emb.0.0.weight": z(8, 16),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": z(4, 768)})
    write_checkpoint(folder / "dynamicrafter_512.ckpt", {
        u + "input_blocks.0.0.weight": z(8, 8, 3, 3), u + "framestride_embed.0.weight": z(8, 8),
        "image_proj_model.latents": z(1, 4, 8), "cond_stage_model.model.token_embedding.weight": z(4, 8)})
    full = __import__("vc_model").random_state_dict(tiny_config(), seed=7)
    write_checkpoint(folder / "vae_only.safetensors", {k: v for k, v in full.items() if k.startswith("first_stage_model.")})
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": Payload(marker)},
               str(folder / "evil.ckpt"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = prepare_base(tmp_path_factory.mktemp("comfy_reliability"))
    marker = base / "pwned"
    _bad_files(base / "models" / "checkpoints", marker)
    write_image(base / "input" / "start.png")
    with comfy_server(base, CHECKPOINTS) as srv:
        srv.marker = marker
        yield srv
    assert not marker.exists(), "a pickled payload was executed"


# ---- graphs ------------------------------------------------------------------------------------------------


def text_graph(ckpt: str, prompt: str = "a corgi running on the beach", batch: int = 1, frames: int = FRAMES,
               negative: str = "") -> dict:
    """Loader, both text encodes, VideoCrafter Conditioning (latent = ["4", 2])."""
    return {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": negative}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "width": WIDTH, "height": HEIGHT, "frames": frames,
            "fps": 0, "batch_size": batch, "model": ["1", 0]}},
    }


def with_image(graph: dict, image=("10", 0)) -> dict:
    graph.setdefault("10", {"class_type": "LoadImage", "inputs": {"image": "start.png"}})
    graph["11"] = {"class_type": "VideoCrafterImageEncode", "inputs": {
        "positive": ["2", 0], "negative": ["3", 0], "image_encoder": ["1", 3], "image": list(image)}}
    graph["4"]["inputs"]["positive"], graph["4"]["inputs"]["negative"] = ["11", 0], ["11", 1]
    return graph


def sampler(seed=1, steps=1, cfg=7.5, eta=1.0, model="1", cond="4", latent=("4", 2)) -> dict:
    return {"class_type": "VideoCrafterSampler", "inputs": {
        "model": [model, 0], "positive": [cond, 0], "negative": [cond, 1], "latent_image": list(latent),
        "seed": seed, "steps": steps, "cfg": cfg, "eta": eta}}


def save_latent(graph: dict, prefix: str, source: str = "5", node: str = "20") -> dict:
    graph[node] = {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{prefix}"}}
    return graph


def save_video(graph: dict, prefix: str, chunk: int = 3, source=("5", 0)) -> dict:
    graph["6"] = {"class_type": "VideoCrafterDecode", "inputs": {"samples": list(source), "vae": ["1", 2],
                                                                 "frames_per_chunk": chunk}}
    graph["7"] = {"class_type": "CreateVideo", "inputs": {"images": ["6", 0], "fps": 8.0}}
    graph["8"] = {"class_type": "SaveVideo", "inputs": {"video": ["7", 0], "filename_prefix": f"video/{prefix}",
                                                         "format": "mp4", "codec": "h264"}}
    return graph


def refused(server, graph: dict) -> str:
    status, reply = server.post_prompt(graph)
    assert status == 400, reply
    return json.dumps(reply.get("node_errors") or reply)


def failed(server, graph: dict, timeout: float = 120) -> tuple[str, dict]:
    entry = server.run(graph, timeout=timeout)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:1000]
    return error_message(entry), entry


def wait_running(server, prompt_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, queue = server.request("/queue")
        if any(item[1] == prompt_id for item in queue["queue_running"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not start within {timeout} s:\n{server.log_tail()}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ---- files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,words", [
    ("truncated.safetensors", ["truncated", "download or convert it again"]),
    ("notes.ckpt", ["not a PyTorch checkpoint", "use the model.ckpt or .safetensors file of a VideoCrafter release"]),
    ("sdxl_base.safetensors", ["SDXL", "not a VideoCrafter checkpoint", "the loader needs"]),
    ("dynamicrafter_512.ckpt", ["DynamiCrafter or ToonCrafter", "use a DynamiCrafter node pack"]),
    ("vae_only.safetensors", ["partial checkpoint (it holds VAE but no U-Net or text encoder)"]),
    ("evil.ckpt", ["Refused", "arbitrary code", "nothing in it was executed"]),
])
def test_loader_refuses_unusable_files_at_validation(server, name, words):
    graph = save_latent({**text_graph(T2V), "5": sampler()}, "bad_file")
    graph["1"]["inputs"]["ckpt_name"] = name
    messages = refused(server, graph)
    for word in words:
        assert word in messages, messages
    assert not server.marker.exists()


# ---- numbers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node,change,words", [
    ("5", {"steps": 0}, "Value 0 smaller than min of 1"),  # plain ranges: ComfyUI's own check, on that input
    ("5", {"cfg": 150.0}, "Value 150.0 bigger than max of 100.0"),
    ("5", {"eta": 2.0}, "eta must be from 0"),
    ("4", {"frames": 0}, "Value 0 smaller than min of 1"),
    ("4", {"frames": 100000}, "Value 100000 bigger than max of 256"),
    ("4", {"fps": 500}, "Value 500 bigger than max of 120"),
    ("30", {"eta": -1.0}, "eta must be from 0"),
])
def test_numbers_out_of_range_are_refused_at_validation(server, node, change, words):
    if node == "30":  # the SAMPLER node alone, shown by Preview Any
        graph = {"30": {"class_type": "VideoCrafterDDIMSampler", "inputs": {"eta": 0.5}},
                 "31": {"class_type": "PreviewAny", "inputs": {"source": ["30", 0]}}}
    else:
        graph = save_latent({**text_graph(T2V), "5": sampler()}, "bad_number")
    graph[node]["inputs"].update(change)
    assert words in refused(server, graph)


# ---- inputs that work ----------------------------------------------------------------------------------------


def test_long_and_empty_prompts_work_for_t2v_and_i2v(server):
    """CLIP Text Encode makes 154+ tokens of a long prompt; the I2V image tokens stay a separate input."""
    t2v = save_latent({**text_graph(T2V, prompt=LONG_PROMPT, negative=LONG_PROMPT[:200]), "5": sampler()}, "long_t2v")
    server.run_ok(t2v)
    i2v = save_latent({**with_image(text_graph(I2V, prompt=LONG_PROMPT)), "5": sampler()}, "long_i2v")
    server.run_ok(i2v)
    empty = save_latent({**with_image(text_graph(I2V, prompt="")), "5": sampler()}, "empty_i2v")
    server.run_ok(empty)


def test_rgba_greyscale_and_odd_sized_start_images_work(server):
    graph = with_image(text_graph(I2V, batch=2), image=("13", 0))
    graph["12"] = {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "bilinear",
                                                          "width": 37, "height": 23, "crop": "disabled"}}
    graph["13"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["12", 0], "alpha": ["10", 1]}}
    server.run_ok(save_latent({**graph, "5": sampler()}, "rgba"))
    graph = with_image(text_graph(I2V), image=("15", 0))
    graph["14"] = {"class_type": "ImageToMask", "inputs": {"image": ["10", 0], "channel": "green"}}
    graph["15"] = {"class_type": "MaskToImage", "inputs": {"mask": ["14", 0]}}
    server.run_ok(save_latent({**graph, "5": sampler()}, "grey"))


def test_image_batch_must_match_the_videos(server):
    graph = with_image(text_graph(I2V, batch=2), image=("12", 0))
    graph["12"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 2}}
    server.run_ok(save_latent({**graph, "5": sampler()}, "two_images_two_videos"))
    graph = with_image(text_graph(I2V, batch=3), image=("12", 0))
    graph["12"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 2}}
    message, entry = failed(server, save_latent({**graph, "5": sampler()}, "mismatch"))
    assert "2 images but 3 videos" in message and "VideoCrafterConditioning" in message, message


@pytest.mark.parametrize("latent_node,words", [
    ({"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}, "image latent"),
    ({"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": WIDTH, "height": HEIGHT, "length": 5,
                                                           "batch_size": 1}}, "16 channels"),
])
@pytest.mark.parametrize("consumer", ["sampler", "decode"])
def test_latents_of_other_models_are_refused_before_heavy_work(server, latent_node, words, consumer):
    graph = text_graph(T2V)
    graph["40"] = latent_node
    if consumer == "sampler":
        graph["5"] = sampler(latent=("40", 0))
        graph = save_latent(graph, "foreign")
    else:
        graph["6"] = {"class_type": "VideoCrafterDecode", "inputs": {"samples": ["40", 0], "vae": ["1", 2],
                                                                     "frames_per_chunk": 1}}
        graph["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    started = time.monotonic()
    message, _ = failed(server, graph)
    assert words in message, message
    assert time.monotonic() - started < 60


# ---- running ------------------------------------------------------------------------------------------------


def test_interrupt_during_decode_leaves_no_output_and_the_next_prompt_runs(server):
    server.run_ok(save_video({**text_graph(T2V), "5": sampler()}, "before_decode_interrupt"))  # caches loader/CLIP
    # 8 videos x 256 frames, decoded one frame per chunk: far longer than the wait below.
    graph = save_video(text_graph(T2V, batch=8, frames=256), "decode_interrupted", chunk=1, source=("4", 2))
    status, reply = server.post_prompt(graph)
    assert status == 200, reply
    wait_running(server, reply["prompt_id"])
    time.sleep(2.5)
    started = time.monotonic()
    assert server.interrupt() == 200
    entry = server.wait(reply["prompt_id"], timeout=60)
    assert time.monotonic() - started < 30
    kinds = {kind: data for kind, data in entry["status"]["messages"]}
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, entry["status"]
    assert kinds["execution_interrupted"]["node_type"] == "VideoCrafterDecode", kinds["execution_interrupted"]
    video_dir = server.output_dir / "video"
    assert not list(video_dir.glob("decode_interrupted*")), sorted(p.name for p in video_dir.iterdir())
    outputs = server.run_ok(save_video({**text_graph(T2V), "5": sampler(seed=2)}, "after_decode_interrupt"))
    assert server.output_file(outputs["8"]["images"][0]).stat().st_size > 0


def test_two_checkpoints_in_one_graph(server):
    """A T2V and an I2V loader side by side, each feeding its own sampler, in one prompt."""
    graph = save_latent({**text_graph(T2V), "5": sampler()}, "pair_t2v")
    graph.update({
        "51": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": I2V, "weight_dtype": "auto"}},
        "52": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["51", 1], "text": "a boat"}},
        "53": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["51", 1], "text": ""}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
        "54": {"class_type": "VideoCrafterImageEncode", "inputs": {
            "positive": ["52", 0], "negative": ["53", 0], "image_encoder": ["51", 3], "image": ["10", 0]}},
        "55": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["54", 0], "negative": ["54", 1], "width": WIDTH, "height": HEIGHT, "frames": FRAMES,
            "fps": 0, "batch_size": 1, "model": ["51", 0]}},
        "56": sampler(model="51", cond="55", latent=("55", 2)),
    })
    outputs = server.run_ok(save_latent(graph, "pair_i2v", source="56", node="57"))
    assert {"20", "57"} <= set(outputs)


def interrupt_when_running(server, watcher, prompt_id: str, graph: dict, node_type: str) -> None:
    """Wait until the prompt has started its `node_type` node (websocket events), let it work a moment,
    interrupt it; it must stop in that node."""
    node_id = next(i for i, node in graph.items() if node["class_type"] == node_type)
    watcher.wait_node(prompt_id, node_id)
    time.sleep(1.0)
    assert server.interrupt(prompt_id) == 200
    entry = server.wait(prompt_id, timeout=60)
    kinds = {kind: data for kind, data in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds, entry["status"]
    assert kinds["execution_interrupted"]["node_type"] == node_type, kinds["execution_interrupted"]


def session_graph(i: int) -> dict:
    """Prompt i of the long session: T2V (two checkpoints by turns) and I2V alternate, seeds and prompts vary."""
    ckpt = I2V if i % 2 else (T2V, T2V_V1)[i // 2 % 2]
    graph = text_graph(ckpt, prompt=f"prompt number {i}: a cat on a boat")
    if ckpt == I2V:
        graph = with_image(graph)
    return save_video({**graph, "5": sampler(seed=100 + i, steps=2)}, f"session_{i:02d}")


def test_long_session_of_queued_prompts_keeps_memory_flat(server):
    """24 prompts queued at once through the API, alternating T2V and I2V checkpoints (so the loader node
    reloads every time), new seeds and prompts (so every node runs), decoded and saved as mp4; between the
    middle and the last third, one prompt is interrupted while sampling and one while decoding. All must
    finish (the interrupted ones with nothing saved), and the server's resident memory in the last third
    must not exceed the middle third's (small margin): no leak per prompt, per reload or per interrupt."""
    count = 24
    third = count // 3
    interrupted = {  # queued right before prompt 2 * third
        "sampling": (save_video({**text_graph(T2V), "5": sampler(seed=7, steps=1000)}, "session_int_sampling"),
                     "VideoCrafterSampler"),
        "decoding": (save_video(text_graph(T2V, batch=8, frames=256), "session_int_decoding", chunk=1,
                                source=("4", 2)), "VideoCrafterDecode"),
    }
    watcher = server.watch()  # before queueing: no "executing" event may be missed
    queued = []  # (prompt id, graph, node type to interrupt in or None)
    for i in range(count):
        if i == 2 * third:
            for graph, node_type in interrupted.values():
                status, reply = server.post_prompt(graph)
                assert status == 200 and not reply.get("node_errors"), reply
                queued.append((reply["prompt_id"], graph, node_type))
        status, reply = server.post_prompt(session_graph(i))
        assert status == 200 and not reply.get("node_errors"), reply
        queued.append((reply["prompt_id"], None, None))
    rss = []
    deadline = time.monotonic() + 360
    for prompt_id, graph, node_type in queued:
        if node_type is not None:
            interrupt_when_running(server, watcher, prompt_id, graph, node_type)
            continue
        entry = server.wait(prompt_id, timeout=max(5.0, deadline - time.monotonic()))
        assert entry["status"]["status_str"] == "success", f"{error_message(entry)}\n{server.log_tail()}"
        rss.append(rss_mib(server.process.pid))
    middle, last = statistics.median(rss[third:2 * third]), statistics.median(rss[2 * third:])
    print("RSS MiB per prompt:", " ".join(f"{v:.0f}" for v in rss))
    print(f"median middle third {middle:.0f} MiB, last third {last:.0f} MiB")
    assert last <= middle * 1.03 + 24, f"resident memory keeps growing: {' '.join(f'{v:.0f}' for v in rss)}"
    watcher.close()
    saved = sorted(p.name for p in (server.output_dir / "video").glob("session_*"))
    assert len(saved) == count and not any("_int_" in name for name in saved), saved
