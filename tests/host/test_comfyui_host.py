"""The pack inside a real ComfyUI server (set COMFYUI_PATH to a ComfyUI v0.8.0 checkout to run these).

One server is started on 127.0.0.1 (a free port, `--cpu`) with a temporary `--base-directory` holding
the pack (a symlink to this repository), tiny random checkpoints in the official key layout, and an
input image. API-format graphs are queued with POST /prompt and their /history results checked.
`COMFYUI_PYTHON` names the interpreter with ComfyUI's requirements (default: the one running pytest).
Every wait is bounded. The server itself comes from `harness.py`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import require_comfyui  # tests/host/harness.py (pytest puts tests/host on sys.path)

require_comfyui()

import torch  # noqa: E402
from harness import Server, comfy_server, error_message, mp4_info, prepare_base, write_image  # noqa: E402,F401
from safetensors.torch import load_file, save_file  # noqa: E402

NODE_IDS = ["VideoCrafterCheckpointLoader", "VideoCrafterUNetLoader", "VideoCrafterImageEncode",
            "VideoCrafterConditioning", "VideoCrafterSampler", "VideoCrafterDDIMSampler", "VideoCrafterDecode",
            "VideoCrafterEncode", "VideoCrafterLoraLoader"]
WIDTH, HEIGHT, FRAMES = 128, 64, 4  # tiny models: latent 4 x 8 x 16
PROMPT = "a corgi running on the beach"

import vc_model  # noqa: E402  (run from the repository root: python -m pytest)
from vc_model.config import tiny_config  # noqa: E402

CONFIGS = {"tiny_vc2.safetensors": tiny_config(), "tiny_vc1.safetensors": tiny_config(v1=True),
           "tiny_i2v.safetensors": tiny_config(i2v=True)}


# ---- server ------------------------------------------------------------------------------------------


def _write_inputs(base: Path) -> None:
    """A partial and a foreign checkpoint in models/checkpoints/ and input/start.png (tiny models: harness)."""
    prepare_base(base)
    full = vc_model.random_state_dict(CONFIGS["tiny_vc2.safetensors"], seed=7)
    unet_only = {k: v.contiguous() for k, v in full.items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(base / "models" / "checkpoints" / "unet_only.safetensors"))
    foreign = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 768)}
    save_file(foreign, str(base / "models" / "checkpoints" / "sd15_like.safetensors"))
    write_image(base / "input" / "start.png", width=120, height=72)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    _write_inputs(base)
    with comfy_server(base, CONFIGS) as srv:
        yield srv


# ---- graphs --------------------------------------------------------------------------------------------


def text_graph(ckpt: str, prompt: str = PROMPT, batch: int = 1, fps: int = 0) -> dict:
    """Loader, both text encodes and VideoCrafter Conditioning (node ids 1..4; latent = ["4", 2])."""
    return {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "width": WIDTH, "height": HEIGHT, "frames": FRAMES,
            "fps": fps, "batch_size": batch, "model": ["1", 0]}},
    }


def with_image(graph: dict) -> dict:
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    graph["11"] = {"class_type": "VideoCrafterImageEncode", "inputs": {
        "positive": ["2", 0], "negative": ["3", 0], "image_encoder": ["1", 3], "image": ["10", 0]}}
    graph["4"]["inputs"]["positive"], graph["4"]["inputs"]["negative"] = ["11", 0], ["11", 1]
    return graph


def sampler_node(seed=42, steps=3, cfg=7.5, eta=1.0) -> dict:
    return {"class_type": "VideoCrafterSampler", "inputs": {
        "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2],
        "seed": seed, "steps": steps, "cfg": cfg, "eta": eta}}


def ksampler_node(sampler: str, scheduler: str, seed=42, steps=4, cfg=7.5) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2], "seed": seed,
        "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}


def save_latent(graph: dict, prefix: str) -> dict:
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}}
    return graph


def save_video(graph: dict, prefix: str) -> dict:
    graph["6"] = {"class_type": "VideoCrafterDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2], "frames_per_chunk": 3}}
    graph["7"] = {"class_type": "CreateVideo", "inputs": {"images": ["6", 0], "fps": 8.0}}
    graph["8"] = {"class_type": "SaveVideo", "inputs": {"video": ["7", 0], "filename_prefix": f"video/{prefix}",
                                                         "format": "mp4", "codec": "h264"}}
    return graph


def read_latent(server: Server, outputs: dict) -> torch.Tensor:
    return load_file(str(server.output_file(outputs["20"]["latents"][0])))["latent_tensor"]


# ---- references computed with vc_model -----------------------------------------------------------------


def reference(name: str, seed: int, steps: int, eta: float, cfg: float = 7.5, image: Path | None = None):
    """(official final x, last pred_x0) of vc_model.sample_ddim for what the graphs feed ComfyUI, scaled space."""
    config = CONFIGS[name]
    bundle = vc_model.build(vc_model.random_state_dict(config, seed=7), config)
    noise = torch.randn((1, 4, FRAMES, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(seed))
    extra = {}
    if image is not None:
        from PIL import Image

        pixels = torch.from_numpy(__import__("numpy").array(Image.open(image).convert("RGB"))).float() / 255.0
        x = pixels.permute(2, 0, 1)[None] * 2 - 1
        extra = dict(image_context=bundle.image_encoder(x), uncond_image_context=bundle.image_encoder.unconditional(1))
    last = {}
    with torch.no_grad():
        final = vc_model.sample_ddim(bundle.unet, bundle.schedule, noise, bundle.text_encoder([PROMPT]),
                                     bundle.text_encoder([""]), fps=config.fps, steps=steps, cfg=cfg, eta=eta,
                                     generator=torch.Generator().manual_seed(seed),
                                     callback=lambda i, n, x, x0: last.update(x0=x0), **extra)
    return final, last["x0"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 5e-5):
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    print(f"max |diff| {diff:.3g} (max |ref| {scale:.3g}, relative {diff / scale:.3g})")
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x max |ref| {scale:.3g}"


# ---- tests -----------------------------------------------------------------------------------------------


def test_every_node_is_registered_with_tooltips(server):
    status, info = server.request("/object_info")
    assert status == 200
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{server.log_tail()}"
    for node in NODE_IDS:
        entry = info[node]
        assert entry["category"] == "VideoCrafter" and "comfyui-videocrafter" in entry["python_module"]
        for section in ("required", "optional"):
            for name, spec in entry["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    names = info["VideoCrafterCheckpointLoader"]["input"]["required"]["ckpt_name"][1]["options"]
    assert {"tiny_vc2.safetensors", "tiny_i2v.safetensors", "unet_only.safetensors"} <= set(names)


def test_t2v_graph_saves_an_mp4(server):
    outputs = server.run_ok(save_video({**text_graph("tiny_vc2.safetensors", batch=2), "5": sampler_node()}, "t2v"))
    frames, width, height = mp4_info(server.output_file(outputs["8"]["images"][0]))
    assert (frames, width, height) == (2 * FRAMES, WIDTH, HEIGHT)


def test_i2v_graph_saves_an_mp4(server):
    graph = save_video({**with_image(text_graph("tiny_i2v.safetensors")), "5": sampler_node(steps=2)}, "i2v")
    frames, width, height = mp4_info(server.output_file(server.run_ok(graph)["8"]["images"][0]))
    assert (frames, width, height) == (FRAMES, WIDTH, HEIGHT)


@pytest.mark.parametrize("name,sampler", [("tiny_vc2.safetensors", "ddim"), ("tiny_vc1.safetensors", "euler")])
def test_core_ksampler_ddim_uniform_matches_official_ddim_eta0(server, name, sampler):
    graph = save_latent({**text_graph(name), "5": ksampler_node(sampler, "ddim_uniform", seed=42, steps=4)},
                        f"ks_{sampler}")
    latent = read_latent(server, server.run_ok(graph))
    _, x0 = reference(name, seed=42, steps=4, eta=0.0)
    assert_close(latent * 0.18215, x0)


@pytest.mark.parametrize("name", ["tiny_vc2.safetensors", "tiny_i2v.safetensors"])
def test_videocrafter_sampler_reproduces_official_ddim_eta1(server, name):
    graph = text_graph(name)
    if "i2v" in name:
        graph = with_image(graph)
    latent = read_latent(server, server.run_ok(save_latent({**graph, "5": sampler_node(seed=9, steps=3)}, "vc")))
    final, _ = reference(name, seed=9, steps=3, eta=1.0,
                         image=server.base / "input" / "start.png" if "i2v" in name else None)
    assert_close(latent * 0.18215, final)


def test_other_core_samplers_and_samplercustom_run(server):
    graph = save_latent({**text_graph("tiny_vc2.safetensors"), "5": ksampler_node("dpmpp_2m", "karras", steps=3)}, "dpm")
    assert torch.isfinite(read_latent(server, server.run_ok(graph))).all()
    graph = text_graph("tiny_vc2.safetensors")
    graph["30"] = {"class_type": "VideoCrafterDDIMSampler", "inputs": {"eta": 0.5}}
    graph["31"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}}
    graph["5"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 3, "cfg": 5.0, "positive": ["4", 0], "negative": ["4", 1],
        "sampler": ["30", 0], "sigmas": ["31", 0], "latent_image": ["4", 2]}}
    latent = read_latent(server, server.run_ok(save_latent(graph, "custom")))
    assert latent.shape == (1, 4, FRAMES, HEIGHT // 8, WIDTH // 8) and torch.isfinite(latent).all()


def test_encode_decode_round_trip_shapes(server):
    graph = {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": "tiny_vc2.safetensors", "weight_dtype": "fp32"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
        "11": {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "bilinear", "width": WIDTH,
                                                      "height": HEIGHT, "crop": "disabled"}},
        "12": {"class_type": "RepeatImageBatch", "inputs": {"image": ["11", 0], "amount": 6}},
        "5": {"class_type": "VideoCrafterEncode", "inputs": {"pixels": ["12", 0], "vae": ["1", 2], "frames": 3,
                                                             "frames_per_chunk": 4}},
    }
    latent = read_latent(server, server.run_ok(save_latent(graph, "enc")))
    assert latent.shape == (2, 4, 3, HEIGHT // 8, WIDTH // 8)


@pytest.mark.parametrize("change,words", [
    (lambda g: g["1"]["inputs"].update(ckpt_name="unet_only.safetensors"), "partial checkpoint"),
    (lambda g: g["1"]["inputs"].update(ckpt_name="sd15_like.safetensors"), "not a VideoCrafter checkpoint"),
    (lambda g: g["4"]["inputs"].update(width=500), "multiple of 64"),
])
def test_bad_inputs_are_refused_at_validation(server, change, words):
    graph = save_latent({**text_graph("tiny_vc2.safetensors"), "5": sampler_node(steps=1)}, "bad")
    change(graph)
    status, reply = server.queue(graph)
    assert status == 400, reply
    messages = json.dumps(reply["node_errors"])
    assert words in messages, messages


@pytest.mark.parametrize("name,image,words", [
    ("tiny_vc2.safetensors", True, "No image encoder: the checkpoint is text-to-video"),
    ("tiny_i2v.safetensors", False, "lacks image tokens"),
])
def test_wrong_model_family_conditioning_fails_clearly(server, name, image, words):
    graph = text_graph(name)
    if image:
        graph = with_image(graph)
    entry = server.run(save_latent({**graph, "5": sampler_node(steps=1)}, "family"))
    assert entry["status"]["status_str"] == "error" and words in error_message(entry), error_message(entry)


def test_core_ksampler_refuses_i2v_conditioning_on_t2v_model(server):
    graph = with_image(text_graph("tiny_i2v.safetensors"))
    graph["40"] = {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": "tiny_vc2.safetensors", "weight_dtype": "auto"}}
    graph["4"]["inputs"]["model"] = ["40", 0]
    entry = server.run(save_latent({**graph, "5": ksampler_node("euler", "normal", steps=1)}, "family2"))
    assert entry["status"]["status_str"] == "error"
    assert "text-to-video" in error_message(entry), error_message(entry)


@pytest.mark.parametrize("node", ["KSampler", "VideoCrafterSampler"])
def test_interrupt_stops_sampling_and_next_prompt_runs(server, node):
    def graph(steps):
        sampler = ksampler_node("euler", "normal", steps=steps) if node == "KSampler" else sampler_node(steps=steps)
        return save_latent({**text_graph("tiny_vc2.safetensors"), "5": sampler}, "interrupt")

    server.run_ok(graph(1))  # loader and text encodes are cached for the long prompt below
    long = graph(1000)
    status, reply = server.queue(long)
    assert status == 200, reply
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it runs, then give it a moment inside the sampler
        _, queue = server.request("/queue")
        if any(item[1] == reply["prompt_id"] for item in queue["queue_running"]):
            break
        time.sleep(0.2)
    time.sleep(2.0)
    started = time.monotonic()
    assert server.request("/interrupt", {})[0] == 200
    entry = server.wait(reply["prompt_id"], timeout=60)
    assert time.monotonic() - started < 30
    kinds = {kind: data for kind, data in entry["status"]["messages"]}
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds
    assert kinds["execution_interrupted"]["node_type"] == node
    server.run_ok(save_latent({**text_graph("tiny_vc2.safetensors"), "5": sampler_node(seed=1, steps=2)}, "after"))


def test_core_ksampler_refuses_a_latent_the_unet_cannot_take(server):
    graph = text_graph("tiny_vc2.safetensors")
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    graph["11"] = {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "bilinear", "width": 136,
                                                          "height": HEIGHT, "crop": "disabled"}}
    graph["12"] = {"class_type": "VideoCrafterEncode", "inputs": {"pixels": ["11", 0], "vae": ["1", 2], "frames": 0,
                                                                  "frames_per_chunk": 4}}
    graph["5"] = ksampler_node("euler", "normal", steps=1)
    graph["5"]["inputs"]["latent_image"] = ["12", 0]
    entry = server.run(save_latent(graph, "size"))
    assert entry["status"]["status_str"] == "error"
    assert "needs width and height that are multiples of 32" in error_message(entry), error_message(entry)
