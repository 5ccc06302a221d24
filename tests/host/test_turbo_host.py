"""T2V-Turbo in a real ComfyUI (set COMFYUI_PATH to a ComfyUI v0.8.0 checkout to run these).

One server with a tiny VideoCrafter2 checkpoint, a tiny VideoCrafter1 one, a tiny v1 LoRA in the official list
format in models/loras/ and a tiny v2 U-Net (with motion guidance) in models/videocrafter/. The bundled
workflow itself runs in test_workflows.py.
"""
from __future__ import annotations

import math

import pytest
from harness import require_comfyui  # tests/host/harness.py (pytest puts tests/host on sys.path)

require_comfyui()

import torch  # noqa: E402
from harness import comfy_server, error_message, prepare_base  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import vc_model  # noqa: E402  (run from the repository root: python -m pytest)
from vc_model.config import tiny_config  # noqa: E402
from vc_model.turbo import random_turbo_lora  # noqa: E402

WIDTH, HEIGHT, FRAMES = 128, 64, 4
LORA, V2 = "tiny_unet_lora.pt", "tiny_unet_mg.pt"
CHECKPOINTS = {"tiny_vc2.safetensors": tiny_config(), "tiny_vc1.safetensors": tiny_config(v1=True)}


def _v2_file(config, seed=5) -> dict:
    """A v2 file's layout: the whole U-Net without prefix plus the three guidance projections."""
    sd = vc_model.random_state_dict(config, seed=seed)
    prefix = "model.diffusion_model."
    weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    g, mc = torch.Generator().manual_seed(seed), config.unet.model_channels
    weights["time_cond_proj.weight"] = torch.randn(mc, 256, generator=g) / 16
    weights["motion_cond_proj.weight"] = torch.randn(mc, 256, generator=g) / 16
    weights["combine_proj.weight"] = torch.randn(mc, 2 * mc, generator=g) / math.sqrt(2 * mc)
    return weights


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = prepare_base(tmp_path_factory.mktemp("comfy_turbo"))
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    torch.save(random_turbo_lora(tiny_config().unet, seed=3), base / "models" / "loras" / LORA)
    torch.save(_v2_file(tiny_config()), base / "models" / "videocrafter" / V2)
    with comfy_server(base, CHECKPOINTS) as srv:
        yield srv


def base_graph(ckpt="tiny_vc2.safetensors", turbo=LORA, fps=16) -> dict:
    """Loader (1), prompt (2), conditioning (4), Apply T2V-Turbo (10)."""
    return {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a corgi running on the beach"}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["2", 0], "width": WIDTH, "height": HEIGHT, "frames": FRAMES,
            "fps": fps, "batch_size": 1, "model": ["1", 0]}},
        "10": {"class_type": "VideoCrafterApplyTurbo", "inputs": {
            "model": ["1", 0], "turbo_name": turbo, "guidance": 7.5, "motion_guidance": 0.05, "motion_percentage": 0.5}},
    }


def turbo_sampler(seed=5, steps=4, model=("10", 0)) -> dict:
    return {"class_type": "VideoCrafterTurboSampler", "inputs": {
        "model": list(model), "positive": ["4", 0], "latent_image": ["4", 2], "seed": seed, "steps": steps}}


def ksampler(model, sampler, scheduler, seed=5, steps=4, cfg=1.0) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2], "denoise": 1.0}}


def save(graph: dict, node: str, source: str, prefix: str) -> dict:
    graph[node] = {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{prefix}"}}
    return graph


def latent(server, outputs, node) -> torch.Tensor:
    return load_file(str(server.output_file(outputs[node]["latents"][0])))["latent_tensor"]


def test_core_samplers_run_the_turbo_model_as_the_turbo_sampler_does(server):
    graph = base_graph()
    graph["5"] = turbo_sampler()
    graph["6"] = ksampler(("10", 0), "lcm", "simple")  # simple at 4 steps: t = 999, 749, 499, 249
    graph["7"] = {"class_type": "VideoCrafterTurboScheduler", "inputs": {"model": ["10", 0], "steps": 4}}
    graph["8"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}}
    graph["9"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["10", 0], "add_noise": True, "noise_seed": 5, "cfg": 1.0, "positive": ["4", 0], "negative": ["4", 1],
        "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["4", 2]}}
    for node, source in (("20", "5"), ("21", "6"), ("22", "9")):
        save(graph, node, source, f"turbo_{node}")
    outputs = server.run_ok(graph)
    official, core, custom = (latent(server, outputs, n) for n in ("20", "21", "22"))
    assert official.shape == (1, 4, FRAMES, HEIGHT // 8, WIDTH // 8) and official.abs().max() > 0.1
    # the same noise; lcm leaves out c_skip / c_out, which are within 5e-8 of 0 and 1
    assert torch.allclose(core, official, atol=1e-4, rtol=1e-4), (core - official).abs().max()
    assert torch.allclose(custom, official, atol=1e-4, rtol=1e-4), (custom - official).abs().max()


def test_turbo_unpatches_cleanly(server):
    """The plain MODEL gives the same latent before and after a Turbo run on the same loaded model."""
    plain = base_graph()
    plain.pop("10")
    before = server.run_ok(save({**plain, "6": ksampler(("1", 0), "ddim", "ddim_uniform", seed=9, steps=3, cfg=3.0)},
                                "20", "6", "plain_before"))
    turbo = server.run_ok(save({**base_graph(), "5": turbo_sampler(seed=9, steps=3)}, "20", "5", "turbo_between"))
    advanced = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 9, "steps": 3, "cfg": 3.0, "sampler_name": "ddim",
        "scheduler": "ddim_uniform", "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    after = server.run_ok(save({**plain, "6": advanced}, "20", "6", "plain_after"))
    a, b = latent(server, before, "20"), latent(server, after, "20")
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert not torch.allclose(a, latent(server, turbo, "20"), atol=1e-2)


def test_v2_weights_with_motion_guidance(server):
    graph = save({**base_graph(turbo=V2, fps=8), "5": turbo_sampler(steps=4)}, "20", "5", "v2")
    with_motion = latent(server, server.run_ok(graph), "20")
    graph["10"]["inputs"]["motion_guidance"] = 0.0
    without = latent(server, server.run_ok(graph), "20")
    assert with_motion.abs().max() > 0.1 and not torch.allclose(with_motion, without, atol=1e-4)


@pytest.mark.parametrize("change,words", [
    ({"ckpt": "tiny_vc1.safetensors"}, "distilled from VideoCrafter2 and works only on it"),
    ({"turbo": "tiny_vc2.safetensors"}, "VideoCrafter checkpoint rather than a T2V-Turbo file"),
    ({"plain_sampler": True}, "has no T2V-Turbo applied"),
])
def test_mistakes_are_refused_with_a_message(server, change, words):
    graph = base_graph(ckpt=change.get("ckpt", "tiny_vc2.safetensors"), turbo=change.get("turbo", LORA))
    graph["5"] = turbo_sampler(model=("1", 0) if change.get("plain_sampler") else ("10", 0), steps=1)
    entry = server.run(save(graph, "20", "5", "bad"))
    assert entry["status"]["status_str"] == "error" and words in error_message(entry), error_message(entry)


def test_long_video_and_turbo_on_one_model(server):
    """Long Video (FreeNoise) on the Turbo MODEL: its windows and rescheduled noise reach the Turbo Sampler;
    a window holding every frame is the Turbo MODEL alone."""
    frames = 8

    def run(window: int | None, prefix: str) -> torch.Tensor:
        graph = base_graph()
        graph["4"]["inputs"]["frames"] = frames
        model = ("10", 0)
        if window is not None:
            graph["11"] = {"class_type": "VideoCrafterLongVideo", "inputs": {
                "model": ["10", 0], "window": window, "stride": 2, "reschedule_noise": True}}
            model = ("11", 0)
        graph["5"] = turbo_sampler(seed=7, steps=2, model=model)
        return latent(server, server.run_ok(save(graph, "20", "5", prefix)), "20")

    alone, covering, windowed = run(None, "turbo_alone"), run(frames, "turbo_covering"), run(4, "turbo_windowed")
    assert windowed.shape == (1, 4, frames, HEIGHT // 8, WIDTH // 8) and windowed.abs().max() > 0.1
    assert torch.allclose(covering, alone, atol=1e-5), (covering - alone).abs().max()
    assert not torch.allclose(windowed, alone, atol=1e-3)
