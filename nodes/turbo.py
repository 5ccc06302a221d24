"""T2V-Turbo on a VideoCrafter2 MODEL through ComfyUI's patch mechanism, and its sampler.

Applying a file clones the MODEL and adds:

* weight patches: v1's LoRA factors as LoRA patches (W + up @ down, scale 1, computed when ComfyUI loads
  the model, per layer under partial loading, and undone when it unpatches); v2's U-Net weights as "set"
  patches (stored in the model's weight dtype);
* object patches: the guidance projections (`time_cond_proj` [, `motion_cond_proj`, `combine_proj`]) on
  the diffusion model, so ComfyUI loads, offloads and casts them with it (v1's `time_cond_proj` is its
  documented seeded base plus the LoRA delta); and a ModelSampling on VideoCrafter2's plain table, since
  T2V-Turbo samples without `use_scale`;
* the guidance w (and the v2 motion guidance) in the model's transformer_options, where the U-Net reads it.

Core samplers then run the Turbo model: KSampler with `lcm`, cfg 1.0 and the `simple` scheduler gives the
official timesteps for 4 or 8 steps (see turbo_sampling.py); VideoCrafter Turbo Sampler runs the official loop.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy.k_diffusion import sampling as k_sampling
from comfy.weight_adapter.lora import LoRAAdapter

from ..vc_model.schedule import Schedule
from ..vc_model.turbo import TurboError, TurboParts, load_turbo, prepare_turbo
from ..vc_model.unet import guidance_layers
from . import turbo_sampling as ts
from .conditioning import has_image, videocrafter_model
from .guards import explain_out_of_memory, sampling_oom
from .loader import model_file, model_files
from .logic import latent_problem, latent_size_problem
from .model import ModelSamplingVideoCrafter

FOLDERS = ("loras", "videocrafter")  # unet_lora.pt goes with the LoRAs; unet_mg.pt may sit with the checkpoints


def turbo_names() -> list[str]:
    """Files in models/loras/ and models/videocrafter/."""
    return model_files(*FOLDERS)


def turbo_path(name: str) -> str:
    return model_file(name, *FOLDERS)


def is_turbo(model) -> bool:
    return ts.TURBO_KEY in model.model_options.get("transformer_options", {})


def apply(model, turbo_name: str, guidance: float, motion_guidance: float, motion_percentage: float):
    """-> a clone of the VideoCrafter2 MODEL with T2V-Turbo applied (see the module docstring).

    motion_guidance / motion_percentage are used by v2 files with motion layers and ignored otherwise."""
    problem = ts.apply_problem(guidance, motion_guidance, motion_percentage)
    if problem:
        raise ValueError(problem)
    inner = videocrafter_model(model)
    if is_turbo(model):
        raise TurboError("This MODEL already has T2V-Turbo applied: apply it once, to the plain VideoCrafter2 model.")
    parts = prepare_turbo(inner.release.unet, load_turbo(turbo_path(turbo_name)), name=inner.release.name)
    dtype = inner.get_dtype()
    patched = model.clone()
    if parts.version == "v1":
        patches = {f"diffusion_model.{name}.weight": LoRAAdapter(set(), (up, down, None, None, None, None))
                   for name, (up, down) in parts.lora.items()}
    else:
        patches = {f"diffusion_model.{key}": ("set", (value.to(dtype),)) for key, value in parts.weights.items()}
    accepted = patched.add_patches(patches, 1.0)
    if len(accepted) != len(patches):
        missing = sorted(set(patches) - set(accepted))[:3]
        raise TurboError(f"The MODEL has no weights {', '.join(missing)}: T2V-Turbo needs the plain VideoCrafter2 model.")
    for name, layer in _guidance_modules(parts, inner.diffusion_model, dtype).items():
        patched.add_object_patch(f"diffusion_model.{name}", layer)
    plain = Schedule.from_config(replace(inner.release.schedule, use_scale=False))
    patched.add_object_patch("model_sampling", ModelSamplingVideoCrafter(inner.model_config, plain))
    motion = motion_guidance if parts.motion else None
    patched.model_options.setdefault("transformer_options", {})[ts.TURBO_KEY] = ts.turbo_options(
        parts.version, guidance, motion, motion_percentage)
    return patched


def _guidance_modules(parts: TurboParts, diffusion_model, dtype) -> dict:
    """The guidance projections with their final weights, built from the diffusion model's own ops (so
    ComfyUI casts and offloads them like its other layers), on the offload device in the model's dtype."""
    ops = SimpleNamespace(Linear=type(diffusion_model.time_embed[0]))  # the ops class its Linears were built from
    with torch.device("meta"):
        layers = guidance_layers(parts.config, ops)
    device = mm.unet_offload_device()
    for name, layer in layers.items():
        layer.weight = torch.nn.Parameter(parts.guidance[f"{name}.weight"].to(device=device, dtype=dtype),
                                          requires_grad=False)
    return layers


def turbo_ksampler() -> comfy.samplers.KSAMPLER:
    """The official Turbo loop as a SAMPLER; its noise is drawn like the core `lcm` sampler's."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        noise = k_sampling.default_noise_sampler(x, seed=(extra_args or {}).get("seed"))
        return ts.sample_turbo_consistency(model, x, sigmas, extra_args, callback, disable, noise_sampler=noise)

    return comfy.samplers.KSAMPLER(sample)


def turbo_model_sigmas(model, steps: int):
    """SIGMAS of the official Turbo timesteps on the MODEL's sigma table, ending in 0."""
    problem = ts.steps_problem(steps)
    if problem:
        raise ValueError(problem)
    return ts.turbo_sigmas(model.get_model_object("model_sampling").sigmas.cpu(), steps)


def sample(model, positive, latent, seed: int, steps: int):
    """VideoCrafter Turbo Sampler: the official T2V-Turbo loop, no CFG -> LATENT (the last denoised)."""
    inner = videocrafter_model(model)
    if not is_turbo(model):
        raise ValueError("This MODEL has no T2V-Turbo applied: connect it through Apply VideoCrafter T2V-Turbo first.")
    problem = (ts.steps_problem(steps) or latent_problem(latent["samples"])
               or latent_size_problem(latent["samples"], inner.size_multiple))
    if problem:
        raise ValueError(problem)
    if has_image(positive):
        raise ValueError("T2V-Turbo is text-to-video: the conditioning must not carry an image.")
    with explain_out_of_memory(lambda: sampling_oom(latent["samples"].shape, inner.get_dtype())):
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        sigmas = turbo_model_sigmas(model, steps)
        noise = comfy.sample.prepare_noise(samples, seed)
        callback = latent_preview.prepare_callback(model, steps)
        # cfg 1.0: ComfyUI skips the unconditional pass, so the negative (the positive again) is never run
        out = comfy.sample.sample_custom(model, noise, 1.0, turbo_ksampler(), sigmas, positive, positive, samples,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result["samples"] = out
    return result
