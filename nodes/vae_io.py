"""5D VideoCrafter latents <-> IMAGE frame batches through a core `comfy.sd.VAE`, in chunks.

With the loader's `video_vae.VideoCrafterVAE` the chunks go through its per-image `decode_frames` /
`encode_frames`; any other core SD VAE through `decode` / `encode`.

Time is folded into the batch ([B,4,T,h,w] <-> [B*T,H,W,3], all frames of video 0 first). Before
each chunk ComfyUI's interrupt flag is checked (an interrupted decode returns nothing, so no output
node ever sees half a video), after each the progress bar moves; an out-of-memory error names the
chunk and says to lower frames_per_chunk. The VAE's own memory handling applies inside a chunk.
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.utils

from .guards import coding_oom, map_chunks
from .logic import chunks, frames_to_latent, image_rgb, latent_problem, latent_to_frames, video_batch


def _check_vae(vae) -> None:
    if getattr(vae, "latent_dim", 2) != 2 or getattr(vae, "latent_channels", 4) != 4:
        raise ValueError(f"This VAE has {getattr(vae, 'latent_channels', '?')}-channel "
                         f"{getattr(vae, 'latent_dim', '?')}D latents; VideoCrafter needs the SD-style image VAE "
                         "from its own checkpoint (Load VideoCrafter Checkpoint).")


def _chunked(fn, items: torch.Tensor, size: int, verb: str, node: str, pixels: str) -> torch.Tensor:
    pbar = comfy.utils.ProgressBar(len(chunks(items.shape[0], size)))
    return map_chunks(fn, items, size, check_interrupt=mm.throw_exception_if_processing_interrupted,
                      progress=lambda: pbar.update(1),
                      describe=lambda a, b: coding_oom(verb, node, a, b, items.shape[0], size, pixels))


def decode(vae, samples: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """[B,4,T,h,w] -> IMAGE [B*T,H,W,3] in [0,1]."""
    problem = latent_problem(samples)
    if problem:
        raise ValueError(problem)
    _check_vae(vae)
    h, w = samples.shape[-2:]
    decode_frames = getattr(vae, "decode_frames", vae.decode)
    images = _chunked(lambda f: decode_frames(f).to(mm.intermediate_device()), latent_to_frames(samples),
                      frames_per_chunk, "decoding", "VideoCrafter Decode", f"{w * 8}x{h * 8}")
    return images.reshape(-1, *images.shape[-3:])


def encode(vae, images: torch.Tensor, frames: int, frames_per_chunk: int) -> torch.Tensor:
    """IMAGE [B*T,H,W,C] -> [B,4,T,h,w]; frames = frames per video (0: one video of all images).

    Alpha is dropped and greyscale repeated to RGB (`image_rgb`); the VAE crops width and height
    to multiples of 8."""
    _check_vae(vae)
    images = image_rgb(images)
    batch, _ = video_batch(images.shape[0], frames)
    encode_frames = getattr(vae, "encode_frames", vae.encode)
    latents = _chunked(lambda f: encode_frames(f).to(mm.intermediate_device()), images, frames_per_chunk,
                       "encoding", "VideoCrafter Encode", f"{images.shape[2]}x{images.shape[1]}")
    return frames_to_latent(latents, batch)
