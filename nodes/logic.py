"""Host-free helpers of the nodes: size checks, latent/frame layouts, image conversions.

No ComfyUI import. Errors are returned as one-sentence strings (for `validate_inputs`) or raised
as ValueError with such a sentence.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

from ..vc_model.checkpoint import CheckpointError

SIZE_MULTIPLE = 64  # pixels: the released U-Nets downsample the 8x VAE latent three times
MAX_SIZE = 4096
MAX_FRAMES = 256
MAX_FPS = 120
MAX_BATCH = 64
MAX_STEPS = 1000  # the schedule's timesteps
MAX_CFG = 100.0
LATENT_CHANNELS = 4


def size_problem(width: int, height: int) -> str | None:
    """None when width and height are usable pixel sizes, else one sentence saying what to change."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be a whole number of pixels, got {value!r}."
        if value < SIZE_MULTIPLE or value > MAX_SIZE or value % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            return (f"{name} {value} is not usable: VideoCrafter needs a multiple of {SIZE_MULTIPLE} between "
                    f"{SIZE_MULTIPLE} and {MAX_SIZE} (for example {min(lower, MAX_SIZE)}).")
    return None


def file_problem(name, path_of, inspect) -> str | None:
    """None when the file `name` is usable (`inspect(path_of(name))` passes) or not yet known (None: the
    input is linked from another node and checked when loading), else the sentence saying why not."""
    if name is None:
        return None
    try:
        inspect(path_of(name))
    except (CheckpointError, FileNotFoundError) as error:
        return str(error)
    return None


def frames_problem(frames: int) -> str | None:
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= MAX_FRAMES:
        return f"frames must be a whole number from 1 to {MAX_FRAMES} (the models were trained on 16), got {frames!r}."
    return None


def conditioning_problem(width, height, frames, fps, batch_size) -> str | None:
    """Checks of VideoCrafter Conditioning's numbers; width/height/fps 0 mean "the release's value".

    None values (inputs linked from other nodes, unknown at validation) are skipped.
    """
    if width is not None and height is not None:
        problem = size_problem(width or SIZE_MULTIPLE, height or SIZE_MULTIPLE)
        if problem:
            return problem
    if frames is not None and frames_problem(frames):
        return frames_problem(frames)
    if fps is not None and (not isinstance(fps, int) or not 0 <= fps <= MAX_FPS):
        return f"fps must be from 0 (the release's value) to {MAX_FPS}, got {fps!r}."
    if batch_size is not None and (not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH):
        return f"batch_size must be from 1 to {MAX_BATCH}, got {batch_size!r}."
    return None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def eta_problem(eta) -> str | None:
    if eta is not None and (not _real(eta) or not 0.0 <= eta <= 1.0):
        return f"eta must be from 0 (deterministic) to 1 (the official default), got {eta!r}; it is not the duration."
    return None


def sampler_problem(steps, cfg, eta) -> str | None:
    """Checks of VideoCrafter Sampler's numbers (None: linked from another node, checked at execution)."""
    if steps is not None and (not _whole(steps) or not 1 <= steps <= MAX_STEPS):
        return f"steps must be a whole number from 1 to {MAX_STEPS} (official 50), got {steps!r}."
    if cfg is not None and (not _real(cfg) or not 0.0 <= cfg <= MAX_CFG):
        return f"cfg must be a number from 0 to {MAX_CFG:g} (official 12), got {cfg!r}."
    return eta_problem(eta)


def image_batch_problem(images: int, videos: int) -> str | None:
    """I2V: one image for every video, or one image per video; anything else is ambiguous."""
    if images in (1, videos):
        return None
    return (f"The start image batch has {images} images but {videos} videos are generated: give one image "
            f"(used for every video) or exactly one image per video (batch_size {images}).")


def empty_latent(batch: int, frames: int, width: int, height: int, device=None) -> torch.Tensor:
    """Zeros [batch, 4, frames, height/8, width/8] (ComfyUI LATENT samples, unscaled)."""
    return torch.zeros([batch, LATENT_CHANNELS, frames, height // 8, width // 8], device=device)


def latent_problem(samples) -> str | None:
    """None for a VideoCrafter latent [B,4,T,h,w], else one sentence about what was given instead."""
    if not isinstance(samples, torch.Tensor):
        return f"Expected a latent tensor, got {type(samples).__name__}."
    shape = list(samples.shape)
    if samples.ndim == 4:
        return (f"This is an image latent {shape} (from an image model or Empty Latent Image); VideoCrafter needs "
                "a video latent [batch, 4, frames, height/8, width/8] from VideoCrafter Conditioning or VideoCrafter Encode.")
    if samples.ndim != 5:
        return f"Expected a video latent [batch, 4, frames, height/8, width/8], got shape {shape}."
    if samples.shape[1] != LATENT_CHANNELS:
        return (f"This video latent has {samples.shape[1]} channels (another video model's latent, shape {shape}); "
                "VideoCrafter latents have 4 channels.")
    return None


def latent_size_problem(samples: torch.Tensor, multiple: int) -> str | None:
    """None when the latent's height and width divide by `multiple` (the U-Net's total downsampling)."""
    h, w = samples.shape[-2:]
    if h % multiple or w % multiple:
        return (f"This latent is {w * 8}x{h * 8} pixels; the VideoCrafter U-Net needs width and height that are "
                f"multiples of {multiple * 8} (resize the frames, or use VideoCrafter Conditioning).")
    return None


def latent_to_frames(samples: torch.Tensor) -> torch.Tensor:
    """[B,4,T,h,w] -> [B*T,4,h,w], batch-major (all frames of video 0 first)."""
    return rearrange(samples, "b c t h w -> (b t) c h w")


def frames_to_latent(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T,4,h,w] -> [B,4,T,h,w]; the inverse of `latent_to_frames`."""
    return rearrange(frames, "(b t) c h w -> b c t h w", b=batch)


def video_batch(n_images: int, frames: int) -> tuple[int, int]:
    """How an IMAGE batch of n_images splits into videos: (batch, frames per video).

    frames = 0 means one video of all images. Raises ValueError when they do not divide evenly.
    """
    if n_images < 1:
        raise ValueError("The image batch is empty.")
    if frames == 0:
        return 1, n_images
    if n_images % frames:
        raise ValueError(f"{n_images} images cannot be split into videos of {frames} frames; "
                         "set frames to a divisor of the batch, or 0 for one video of all images.")
    return n_images // frames, frames


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering range(total) in pieces of at most `size` (size >= 1)."""
    size = max(1, int(size))
    return [(i, min(i + size, total)) for i in range(0, total, size)]


def image_rgb(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> [B,H,W,3]: alpha (and any channel past the third) is dropped, a
    greyscale image (C = 1, or 2 with alpha) is repeated into three channels. Raises ValueError with
    one sentence for tensors that are not an image batch."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected an IMAGE batch [batch, height, width, channels], got {shape}.")
    if 0 in images.shape:
        raise ValueError(f"The image batch is empty (shape {list(images.shape)}).")
    if images.shape[-1] <= 2:
        return images[..., :1].expand(*images.shape[:-1], 3)
    return images[..., :3]


def images_to_model(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in [0,1] -> [B,3,H,W] in [-1,1] (see `image_rgb` for alpha and greyscale)."""
    return image_rgb(images).movedim(-1, 1).float() * 2.0 - 1.0


def grey_images(batch: int, size: int, device=None) -> torch.Tensor:
    """The official unconditional I2V image: zeros in [-1,1] (mid-grey), [batch,3,size,size]."""
    return torch.zeros(batch, 3, size, size, device=device)


def clip_text_config(cfg) -> dict:
    """Overrides of ComfyUI's SD2 CLIP-H text config (`sd2_clip_config.json`) for a TextEncoderConfig.

    For the released towers these are the file's own values; the tiny test models get smaller ones.
    """
    return {
        "hidden_size": cfg.width, "intermediate_size": int(round(cfg.width * cfg.mlp_ratio)),
        "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers,
        "max_position_embeddings": cfg.context_length, "vocab_size": cfg.vocab_size, "projection_dim": cfg.embed_dim,
    }


def vae_config(cfg, standard) -> dict | None:
    """`comfy.sd.VAE(config=...)` for a VAEConfig; None for the standard SD VAE (ComfyUI detects it
    itself and then uses its tuned memory estimates)."""
    import dataclasses

    if dataclasses.replace(cfg, scale_factor=standard.scale_factor) == standard:
        return None
    return {"params": {"embed_dim": cfg.embed_dim, "ddconfig": {
        "double_z": cfg.double_z, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
        "in_channels": cfg.in_channels, "out_ch": cfg.out_ch, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
        "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions), "dropout": 0.0}}}
