"""5D VideoCrafter latents <-> IMAGE frame batches through a core `comfy.sd.VAE`, in chunks.

Time is folded into the batch ([B,4,T,h,w] <-> [B*T,H,W,3], all frames of video 0 first); each
chunk is a progress step and an interrupt point, and the VAE's own memory handling applies.
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.utils

from .logic import chunks, frames_to_latent, latent_problem, latent_to_frames, video_batch


def _check_vae(vae) -> None:
    if getattr(vae, "latent_dim", 2) != 2 or getattr(vae, "latent_channels", 4) != 4:
        raise ValueError(f"This VAE has {getattr(vae, 'latent_channels', '?')}-channel "
                         f"{getattr(vae, 'latent_dim', '?')}D latents; VideoCrafter needs the SD-style image VAE "
                         "from its own checkpoint (Load VideoCrafter Checkpoint).")


def decode(vae, samples: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """[B,4,T,h,w] -> IMAGE [B*T,H,W,3] in [0,1]."""
    problem = latent_problem(samples)
    if problem:
        raise ValueError(problem)
    _check_vae(vae)
    frames = latent_to_frames(samples)
    pieces = chunks(frames.shape[0], frames_per_chunk)
    pbar = comfy.utils.ProgressBar(len(pieces))
    out = []
    for start, end in pieces:
        out.append(vae.decode(frames[start:end]).to(mm.intermediate_device()))
        pbar.update(1)
    images = torch.cat(out)
    return images.reshape(-1, *images.shape[-3:])


def encode(vae, images: torch.Tensor, frames: int, frames_per_chunk: int) -> torch.Tensor:
    """IMAGE [B*T,H,W,C] -> [B,4,T,h,w]; frames = frames per video (0: one video of all images)."""
    _check_vae(vae)
    batch, _ = video_batch(images.shape[0], frames)
    pieces = chunks(images.shape[0], frames_per_chunk)
    pbar = comfy.utils.ProgressBar(len(pieces))
    out = []
    for start, end in pieces:
        out.append(vae.encode(images[start:end, :, :, :3]).to(mm.intermediate_device()))
        pbar.update(1)
    return frames_to_latent(torch.cat(out), batch)
