"""Core ComfyUI nodes on the VideoCrafter MODEL and VAE, in a real server (needs COMFYUI_PATH).

Patch nodes (PAG, FreeU, FreeU_V2, HyperTile, attention multiply) change the video; Self-Attention
Guidance and ModelSamplingDiscrete are refused with a message; core VAE Decode / Decode (Tiled)
give every frame and VAE Encode gives a video latent the sampler takes; CheckpointSave writes a
file Load VideoCrafter Checkpoint reads back to the same video; the core LoraLoader (kohya keys)
and Load VideoCrafter LoRA (PEFT keys) change the video; fp8 weights make a video.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from harness import require_comfyui

require_comfyui()

import torch  # noqa: E402
from harness import comfy_server, error_message, mp4_info, prepare_base, write_image  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import vc_model  # noqa: E402
from vc_model.config import tiny_config  # noqa: E402

CONFIGS = {"tiny_vc2.safetensors": tiny_config(), "tiny_i2v.safetensors": tiny_config(i2v=True)}
WIDTH, HEIGHT, FRAMES = 128, 64, 6  # more than 4 frames: SAG would otherwise skip itself
VC2 = "tiny_vc2.safetensors"


def lora_files(base) -> None:
    """A kohya LoRA and a PEFT LoRA (VADER layout) on the attention projections of the tiny VC2 U-Net."""
    weights = vc_model.random_state_dict(CONFIGS[VC2], seed=7)
    g = torch.Generator().manual_seed(3)
    kohya, peft = {}, {}
    for key, value in weights.items():
        if key.startswith("model.diffusion_model.") and key.endswith(("to_q.weight", "to_v.weight")):
            path = key[len("model.diffusion_model."):-len(".weight")]
            down, up = torch.randn(2, value.shape[1], generator=g) * 0.5, torch.randn(value.shape[0], 2, generator=g) * 0.5
            kohya[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"] = down
            kohya[f"lora_unet_{path.replace('.', '_')}.lora_up.weight"] = up
            kohya[f"lora_unet_{path.replace('.', '_')}.alpha"] = torch.tensor(2.0)
            peft[f"base_model.model.model.diffusion_model.{path}.lora_A.weight"] = down
            peft[f"base_model.model.model.diffusion_model.{path}.lora_B.weight"] = up
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(base / "models" / "loras" / "kohya.safetensors"))
    torch.save(peft, str(base / "models" / "loras" / "vader_like.pt"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_core_nodes")
    prepare_base(base)
    lora_files(base)
    write_image(base / "input" / "start.png", width=120, height=72)
    with comfy_server(base, CONFIGS) as srv:
        yield srv


def graph(ckpt: str = VC2, dtype: str = "fp32", model=None, seed: int = 5) -> dict:
    """Loader -> text encodes -> VideoCrafter Conditioning -> KSampler ("5") -> SaveLatent ("20").
    `model` replaces the KSampler's model input (a patch node's output)."""
    out = {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": dtype}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a corgi on the beach"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "width": WIDTH, "height": HEIGHT, "frames": FRAMES,
            "fps": 0, "batch_size": 1, "model": ["1", 0]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model or ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2],
            "seed": seed, "steps": 3, "cfg": 7.5, "sampler_name": "euler", "scheduler": "ddim_uniform", "denoise": 1.0}},
        "20": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/core"}},
    }
    if "i2v" in ckpt:
        out["10"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
        out["11"] = {"class_type": "VideoCrafterImageEncode", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "image_encoder": ["1", 3], "image": ["10", 0]}}
        out["4"]["inputs"]["positive"], out["4"]["inputs"]["negative"] = ["11", 0], ["11", 1]
    return out


def latent(server, g: dict) -> torch.Tensor:
    outputs = server.run_ok(g)
    return load_file(str(server.output_file(outputs["20"]["latents"][0])))["latent_tensor"]


@pytest.fixture(scope="module")
def base_latent(server):
    return latent(server, graph())


PATCHES = {
    "PerturbedAttentionGuidance": {"scale": 3.0},
    "FreeU": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    "FreeU_V2": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    "HyperTile": {"tile_size": 32, "swap_size": 1, "max_depth": 0, "scale_depth": False},
    "UNetSelfAttentionMultiply": {"q": 1.0, "k": 1.0, "v": 1.0, "out": 0.5},
    "UNetCrossAttentionMultiply": {"q": 1.0, "k": 1.0, "v": 1.0, "out": 0.5},
}


@pytest.mark.parametrize("node", list(PATCHES))
def test_core_patch_nodes_change_the_video(server, base_latent, node):
    g = graph(model=["30", 0])
    g["30"] = {"class_type": node, "inputs": {"model": ["1", 0], **PATCHES[node]}}
    patched = latent(server, g)
    assert patched.shape == base_latent.shape and torch.isfinite(patched).all()
    assert (patched - base_latent).abs().max() > 1e-3 * base_latent.abs().max()


@pytest.mark.parametrize("node,inputs,words", [
    ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}, "Self-Attention Guidance"),
    ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": False}, "use_scale"),
])
def test_nodes_that_would_break_the_video_are_refused(server, node, inputs, words):
    g = graph(model=["30", 0])
    g["30"] = {"class_type": node, "inputs": {"model": ["1", 0], **inputs}}
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error" and words in error_message(entry), error_message(entry)


def saved_images(server, outputs: dict, node: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(server.output_file(item))) for item in outputs[node]["images"]]


def test_core_vae_decode_and_decode_tiled_give_every_frame(server):
    g = graph()
    g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    g["7"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["5", 0], "vae": ["1", 2], "tile_size": 64,
                                                         "overlap": 0, "temporal_size": 64, "temporal_overlap": 8}}
    g["8"] = {"class_type": "VideoCrafterDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2], "frames_per_chunk": 4}}
    for node, prefix in (("6", "core"), ("7", "tiled"), ("8", "ours")):
        g[f"1{node}"] = {"class_type": "SaveImage", "inputs": {"images": [node, 0], "filename_prefix": f"frames/{prefix}"}}
    outputs = server.run_ok(g)
    core, tiled, ours = (saved_images(server, outputs, n) for n in ("16", "17", "18"))
    assert len(core) == len(tiled) == len(ours) == FRAMES
    assert all(a.shape == (HEIGHT, WIDTH, 3) for a in core)
    assert all(np.array_equal(a, b) for a, b in zip(core, ours))  # every frame, in order
    # Tiled: seams of 64 px tiles differ, but each frame is its own frame, in order.
    distance = np.array([[np.abs(a.astype(int) - b.astype(int)).mean() for b in ours] for a in tiled])
    assert (distance.argmin(axis=1) == np.arange(FRAMES)).all() and distance.diagonal().max() < 16, distance


@pytest.mark.parametrize("encoder", ["VAEEncode", "VAEEncodeTiled"])
def test_core_vae_encode_gives_a_video_latent_the_sampler_takes(server, encoder):
    g = graph()
    g["40"] = {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": FRAMES, "color": 0x808020}}
    extra = {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8} if encoder == "VAEEncodeTiled" else {}
    g["41"] = {"class_type": encoder, "inputs": {"pixels": ["40", 0], "vae": ["1", 2], **extra}}
    g["5"]["inputs"].update(latent_image=["41", 0], denoise=0.6)
    out = latent(server, g)
    assert out.shape == (1, 4, FRAMES, HEIGHT // 8, WIDTH // 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("ckpt", [VC2, "tiny_i2v.safetensors"])
def test_checkpoint_save_loads_back_to_the_same_video(server, ckpt):
    name = ckpt.replace(".safetensors", "")
    save = {"1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "fp32"}},
            "9": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "filename_prefix": f"checkpoints/{name}_saved"}}}
    server.run_ok(save)
    saved = sorted((server.output_dir / "checkpoints").glob(f"{name}_saved_*.safetensors"))[-1]
    shutil.copy(saved, server.base / "models" / "videocrafter" / f"{name}_roundtrip.safetensors")
    original = latent(server, graph(ckpt, seed=11))
    again = latent(server, graph(f"{name}_roundtrip.safetensors", seed=11))
    assert torch.equal(again, original)


@pytest.mark.parametrize("loader,inputs", [
    ("LoraLoader", {"lora_name": "kohya.safetensors", "strength_model": 1.0, "strength_clip": 0.0, "clip": ["1", 1]}),
    ("VideoCrafterLoraLoader", {"lora_name": "kohya.safetensors", "strength_model": 1.0}),
    ("VideoCrafterLoraLoader", {"lora_name": "vader_like.pt", "strength_model": 1.0}),
])
def test_loras_change_the_video(server, base_latent, loader, inputs):
    g = graph(model=["30", 0])
    g["30"] = {"class_type": loader, "inputs": {"model": ["1", 0], **inputs}}
    patched = latent(server, g)
    assert (patched - base_latent).abs().max() > 1e-3 * base_latent.abs().max()


def test_kohya_and_peft_files_of_the_same_lora_give_the_same_video(server):
    out = []
    for name in ("kohya.safetensors", "vader_like.pt"):
        g = graph(model=["30", 0])
        g["30"] = {"class_type": "VideoCrafterLoraLoader", "inputs": {"model": ["1", 0], "lora_name": name,
                                                                      "strength_model": 0.7}}
        out.append(latent(server, g))
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)  # alpha 2 = rank 2: the same scale


def test_fp8_weights_make_a_video(server):
    g = graph(dtype="fp8_e4m3fn")
    g["6"] = {"class_type": "VideoCrafterDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2], "frames_per_chunk": 4}}
    g["7"] = {"class_type": "CreateVideo", "inputs": {"images": ["6", 0], "fps": 8.0}}
    g["8"] = {"class_type": "SaveVideo", "inputs": {"video": ["7", 0], "filename_prefix": "video/fp8", "format": "mp4",
                                                     "codec": "h264"}}
    outputs = server.run_ok(g)
    assert mp4_info(server.output_file(outputs["8"]["images"][0])) == (FRAMES, WIDTH, HEIGHT)
