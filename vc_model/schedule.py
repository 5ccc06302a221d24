"""The diffusion noise schedule (the checkpoint's top-level buffers) and `use_scale` signal scaling.

The official model registers twelve float32 schedule buffers of length `timesteps` (computed in
float64, stored in float32) and, for the `use_scale` models, a `scale_arr` buffer. Sampling only needs
`alphas_cumprod` and `scale_arr`; the others are produced here so random checkpoints can be written in
the official layout and real ones checked strictly.

    betas  = linspace(sqrt(linear_start), sqrt(linear_end), T, float64) ** 2
    alphas_cumprod = cumprod(1 - betas)                          (float64, then stored as float32)
    scale_arr = cat(linspace(scale_a, scale_b, mid_step), full(n, scale_b)),  n = T - mid_step or T
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ScheduleConfig

SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _betas(cfg: ScheduleConfig) -> torch.Tensor:
    """float64 [timesteps]: the LDM "linear" schedule (linear in sqrt(beta))."""
    root = torch.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=torch.float64)
    return root**2


def _scale_arr(cfg: ScheduleConfig) -> torch.Tensor | None:
    """float64 [cfg.scale_arr_len] or None when the model does not use signal scaling."""
    if not cfg.use_scale:
        return None
    ramp = torch.linspace(cfg.scale_a, cfg.scale_b, cfg.mid_step, dtype=torch.float64)
    flat = torch.full((cfg.scale_arr_len - cfg.mid_step,), cfg.scale_b, dtype=torch.float64)
    return torch.cat([ramp, flat])


def schedule_buffers(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    """All top-level schedule buffers with the official values: float32 tensors on the CPU.

    The twelve `SCHEDULE_BUFFERS` (each [timesteps]) plus `scale_arr` when `cfg.use_scale`.
    """
    betas = _betas(cfg)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    scale = _scale_arr(cfg)
    if scale is not None:
        out["scale_arr"] = scale
    return {name: value.to(torch.float32) for name, value in out.items()}


def schedule_buffer_shapes(cfg: ScheduleConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every top-level buffer a checkpoint with this schedule holds."""
    shapes = {name: (cfg.timesteps,) for name in SCHEDULE_BUFFERS}
    if cfg.use_scale:
        shapes["scale_arr"] = (cfg.scale_arr_len,)
    return shapes


@dataclass
class Schedule:
    """What the sampler needs: `alphas_cumprod` float32 [timesteps] and `scale_arr` float32 [n] or None.

    Both live on the CPU; the sampler reads per-step scalars from them.
    """

    alphas_cumprod: torch.Tensor
    scale_arr: torch.Tensor | None = None

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def use_scale(self) -> bool:
        return self.scale_arr is not None

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "Schedule":
        buffers = schedule_buffers(cfg)
        return cls(buffers["alphas_cumprod"], buffers.get("scale_arr"))

    @classmethod
    def from_buffers(cls, cfg: ScheduleConfig, buffers: dict[str, torch.Tensor]) -> "Schedule":
        """The schedule stored in a checkpoint (`buffers` may hold other keys too; they are ignored).

        Uses the checkpoint's `alphas_cumprod` and, when `cfg.use_scale`, its `scale_arr`. Buffers
        stored in half precision are too coarse for sampling (1 - alphas_cumprod[0] is 0.00085): when
        they agree with `cfg` at half precision the exact float32 values from `cfg` are used instead.
        Raises ValueError when a needed buffer is missing or has the wrong length.
        """
        shapes = schedule_buffer_shapes(cfg)
        exact = schedule_buffers(cfg)
        picked = {}
        for name in ("alphas_cumprod", "scale_arr"):
            if name not in shapes:
                continue
            if name not in buffers:
                raise ValueError(f"The checkpoint has no '{name}' schedule buffer.")
            value = buffers[name].detach()
            if tuple(value.shape) != shapes[name]:
                raise ValueError(
                    f"The checkpoint's '{name}' has shape {list(value.shape)}, expected {list(shapes[name])}."
                )
            value = value.to(device="cpu")
            if value.dtype in _LOW_PRECISION and torch.allclose(value.float(), exact[name], atol=4e-3, rtol=0):
                value = exact[name]
            picked[name] = value.to(torch.float32).clone()
        return cls(picked["alphas_cumprod"], picked.get("scale_arr"))
