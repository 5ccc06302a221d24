"""T2V-Turbo in ComfyUI's sigma space: its schedule, its sampler, and the guidance the U-Net reads.

No ComfyUI import: `turbo.py` wraps these into a SIGMAS node, a SAMPLER and model options, and the tests
run them against `vc_model.sample_turbo` without a host.

A MODEL with T2V-Turbo applied samples on the plain VideoCrafter table sigma_t = sqrt((1 - a_t) / a_t)
(Turbo has no `use_scale`), where ComfyUI's y = x_t / sqrt(a_t) and the model's denoised is the official
x0. The official step in y terms, with c_skip / c_out from the timestep t of sigma:

    denoised = c_out * x0 + c_skip * y / sqrt(1 + sigma^2)        (x_t = y * sqrt(a_t))
    y_next   = denoised + sigma_next * z                           (= x_next / sqrt(a_next))

and the result is the last step's denoised. c_skip is below 5e-8 and c_out within 2e-8 of 1 at every
official timestep, so ComfyUI's `lcm` sampler (y_next = x0 + sigma_next * z) is the same sampler to float32
rounding: KSampler with `lcm`, cfg 1 and the `simple` scheduler runs it at the official timesteps when
200 / steps is a whole number (4 -> 999, 749, 499, 249; 8; 5; 10; ...). `turbo_sigmas` gives them for any
step count.

The guidance w and the v2 motion guidance ride in `transformer_options[TURBO_KEY]` (the MODEL's options,
set by the Apply node); `turbo_unet_kwargs` turns them into the U-Net's `guidance` / `motion_guidance`
arguments, motion guidance per sample from its timestep as the official pipeline does.
"""
from __future__ import annotations

import torch

from ..vc_model.turbo_sampler import boundary_scalings, motion_guidance_at, turbo_timesteps
from .sigmas import seeded_noise_sampler

TURBO_KEY = "videocrafter_turbo"  # transformer_options entry: {"version", "guidance", "motion_guidance", "motion_percentage"}


def turbo_options(version: str, guidance: float, motion_guidance: float | None, motion_percentage: float) -> dict:
    """The transformer_options entry the Apply node sets; motion_guidance None: no motion path."""
    return {"version": version, "guidance": float(guidance),
            "motion_guidance": None if motion_guidance is None else float(motion_guidance),
            "motion_percentage": float(motion_percentage)}


def turbo_unet_kwargs(transformer_options: dict | None, timesteps: torch.Tensor, num_timesteps: int = 1000) -> dict:
    """{"guidance": [B], "motion_guidance": [B] or None} for the U-Net, or {} for a model without Turbo."""
    settings = (transformer_options or {}).get(TURBO_KEY)
    if settings is None:
        return {}
    b, device = timesteps.shape[0], timesteps.device
    motion = None
    if settings["motion_guidance"] is not None:
        motion = torch.tensor([motion_guidance_at(float(t), settings["motion_guidance"], settings["motion_percentage"],
                                                  num_timesteps) for t in timesteps.tolist()], device=device)
    return {"guidance": torch.full((b,), settings["guidance"], device=device), "motion_guidance": motion}


def turbo_sigmas(sigma_table: torch.Tensor, steps: int) -> torch.Tensor:
    """Descending sigmas of the official Turbo timesteps, then 0 (the last step returns its denoised)."""
    timesteps = turbo_timesteps(steps, sigma_table.shape[0])
    return torch.tensor([float(sigma_table[t]) for t in timesteps] + [0.0], dtype=torch.float32)


def _model_sampling(model):
    """The ModelSampling behind ComfyUI's denoiser wrappers (`.model_sampling` at some depth)."""
    inner = model
    for _ in range(6):
        sampling = getattr(inner, "model_sampling", None)
        if sampling is not None:
            return sampling
        inner = getattr(inner, "inner_model", None)
        if inner is None:
            break
    raise ValueError("The VideoCrafter Turbo sampler needs a model with a ModelSampling (a ComfyUI MODEL).")


@torch.no_grad()
def sample_turbo_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """The official T2V-Turbo loop as a k-diffusion style sampler (see the module docstring).

    model(y, sigma * ones[B], **extra_args) -> x0; x and the result in y = x_t / sqrt(a_t) form; sigmas
    descending, ending in 0 (`turbo_sigmas`). z comes from `noise_sampler` or a generator seeded with
    extra_args["seed"]; it is drawn only when the next sigma is above 0."""
    extra_args = {} if extra_args is None else extra_args
    sampling = _model_sampling(model)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = model(x, sigmas[i] * s_in, **extra_args)
        c_skip, c_out = boundary_scalings(float(sampling.timestep(sigmas[i:i + 1]).reshape(-1)[0]))
        denoised = c_out * x0 + (c_skip / (1.0 + sigma**2) ** 0.5) * x
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_next if sigma_next > 0 else denoised
    return x


MAX_GUIDANCE = 30.0  # the official app offers 2 to 14
MAX_TURBO_STEPS = 200  # the origin grid the timesteps come from


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def apply_problem(guidance, motion_guidance, motion_percentage) -> str | None:
    """Checks of the Apply node's numbers (None: linked from another node, checked when applied)."""
    if guidance is not None and (not _number(guidance) or not 0.0 <= guidance <= MAX_GUIDANCE):
        return f"guidance must be a number from 0 to {MAX_GUIDANCE:g} (official 7.5), got {guidance!r}."
    if motion_guidance is not None and (not _number(motion_guidance) or not 0.0 <= motion_guidance <= 1.0):
        return f"motion_guidance must be a number from 0 to 1 (official 0.05), got {motion_guidance!r}."
    if motion_percentage is not None and (not _number(motion_percentage) or not 0.0 <= motion_percentage <= 1.0):
        return f"motion_percentage must be from 0 to 1 (the share of steps with motion guidance), got {motion_percentage!r}."
    return None


def steps_problem(steps) -> str | None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TURBO_STEPS):
        return f"steps must be a whole number from 1 to {MAX_TURBO_STEPS} (official 4 for v1, 16 for v2), got {steps!r}."
    return None
