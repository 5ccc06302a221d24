"""Long videos inside a real ComfyUI (set COMFYUI_PATH to a ComfyUI v0.8.0 checkout to run these).

The bundled long-video workflow (shrunk to a tiny model), VideoCrafter Long Video under the core KSampler
and SamplerCustomAdvanced, Prompt Travel, and the core Context Windows (Manual) node on the VideoCrafter
MODEL, each checked against vc_model computing the same thing (FreeNoise windows, rescheduled noise,
per-frame tokens sliced per context window).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from harness import require_comfyui  # tests/host/harness.py (pytest puts tests/host on sys.path)

require_comfyui()

import torch  # noqa: E402
from harness import comfy_server, mp4_info  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import vc_model  # noqa: E402  (run from the repository root: python -m pytest)
from vc_model.config import tiny_config  # noqa: E402
from vc_model.freenoise import travel_embeddings  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "vc_workflow_files", Path(__file__).resolve().parents[1] / "test_workflow_files.py")
wf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wf)

CKPT = "tiny_vc2.safetensors"
CONFIG = tiny_config()
WIDTH, HEIGHT, FRAMES = 128, 64, 10  # latent 10 frames of 8 x 16 (the tiny context dim, 64, is no frame count here)
WINDOW, STRIDE = 4, 3  # windows 0, 3, 6 (tiny clips need a tiny window to have several)
PROMPTS = ["a corgi running on the beach", "a corgi sleeping on the sofa"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_long")
    with comfy_server(base, {CKPT: CONFIG}) as srv:
        yield srv


@pytest.fixture(scope="module")
def bundle():
    return vc_model.build(vc_model.random_state_dict(CONFIG, seed=7), CONFIG)  # the harness's weights


# ---- graphs --------------------------------------------------------------------------------------------


def base_graph(positive: dict | None = None) -> dict:
    """Loader (1), prompt (2), empty negative (3), VideoCrafter Conditioning (4)."""
    return {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": CKPT, "weight_dtype": "auto"}},
        "2": positive or {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPTS[0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "width": WIDTH, "height": HEIGHT, "frames": FRAMES,
            "fps": 0, "batch_size": 1, "model": ["1", 0]}},
    }


def travel_node() -> dict:
    return {"class_type": "VideoCrafterPromptTravel", "inputs": {"clip": ["1", 1], "text": "\n".join(PROMPTS)}}


def long_video(model=("1", 0), reschedule=True) -> dict:
    return {"class_type": "VideoCrafterLongVideo", "inputs": {
        "model": list(model), "window": WINDOW, "stride": STRIDE, "reschedule_noise": reschedule}}


def ksampler(model, seed=5, steps=4) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": list(model), "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2], "seed": seed,
        "steps": steps, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}}


def run_latent(server, graph: dict, node: str, prefix: str, slot: int = 0) -> torch.Tensor:
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, slot], "filename_prefix": f"latents/{prefix}"}}
    outputs = server.run_ok(graph)
    return load_file(str(server.output_file(outputs["20"]["latents"][0])))["latent_tensor"] * 0.18215


# ---- references ------------------------------------------------------------------------------------------


def start_noise(seed: int, reschedule: bool) -> torch.Tensor:
    """ComfyUI's noise for `seed` (prepare_noise), rescheduled as Long Video's wrapper does."""
    noise = torch.randn((1, 4, FRAMES, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(seed))
    if reschedule:
        noise = vc_model.reschedule_noise(noise, WINDOW, STRIDE, generator=torch.Generator().manual_seed(seed))
    return noise


def reference_x0(bundle, model, noise, steps=4, **kwargs) -> torch.Tensor:
    """The last pred_x0 of official DDIM at eta 0 (what KSampler ddim + ddim_uniform returns)."""
    last = {}
    with torch.no_grad():
        vc_model.sample_ddim(model, bundle.schedule, noise, kwargs.pop("context", bundle.text_encoder([PROMPTS[0]])),
                             bundle.text_encoder([""]), fps=CONFIG.fps, steps=steps, cfg=7.5, eta=0.0,
                             callback=lambda i, n, x, x0: last.update(x0=x0), **kwargs)
    return last["x0"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4):
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    print(f"max |diff| {diff:.3g} (max |ref| {scale:.3g}, relative {diff / scale:.3g})")
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x max |ref| {scale:.3g}"


def static_pyramid_model(unet, length: int, overlap: int):
    """The U-Net run the way the core context-window handler runs it with `standard_static` windows and
    `pyramid` fusion on the frame axis: per-frame tokens cut per window, predictions fused per frame."""
    def windows(frames):
        out, start = [], 0
        while True:
            if start + length >= frames:
                return out + [list(range(frames - length, frames))]
            out.append(list(range(start, start + length)))
            start += length - overlap

    def model(x, t, context, fps=None, image_context=None, down_context=None):
        frames = x.shape[2]
        total = torch.zeros_like(x)
        count = torch.zeros(frames, 1, 1)
        weight = torch.tensor([min(j + 1, length - j) for j in range(length)], dtype=x.dtype)[:, None, None]
        for index in windows(frames):
            part = context[:, index] if context.ndim == 4 else context
            eps = unet(x[:, :, index], t, part, fps=fps, image_context=image_context, down_context=down_context)
            total[:, :, index] += eps * weight
            count[index] += weight
        return total / count
    return model


# ---- tests -----------------------------------------------------------------------------------------------


def test_long_workflow_shrunk_saves_an_mp4_with_every_frame(server):
    api = wf.load(wf.api_path("videocrafter2_t2v_512_long"))
    (long_id,) = [k for k, node in api.items() if node["class_type"] == "VideoCrafterLongVideo"]
    api["1"]["inputs"]["ckpt_name"] = CKPT
    api["4"]["inputs"].update(width=WIDTH, height=HEIGHT, frames=FRAMES)
    api["5"]["inputs"]["steps"] = 2
    api[long_id]["inputs"].update(window=WINDOW, stride=STRIDE)
    outputs = server.run_ok(api)
    frames, width, height = mp4_info(server.output_file(outputs["8"]["images"][0]))
    assert (frames, width, height) == (FRAMES, WIDTH, HEIGHT)


def test_ksampler_with_long_video_is_freenoise(server, bundle):
    graph = {**base_graph(), "11": long_video(), "5": ksampler(("11", 0))}
    latent = run_latent(server, graph, "5", "long_ks")
    model = lambda *a, **k: bundle.unet(*a, temporal_window=WINDOW, temporal_stride=STRIDE, **k)  # noqa: E731
    assert_close(latent, reference_x0(bundle, model, start_noise(5, reschedule=True)))
    plain = run_latent(server, {**base_graph(), "5": ksampler(("1", 0))}, "5", "plain_ks")
    assert (plain - latent).abs().max() > 1e-2 * latent.abs().max()


def test_freenoise_noise_node_equals_long_videos_own_rescheduling(server):
    graph = {**base_graph(), "11": long_video(reschedule=False),
             "30": {"class_type": "VideoCrafterFreeNoiseNoise", "inputs": {"noise_seed": 5, "window": WINDOW, "stride": STRIDE}},
             "31": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}},
             "32": {"class_type": "BasicScheduler", "inputs": {"model": ["11", 0], "scheduler": "ddim_uniform", "steps": 4, "denoise": 1.0}},
             "33": {"class_type": "CFGGuider", "inputs": {"model": ["11", 0], "positive": ["4", 0], "negative": ["4", 1], "cfg": 7.5}},
             "5": {"class_type": "SamplerCustomAdvanced", "inputs": {
                 "noise": ["30", 0], "guider": ["33", 0], "sampler": ["31", 0], "sigmas": ["32", 0], "latent_image": ["4", 2]}}}
    advanced = run_latent(server, graph, "5", "long_adv")
    ksampled = run_latent(server, {**base_graph(), "11": long_video(), "5": ksampler(("11", 0))}, "5", "long_ks2")
    assert_close(advanced, ksampled, rel=1e-5)


def test_prompt_travel_under_ksampler(server, bundle):
    latent = run_latent(server, {**base_graph(travel_node()), "5": ksampler(("1", 0))}, "5", "travel")
    travel = travel_embeddings(bundle.text_encoder(PROMPTS), FRAMES)[None]
    expected = reference_x0(bundle, bundle.unet, start_noise(5, reschedule=False), context=bundle.text_encoder(PROMPTS[-1:]),
                            travel_context=travel)
    assert_close(latent, expected)


def test_core_context_windows_slice_the_per_frame_tokens(server, bundle):
    graph = {**base_graph(travel_node()),
             "12": {"class_type": "ContextWindowsManual", "inputs": {
                 "model": ["1", 0], "context_length": 4, "context_overlap": 1, "context_schedule": "standard_static",
                 "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 2, "freenoise": False}},
             "5": ksampler(("12", 0))}
    latent = run_latent(server, graph, "5", "context_windows")
    travel = travel_embeddings(bundle.text_encoder(PROMPTS), FRAMES)[None]
    expected = reference_x0(bundle, static_pyramid_model(bundle.unet, 4, 1), start_noise(5, reschedule=False),
                            context=bundle.text_encoder(PROMPTS[-1:]), travel_context=travel)
    assert_close(latent, expected)

