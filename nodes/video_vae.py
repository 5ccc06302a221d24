"""The loader's VAE: a core SD VAE (`comfy.sd.VAE`) for 5D VideoCrafter latents.

`decode`/`decode_tiled` take a video latent [B, 4, T, h, w] and decode every frame (time folded
into the batch) into an IMAGE batch [B*T, H, W, 3], all frames of video 0 first; `encode`/
`encode_tiled` return a frame batch as one video latent [1, 4, frames, h, w]. So the core VAE
Decode, VAE Decode (Tiled), VAE Encode and VAE Encode (Tiled) nodes work on VideoCrafter videos
(the tiled ones tile each frame; a temporal tile size does not apply). `decode_frames` /
`encode_frames` are the plain per-image methods (VideoCrafter Decode/Encode use them in chunks).
"""
from __future__ import annotations

import torch

import comfy.sd

from .logic import frames_to_latent, latent_to_frames


class VideoCrafterVAE(comfy.sd.VAE):
    """Core SD VAE for video latents [B,4,T,h,w] <-> frames [B*T,H,W,3] (see the module docstring)."""

    def decode_frames(self, samples, vae_options={}):
        return super().decode(samples, vae_options)

    def encode_frames(self, pixels):
        return super().encode(pixels)

    def decode(self, samples, vae_options={}):
        return super().decode(_frames(samples), vae_options)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Each frame tiled spatially; tile_t/overlap_t do not apply (the VAE has no time axis)."""
        return super().decode_tiled(_frames(samples), tile_x, tile_y, overlap)

    def encode(self, pixels):
        return _video(super().encode(pixels))

    def encode_tiled(self, pixels, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return _video(super().encode_tiled(pixels, tile_x, tile_y, overlap))


def _frames(samples: torch.Tensor) -> torch.Tensor:
    return latent_to_frames(samples) if samples.ndim == 5 else samples


def _video(latents: torch.Tensor) -> torch.Tensor:
    """[N,4,h,w] frame latents -> one video [1,4,N,h,w]."""
    return frames_to_latent(latents, 1)
