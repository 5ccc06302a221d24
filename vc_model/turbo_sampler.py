"""T2V-Turbo's sampler (the official `T2VTurboScheduler` run by `T2VTurboVC2Pipeline`), as small pure functions.

No classifier-free guidance and no negative prompt: the guidance scale w goes into the U-Net as an
embedding (`UNet3D(..., guidance=w)`). With `a_t = alphas_cumprod[t]`, every step is

    x0       = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
    denoised = c_out(t) * x0 + c_skip(t) * x           (consistency boundary scalings, sigma_data 0.5, t / 0.1)
    x_next   = sqrt(a_next) * denoised + sqrt(1 - a_next) * z,   a_next = a of the next timestep (the last: its own)

and the result is the LAST step's `denoised`, not x_next. Fresh noise z is drawn at every step, the last one
included (where it goes unused), unless there is only one step. Timesteps come from an origin grid of 200
(`lcm_origin_steps`, as the official app and predictor call it): 4 steps are 999, 749, 499, 249. There is no
`use_scale` signal scaling (VideoCrafter2's DDIM has one). T2V-Turbo v2's motion guidance m is given to the
U-Net on the steps with t >= 1000 * (1 - percentage) and 0 after them.

Differences from the official code that do not change the maths: the scalars are Python floats (float64)
from the float32 `alphas_cumprod` (the official tensors are float32 throughout; the final latent agrees
to ~1e-4); a given `schedule`'s alphas_cumprod is used (VideoCrafter's, computed in float64, differs from
the scheduler's float32 cumprod by ~1e-7).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .freenoise import DEFAULT_STRIDE
from .sampling import _batch, _fps_tensor, _randn
from .schedule import Schedule

LCM_ORIGIN_STEPS = 200
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # the official t / 0.1


def turbo_timesteps(steps: int, num_timesteps: int = 1000, origin_steps: int = LCM_ORIGIN_STEPS) -> list[int]:
    """Descending timesteps: every (origin_steps // steps)-th of the origin grid c*k - 1 (c = T // origin_steps,
    k = 1..origin_steps) counting down from the top, the first `steps` of them. 4 -> [999, 749, 499, 249]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= origin_steps:
        raise ValueError(f"T2V-Turbo steps must be an integer from 1 to {origin_steps}, got {steps!r} "
                         "(the official settings are 4 to 16).")
    c = num_timesteps // origin_steps
    origin = [k * c - 1 for k in range(1, origin_steps + 1)]
    return origin[::-(origin_steps // steps)][:steps]


def boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency parameterisation at timestep t."""
    scaled = t * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
    return c_skip, c_out


def turbo_step(x: torch.Tensor, eps: torch.Tensor, t: int, a_t: float, a_next: float,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: (x_next, denoised). noise None gives x_next = denoised (a single-step run)."""
    c_skip, c_out = boundary_scalings(t)
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised, denoised
    return math.sqrt(a_next) * denoised + math.sqrt(1.0 - a_next) * noise, denoised


def motion_guidance_at(t: float, motion_guidance: float, percentage: float, num_timesteps: int = 1000) -> float:
    """v2: the motion guidance at timestep t: m on the first `percentage` of the schedule, else 0."""
    return motion_guidance if t >= num_timesteps * (1.0 - percentage) else 0.0


@torch.no_grad()
def sample_turbo(
    unet: Callable,
    schedule: Schedule,
    x_T: torch.Tensor,
    context: torch.Tensor,
    *,
    fps=16,
    steps: int = 4,
    guidance=7.5,
    generator: torch.Generator | None = None,
    noises=None,
    motion_guidance: float | None = None,
    motion_percentage: float = 0.5,
    callback: Callable | None = None,
    dtype: torch.dtype | None = None,
    temporal_window: int | None = None,
    temporal_stride: int = DEFAULT_STRIDE,
) -> torch.Tensor:
    """Run the T2V-Turbo sampler from x_T [B,C,T,h,w] -> the final latent (float32).

    unet(x, t, context, fps=..., guidance=w, motion_guidance=m) -> eps: a U-Net with T2V-Turbo applied.
    context [B or 1, L, D] text tokens (no unconditional: Turbo has no CFG). fps: int or [B] (official 16
    for v1, 8 for v2). guidance: w, a number or [B]. generator: source of the per-step noise (on its device;
    CPU without one), drawn like the official scheduler: at every step, the last included, when steps > 1.
    noises: replaces those draws, a list (or tensor) with one noise like x_T per step (the last may be left
    out). motion_guidance: v2's m (None: no motion path), given on the first `motion_percentage` of the
    schedule and 0 after. callback(i, total, x_next, denoised) after every step; raising from it aborts.
    dtype: what the U-Net computes in; its inputs are cast to it (None: the U-Net's `dtype` attribute, else
    the latent's). The latent stays float32; eps is cast to it. temporal_window / temporal_stride: passed to
    every U-Net call when a window is given (FreeNoise windowed temporal attention, `vc_model.freenoise`).
    """
    x = x_T.float() if x_T.dtype in (torch.float16, torch.bfloat16) else x_T
    b, device = x.shape[0], x.device
    dtype = dtype or getattr(unet, "dtype", None) or x.dtype
    timesteps = turbo_timesteps(steps, schedule.num_timesteps)
    if noises is not None and not steps - 1 <= len(noises) <= steps:
        raise ValueError(f"noises must hold one noise per step ({steps}, or {steps - 1} without the unused last one), "
                         f"got {len(noises)}.")
    ac = schedule.alphas_cumprod.double().tolist()
    context = _batch(context.to(device, dtype), b, "context")
    fps = _fps_tensor(fps, b, device)
    if isinstance(guidance, torch.Tensor):
        guidance = _batch(guidance.reshape(-1).to(device), b, "guidance")
    window = {} if temporal_window is None else {"temporal_window": temporal_window, "temporal_stride": temporal_stride}
    denoised = x
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < steps else t
        ts = torch.full((b,), t, dtype=torch.long, device=device)
        m = None if motion_guidance is None else motion_guidance_at(t, motion_guidance, motion_percentage,
                                                                    schedule.num_timesteps)
        eps = unet(x.to(dtype), ts, context, fps=fps, guidance=guidance, motion_guidance=m, **window).to(x.dtype)
        noise = None
        if steps > 1:
            if noises is not None:
                noise = noises[i].to(device, x.dtype) if i < len(noises) else torch.zeros_like(x)
            else:
                noise = _randn(x.shape, generator, device).to(x.dtype)
        x, denoised = turbo_step(x, eps, t, ac[t], ac[t_next], noise)
        if callback is not None:
            callback(i, steps, x, denoised)
    return denoised
