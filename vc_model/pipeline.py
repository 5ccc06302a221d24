"""Prompts (+ an image for I2V) to video: the official inference flow around `sample_ddim`.

    text tokens      = text_encoder(prompts)                  [B,77,D]
    uncond tokens    = text_encoder([""] * B)                 (official "empty_seq"), or the negative prompt
    I2V image tokens = image_encoder(image)                   [B,N,D]
    uncond image     = image_encoder(zeros(1,3,224,224))      (an all-zero image in [-1,1] = mid-grey)
    x_T              = randn([B,4,T,H/8,W/8]) from the seed's CPU generator, float32
                       (long videos: then FreeNoise-rescheduled with the same generator)
    latent           = sample_ddim(unet, schedule, x_T, ...)   DDIM, CFG, eta
                       (a T2V-Turbo bundle: sample_turbo(unet, schedule, x_T, text tokens, guidance=w), no CFG)
    video            = clamp(vae.decode(latent), -1, 1)       [B,3,T,H,W]

Seeds are device independent: the initial noise and the per-step noise are drawn on the CPU and
moved, so a seed gives the same video on any device (but not the official CUDA draws).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Sequence

import torch

from .config import ModelConfig
from .freenoise import DEFAULT_STRIDE, check_window, reschedule_noise, travel_embeddings, travel_segments
from .sampling import sample_ddim
from .turbo import TURBO_DEFAULTS, apply_turbo, load_turbo
from .turbo_sampler import sample_turbo


def pixel_multiple(config: ModelConfig) -> int:
    """Height and width must be multiples of this: the VAE's downscale (8) times the U-Net's
    downsampling (8 for the releases), so that every skip connection lines up. 64 for all releases."""
    vae = config.vae.downscale if config.vae is not None else 8
    unet = 2 ** (len(config.unet.channel_mult) - 1) if config.unet is not None else 8
    return vae * unet


def _param(module) -> torch.Tensor | None:
    return next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None


def _device(module) -> torch.device:
    p = _param(module)
    return p.device if p is not None else torch.device("cpu")


def _dtype(module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    p = _param(module)
    return p.dtype if p is not None else torch.float32


def _generator(seed) -> torch.Generator:
    """int -> a seeded CPU generator; a Generator is used as is; None -> a randomly seeded CPU one."""
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    elif isinstance(seed, int) and not isinstance(seed, bool):
        generator.manual_seed(seed)
    else:
        raise ValueError(f"seed must be an int, a torch.Generator or None, got {seed!r}.")
    return generator


def _prompts(prompt, b: int, name: str) -> list[str]:
    """A str or a list of str, broadcast from length 1 to b."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings.")
    if len(prompts) == 1:
        prompts = prompts * b
    if len(prompts) != b:
        raise ValueError(f"{name} has {len(prompts)} entries for a batch of {b}.")
    return prompts


def _check_size(config: ModelConfig, height: int, width: int, frames: int) -> None:
    multiple = pixel_multiple(config)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} pixels (latent sizes must be multiples "
                f"of {multiple // (config.vae.downscale if config.vae else 8)}), got {value!r}."
            )
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive integer, got {frames!r}.")


def _require(bundle, *names: str) -> None:
    for name in names:
        if getattr(bundle, name, None) is None:
            raise ValueError(f"The model has no {name.replace('_', ' ')}: the checkpoint lacks that part.")


def _image_tokens(bundle, image: torch.Tensor, b: int, guided: bool):
    """(image tokens [B,N,D], uncond tokens [1,N,D] of the mid-grey 224x224 image or None)."""
    encoder = bundle.image_encoder
    device = _device(encoder)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B,3,H,W] in [-1,1], got shape {list(image.shape)}.")
    if image.shape[0] not in (1, b):
        raise ValueError(f"image has batch {image.shape[0]} for a batch of {b}.")
    tokens = encoder(image.to(device))
    uncond = encoder(torch.zeros(1, 3, 224, 224, device=device)) if guided else None
    return tokens, uncond


@torch.no_grad()
def generate(
    bundle,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    image: torch.Tensor | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    fps: int | None = None,
    steps: int | None = None,
    cfg: float = 12.0,
    eta: float = 1.0,
    seed: int | torch.Generator | None = None,
    callback: Callable | None = None,
    return_latent: bool = False,
    # long videos (vc_model.freenoise)
    temporal_window: int | None = None,
    temporal_stride: int = DEFAULT_STRIDE,
    prompt_travel: Sequence[str] | None = None,
    # T2V-Turbo (vc_model.turbo): the weights to apply first, or True for a bundle that has them
    turbo=None,
    guidance: float | None = None,
    motion_guidance: float | None = None,
    motion_percentage: float | None = None,
) -> torch.Tensor:
    """Generate videos: float32 [B,3,T,H,W] in [-1,1] on the VAE's device.

    bundle: `.config` (ModelConfig), `.unet`, `.vae`, `.text_encoder`, `.image_encoder` (I2V), `.schedule`.
    prompt: one string or a list. The batch B is the longest of prompt, negative_prompt and image
    batch; each of them has B entries or one (then repeated).
    negative_prompt: replaces the official empty-prompt unconditional (str or list of B).
    image: I2V only and then required: [B,3,H,W] (or [3,H,W]) in [-1,1], any size (CLIP squashes it).
    height, width (multiples of `pixel_multiple`, 64 for the releases), frames, fps: default to the
    config's native values. steps, cfg, eta: DDIM settings (official defaults 50, 12, 1).
    turbo: T2V-Turbo weights to apply to this VideoCrafter2 bundle first (a file path or `load_turbo`'s
    result; `bundle` itself is left unchanged), or True to require a bundle `apply_turbo` made. A T2V-Turbo
    bundle samples with `sample_turbo` and no CFG: cfg, eta and negative_prompt do not apply; steps
    defaults to 4 (v1) or 16 (v2), fps to 16 (v1) or 8 (v2), guidance (w) to 7.5; motion_guidance
    (v2 only; None: no motion path) is given on the first motion_percentage (default 0.5) of the steps.
    seed: int, a torch.Generator (the noise is drawn on its device) or None for a random one.
    callback(i, total, x, pred_x0) after every step; raising from it aborts (interrupts).
    return_latent: return the final latent [B,4,T,H/8,W/8] (float32, U-Net device) without decoding.

    Long videos (FreeNoise; see README "Long videos"): temporal_window W (16 officially) makes the U-Net's
    temporal attention run in windows of W frames every temporal_stride frames and reschedules the
    starting noise (its first W frames repeat, locally shuffled); None is the plain model.
    prompt_travel: the prompts ONE video travels through, first to last (instead of `prompt`): the frames
    are split into holds and linear blends of neighbouring prompts (`vc_model.freenoise.travel_segments`);
    every video of the batch gets the same travel. With T2V-Turbo, temporal_window windows its sampler's
    U-Net calls too (the starting noise rescheduled, each step's fresh noise not: not an official
    combination); prompt_travel is DDIM only.
    """
    bundle = _with_turbo(bundle, turbo)
    turbo_defaults = TURBO_DEFAULTS.get(getattr(bundle, "turbo", None))
    _check_turbo_options(turbo_defaults, negative_prompt, guidance, motion_guidance, motion_percentage)
    steps = (turbo_defaults.steps if turbo_defaults else 50) if steps is None else steps
    config: ModelConfig = bundle.config
    _require(bundle, "unet", "text_encoder", "schedule")
    if not return_latent:
        _require(bundle, "vae")
    i2v = config.is_i2v or getattr(bundle, "image_encoder", None) is not None
    if i2v and image is None:
        raise ValueError("This is an image-to-video model: an input image is required.")
    if not i2v and image is not None:
        raise ValueError("This is a text-to-video model: it takes no input image.")
    if i2v:
        _require(bundle, "image_encoder")

    height = config.height if height is None else height
    width = config.width if width is None else width
    frames = config.frames if frames is None else frames
    fps = config.fps if fps is None else fps
    _check_size(config, height, width, frames)
    if temporal_window is not None:
        check_window(temporal_window, temporal_stride)  # refuses bad settings before any work

    travel = None
    if prompt_travel is not None:
        if prompt is not None:
            raise ValueError("Give either prompt or prompt_travel, not both.")
        travel = [prompt_travel] if isinstance(prompt_travel, str) else list(prompt_travel)
        if not travel or not all(isinstance(p, str) for p in travel):
            raise ValueError("prompt_travel must be a non-empty list of strings (the prompts one video travels through).")
        prompt = travel[-1]
        travel_segments(frames, len(travel))  # refuses too few frames before any work
        travel = travel if len(travel) > 1 else None
    if prompt is None:
        raise ValueError("A prompt is required (or prompt_travel for a video that travels through several).")
    if travel is not None and turbo_defaults is not None:
        raise ValueError("prompt_travel runs with the DDIM sampler; T2V-Turbo's sampler takes one prompt per video "
                         "(long T2V-Turbo videos can use temporal_window).")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [] if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
    b = max(len(prompts), len(negatives), image.shape[0] if image is not None and image.ndim == 4 else 1)
    prompts = _prompts(prompts, b, "prompt")
    guided = cfg != 1.0 and turbo_defaults is None
    uncond_prompts = _prompts("" if negative_prompt is None else negative_prompt, b, "negative_prompt")

    unet = bundle.unet
    device, dtype = _device(unet), _dtype(unet)
    context = bundle.text_encoder(prompts).to(device, dtype)
    uncond = bundle.text_encoder(uncond_prompts).to(device, dtype) if guided else None
    travel_context = None
    if travel is not None:
        travel_context = travel_embeddings(bundle.text_encoder(travel).to(device, dtype), frames)[None]
    image_context = uncond_image = None
    if i2v:
        image_context, uncond_image = _image_tokens(bundle, image, b, guided)
        image_context = image_context.to(device, dtype)
        uncond_image = uncond_image.to(device, dtype) if uncond_image is not None else None

    generator = _generator(seed)
    downscale = config.vae.downscale if config.vae is not None else 8
    channels = config.unet.in_channels if config.unet is not None else 4
    shape = (b, channels, frames, height // downscale, width // downscale)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    if temporal_window is not None:
        noise = reschedule_noise(noise, temporal_window, temporal_stride, generator=generator)

    if turbo_defaults is not None:
        latent = sample_turbo(
            unet, bundle.schedule, noise.to(device), context, fps=fps, steps=steps,
            guidance=turbo_defaults.guidance if guidance is None else guidance, generator=generator,
            motion_guidance=motion_guidance,
            motion_percentage=turbo_defaults.motion_percentage if motion_percentage is None else motion_percentage,
            callback=callback, temporal_window=temporal_window, temporal_stride=temporal_stride,
        )
    else:
        latent = sample_ddim(
            unet, bundle.schedule, noise.to(device), context, uncond,
            image_context=image_context, uncond_image_context=uncond_image, fps=fps,
            steps=steps, cfg=cfg, eta=eta, generator=generator, callback=callback,
            temporal_window=temporal_window, temporal_stride=temporal_stride, travel_context=travel_context,
        )
    if return_latent:
        return latent
    video = bundle.vae.decode(latent.to(_device(bundle.vae)))
    return video.float().clamp(-1.0, 1.0)


def _with_turbo(bundle, turbo):
    """generate's `turbo`: None (the bundle as it is), True (it must be T2V-Turbo), or weights to apply."""
    if turbo is None:
        return bundle
    if turbo is True:
        if getattr(bundle, "turbo", None) is None:
            raise ValueError("turbo=True needs a bundle with T2V-Turbo applied: pass vc_model.apply_turbo(bundle, "
                             "vc_model.load_turbo(path)), or pass the file as turbo=path.")
        return bundle
    if isinstance(turbo, (str, os.PathLike)):
        turbo = load_turbo(turbo)
    if not isinstance(turbo, Mapping):
        raise ValueError(f"turbo must be a T2V-Turbo file path, load_turbo()'s result or True, got {type(turbo).__name__}.")
    return apply_turbo(bundle, turbo)


def _check_turbo_options(defaults, negative_prompt, guidance, motion_guidance, motion_percentage) -> None:
    if defaults is None:
        if guidance is not None or motion_guidance is not None or motion_percentage is not None:
            raise ValueError("guidance, motion_guidance and motion_percentage are T2V-Turbo settings; this model is "
                             "not T2V-Turbo (pass turbo=..., or use cfg for classifier-free guidance).")
        return
    if negative_prompt is not None:
        raise ValueError("T2V-Turbo samples without classifier-free guidance, so it takes no negative prompt.")
    if motion_percentage is not None and not 0.0 <= motion_percentage <= 1.0:
        raise ValueError(f"motion_percentage must be from 0 to 1 (the share of steps with motion guidance), got "
                         f"{motion_percentage!r}.")


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[B,3,T,H,W] in [-1,1] -> uint8 [B,T,H,W,3], the official way: clamp, (x+1)/2*255, truncate."""
    x = video.float().clamp(-1.0, 1.0)
    x = (x + 1.0) / 2.0 * 255.0
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()
