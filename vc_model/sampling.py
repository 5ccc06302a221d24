"""The official DDIM sampler with classifier-free guidance, as small pure functions.

Faithful to the official `DDIMSampler` (uniform timesteps offset by +1, the last step's `a_prev` is
alphas_cumprod[0] and not 1, `use_scale` division/multiplication, eta default 1), with two deliberate
differences that do not change the maths:

* cond and uncond run as ONE U-Net call on a 2B batch (cond first) instead of two calls;
* the per-step noise z comes from the caller's `generator` and is drawn only when sigma > 0. The
  official sampler also draws (and multiplies by 0) at eta = 0, consuming torch's global RNG; our RNG
  stream is our own, so bit-exact reproduction of the official seeds is not a goal.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from .schedule import Schedule

DEFAULT_FPS = 16  # the U-Net's own default conditioning fps


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The official "uniform" DDIM timesteps, ascending: range(0, T, T // steps) + 1.

    Can hold more than `steps` entries when T % steps != 0 (steps=30 -> 31, as the official code).
    When the stride divides T - 1 (steps 3, 9, 27, 36, 37, 101..111, 250..333, 501..1000) the last
    entry would be T, past the end of the schedule: the official sampler fails there with an
    IndexError; we use T - 1 instead.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be an integer from 1 to {num_timesteps}, got {steps!r}.")
    stride = num_timesteps // steps
    return [min(t + 1, num_timesteps - 1) for t in range(0, num_timesteps, stride)]


class DDIMCoefficients(NamedTuple):
    """Per-step schedule scalars (python floats, float64 maths from the float32 tables)."""

    timestep: int  # what the U-Net receives
    a_t: float
    a_prev: float
    sigma: float
    scale_t: float
    scale_prev: float

    @property
    def sqrt_one_minus_a_t(self) -> float:
        return math.sqrt(1.0 - self.a_t)


def ddim_coefficients(schedule: Schedule, timesteps: Sequence[int], eta: float) -> list[DDIMCoefficients]:
    """Coefficients for every step in run order (largest timestep first).

    `timesteps` ascending, as `ddim_timesteps` gives them. For the first timestep (the last step)
    a_prev = alphas_cumprod[0] and scale_prev = scale_arr[0], like the official tables.
    """
    ac = schedule.alphas_cumprod.double().tolist()
    sa = schedule.scale_arr.double().tolist() if schedule.scale_arr is not None else None
    out = []
    for index in reversed(range(len(timesteps))):
        t = int(timesteps[index])
        t_prev = int(timesteps[index - 1]) if index > 0 else 0
        a_t, a_prev = ac[t], ac[t_prev]
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        scale_t, scale_prev = (sa[t], sa[t_prev]) if sa is not None else (1.0, 1.0)
        out.append(DDIMCoefficients(t, a_t, a_prev, sigma, scale_t, scale_prev))
    return out


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, c: DDIMCoefficients, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update. x, eps [B,C,T,h,w]; noise like x (needed when c.sigma > 0).

    Returns (x_prev, pred_x0); pred_x0 is already divided by scale_t (what the official one returns).
    """
    pred_x0 = (x - c.sqrt_one_minus_a_t * eps) / math.sqrt(c.a_t)
    pred_x0 = pred_x0 / c.scale_t
    direction = math.sqrt(max(1.0 - c.a_prev - c.sigma**2, 0.0)) * eps
    x_prev = (math.sqrt(c.a_prev) * c.scale_prev) * pred_x0 + direction
    if c.sigma > 0:
        if noise is None:
            raise ValueError("ddim_step needs noise when sigma > 0 (eta > 0).")
        x_prev = x_prev + c.sigma * noise
    return x_prev, pred_x0


def guided_eps(e_cond: torch.Tensor, e_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance, official form: e_u + cfg * (e_c - e_u)."""
    return e_uncond + cfg * (e_cond - e_uncond)


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 N(0, 1) drawn on the generator's device (CPU without one), then moved to `device`."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def _batch(value: torch.Tensor, b: int, name: str) -> torch.Tensor:
    """Broadcast a batch-1 tensor to batch b; anything else must already have batch b."""
    if value.shape[0] == b:
        return value
    if value.shape[0] == 1:
        return value.expand(b, *value.shape[1:])
    raise ValueError(f"{name} has batch {value.shape[0]}, the latent has batch {b}.")


def _fps_tensor(fps, b: int, device: torch.device) -> torch.Tensor:
    """fps (None -> 16, int, or [B] / [1] tensor) as a LongTensor [b]."""
    if fps is None:
        fps = DEFAULT_FPS
    if isinstance(fps, torch.Tensor):
        return _batch(fps.reshape(-1).to(device=device, dtype=torch.long), b, "fps")
    return torch.full((b,), int(fps), dtype=torch.long, device=device)


@torch.no_grad()
def sample_ddim(
    model: Callable,
    schedule: Schedule,
    noise: torch.Tensor | None,
    context: torch.Tensor,
    uncond_context: torch.Tensor | None = None,
    *,
    image_context: torch.Tensor | None = None,
    uncond_image_context: torch.Tensor | None = None,
    fps=None,
    steps: int = 50,
    cfg: float = 12.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run DDIM from noise to a clean latent [B,C,T,h,w] (float32 or wider).

    model(x, t, context, fps=..., image_context=...) -> eps, the `UNet3D.forward` signature.
    noise: x_T [B,C,T,h,w]. When None, `shape` is required and x_T is drawn from `generator` (on the
    generator's device, CPU without one) and moved to `context`'s device.
    context [B,L,D] text tokens; uncond_context [B or 1,L,D]: with it and cfg != 1 each step makes one
    2B model call (cond first, then uncond) and eps = e_u + cfg * (e_c - e_u); otherwise a single
    conditional call. image_context / uncond_image_context [B,N,D] (I2V) follow the same layout.
    fps: None (-> 16), int, or LongTensor [B]. eta scales the per-step noise (official default 1).
    generator: source of the per-step noise, drawn only on steps with sigma > 0.
    callback(i, total, x, pred_x0) runs after every step; raising from it aborts the run.
    dtype: what the model computes in; its inputs (latent, contexts) are cast to it. None: the
    model's `dtype` attribute when it has one (`UNet3D.dtype`, its weights' dtype), else the latent's.
    The latent is kept in float32 (half noise is upcast); eps is cast to it.
    """
    if noise is None:
        if shape is None:
            raise ValueError("sample_ddim needs `noise` or a `shape` to draw it from.")
        noise = _randn(tuple(shape), generator, context.device)
    x = noise.float() if noise.dtype in (torch.float16, torch.bfloat16) else noise
    b, device = x.shape[0], x.device
    dtype = dtype or getattr(model, "dtype", None) or x.dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"sample_ddim: dtype must be a torch.dtype, got {dtype!r}.")

    timesteps = ddim_timesteps(steps, schedule.num_timesteps)
    coefficients = ddim_coefficients(schedule, timesteps, eta)

    guided = uncond_context is not None and cfg != 1.0
    context = _batch(context.to(device, dtype), b, "context")
    if image_context is not None:
        image_context = _batch(image_context.to(device, dtype), b, "image_context")
    fps_b = _fps_tensor(fps, b, device)
    if guided:
        context = torch.cat([context, _batch(uncond_context.to(context), b, "uncond_context")])
        if image_context is not None:
            if uncond_image_context is None:
                raise ValueError("image_context with guidance needs an uncond_image_context too.")
            uncond_image = _batch(uncond_image_context.to(image_context), b, "uncond_image_context")
            image_context = torch.cat([image_context, uncond_image])
        fps_b = torch.cat([fps_b, fps_b])
    n = fps_b.shape[0]

    total = len(coefficients)
    for i, c in enumerate(coefficients):
        t = torch.full((n,), c.timestep, dtype=torch.long, device=device)
        x_in = (torch.cat([x, x]) if guided else x).to(dtype)
        eps = model(x_in, t, context, fps=fps_b, image_context=image_context).to(x.dtype)
        if guided:
            e_cond, e_uncond = eps.chunk(2)
            eps = guided_eps(e_cond, e_uncond, cfg)
        z = _randn(x.shape, generator, device).to(x.dtype) if c.sigma > 0 else None
        x, pred_x0 = ddim_step(x, eps, c, z)
        if callback is not None:
            callback(i, total, x, pred_x0)
    return x
