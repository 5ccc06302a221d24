"""The checkpoint loader holds each weight once inside a real ComfyUI (COMFYUI_PATH).

On the CPU in fp32 the U-Net's weights stay views of the memory-mapped checkpoint (its pages are the
weights), while ComfyUI's CLIP and VAE copy theirs into modules of their own. After a run, the server's
mapping of the file (Rss in /proc/<pid>/smaps) must therefore hold about the U-Net's bytes and not the
text encoder's or the VAE's: their pages were given back once copied.
"""
from __future__ import annotations

import os

import pytest

from harness import require_comfyui

require_comfyui()

from harness import comfy_server, prepare_base  # noqa: E402

from vc_model import random_state_dict  # noqa: E402
from vc_model.checkpoint import split_components  # noqa: E402
from vc_model.config import tiny_config  # noqa: E402

CHECKPOINTS = {"memory.safetensors": tiny_config(), "memory.ckpt": tiny_config()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = prepare_base(tmp_path_factory.mktemp("comfy_memory"))
    with comfy_server(base, CHECKPOINTS) as srv:
        yield srv


def graph(ckpt: str) -> dict:
    """Load, encode both prompts, sample one step (every U-Net weight is read), decode, save the latent."""
    return {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a boat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "width": 128, "height": 64, "frames": 4,
            "fps": 0, "batch_size": 1, "model": ["1", 0]}},
        "5": {"class_type": "VideoCrafterSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2],
            "seed": 1, "steps": 1, "cfg": 7.5, "eta": 1.0}},
        "6": {"class_type": "VideoCrafterDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2],
                                                             "frames_per_chunk": 4}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{ckpt}"}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def mapped_bytes(pid: int, path) -> int:
    """Resident bytes of every mapping of `path` in process `pid`."""
    target, total, inside = os.path.realpath(path), 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and line.split(maxsplit=5)[5].strip() == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_text_encoder_and_vae_pages_are_given_back(server, name):
    server.run_ok(graph(name))
    state = random_state_dict(CHECKPOINTS[name], seed=7)  # what the harness wrote
    size = {part: sum(state[k].numel() * state[k].element_size() for k in keys.values())
            for part, keys in split_components(state).items()}
    held = mapped_bytes(server.process.pid, server.base / "models" / "videocrafter" / name)
    print(f"{name}: mapping holds {held / 2**20:.2f} MiB; U-Net {size['unet'] / 2**20:.2f}, text encoder "
          f"{size['text_encoder'] / 2**20:.2f}, VAE {size['vae'] / 2**20:.2f} MiB")
    assert held > 0, "the fp32 U-Net's weights are the file's pages: its mapping must be found"
    assert held <= size["unet"] + 2**20, (  # 1 MiB: pages shared by neighbouring tensors stay
        f"{held / 2**20:.1f} MiB of the file stay resident: the copied text encoder / VAE pages were kept")
