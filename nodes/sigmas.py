"""VideoCrafter's `use_scale` schedule in ComfyUI's sigma space, and the official DDIM as a sampler.

No ComfyUI import here: `model.py`'s ModelSampling and `sampler.py`'s KSAMPLER and VideoCrafter
Sampler are one-line calls of these functions, so the host-free tests run exactly this code against
`vc_model.sample_ddim`; the host tests run the ComfyUI classes themselves.

VideoCrafter trains on x_t = sqrt(a_t) * s_t * x0 + sqrt(1 - a_t) * eps, with a_t = alphas_cumprod[t]
and s_t = scale_arr[t] (1 without `use_scale`). Dividing by sqrt(a_t) * s_t gives ComfyUI's
variance-exploding form y = x0 + sigma' * eps with

    sigma'_t = sigma_t / s_t,   sigma_t = sqrt((1 - a_t) / a_t)                (the sigma table)
    model input x_t = y * s_t / sqrt(1 + (sigma'_t * s_t)^2)                    (input_scale)
    denoised = y - sigma' * eps                                                  (plain EPS)

sigma' still grows with t (sigma grows, s shrinks), so every ComfyUI scheduler works on the table.
s is looked up by interpolating t in log sigma' (exact on the table's own values). DDIM at eta 0 is
then exactly Euler on sigma' (what ComfyUI's `ddim`/`euler` samplers do); `sample_videocrafter_ddim`
also reproduces the official eta > 0 update.
"""
from __future__ import annotations

import math

import torch

from ..vc_model.sampling import ddim_timesteps


def sigma_tables(alphas_cumprod: torch.Tensor, scale_arr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas_cumprod [T], scale_arr [>= T] or None -> (sigma' [T], s [T]), both float32.

    The official `scale_arr` can be 1400 long (the "scale bug"); only its first T entries are used.
    """
    ac = alphas_cumprod.detach().to("cpu", torch.float64)
    steps = ac.shape[0]
    if scale_arr is None:
        scale = torch.ones(steps, dtype=torch.float64)
    else:
        scale = scale_arr.detach().to("cpu", torch.float64)[:steps]
        if scale.shape[0] != steps:
            raise ValueError(f"scale_arr has {scale.shape[0]} entries, the schedule {steps}.")
    sigma = ((1.0 - ac) / ac).sqrt()
    return (sigma / scale).float(), scale.float()


def interpolate_scale(sigma: torch.Tensor, log_sigmas: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Signal scale s for each sigma' (any shape): t interpolated linearly in log sigma'.

    Exact at the table's values; s(sigma' <= table[0]) = scales[0] (1), s(sigma' >= table[-1]) = scales[-1].
    """
    log_sigmas = log_sigmas.to(sigma.device)
    scales = scales.to(sigma.device)
    flat = sigma.reshape(-1).float().clamp(min=1e-30).log()
    hi = torch.searchsorted(log_sigmas, flat).clamp(1, log_sigmas.shape[0] - 1)
    lo = hi - 1
    w = ((flat - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0.0, 1.0)
    s = scales[lo] * (1.0 - w) + scales[hi] * w
    return s.reshape(sigma.shape)


def input_scale(sigma: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Factor from y to the U-Net input x_t: s / sqrt(1 + (sigma' s)^2) = sqrt(a_t) * s_t."""
    return s / ((sigma * s) ** 2 + 1.0).sqrt()


def pure_noise_scale(sigma: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y of unit-variance noise x_T at level sigma': sqrt(1 + (sigma' s)^2) / s = 1 / input_scale."""
    return ((sigma * s) ** 2 + 1.0).sqrt() / s


def per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """sigma [B] (or one value) shaped to broadcast over a latent of `ndim` dims (ComfyUI's convention)."""
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


def model_input(sigma: torch.Tensor, y: torch.Tensor, log_sigmas: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """ComfyUI's y = x0 + sigma' eps -> the U-Net input x_t = sqrt(a_t) s_t x0 + sqrt(1 - a_t) eps."""
    sigma = per_sample(sigma, y.ndim)
    return y * input_scale(sigma, interpolate_scale(sigma, log_sigmas, scales))


def noised_latent(sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor | None,
                  log_sigmas: torch.Tensor, scales: torch.Tensor, max_denoise: bool = False) -> torch.Tensor:
    """The starting y for sampling from `sigma` (ComfyUI's `noise_scaling`).

    From an empty (all-zero or missing) latent, or with max_denoise, the start is the official pure
    noise x_T = N(0, I) in model space, i.e. y = noise / input_scale; otherwise EPS's
    latent + sigma' * noise (img2img from an encoded video).
    """
    sigma = per_sample(sigma, noise.ndim)
    empty = latent_image is None or not bool(torch.any(latent_image != 0))
    if max_denoise or empty:
        noise = noise * pure_noise_scale(sigma, interpolate_scale(sigma, log_sigmas, scales))
    else:
        noise = noise * sigma
    return noise if latent_image is None else noise + latent_image


def official_latent(y: torch.Tensor, sigma: torch.Tensor, log_sigmas: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y at the level `sigma` -> the model-space latent the official sampler returns there.

    The official DDIM stops at the t=0 level and returns x = y * sqrt(alphas_cumprod[0]) * s_0."""
    sigma = sigma.reshape(-1)[:1]
    return y * float(input_scale(sigma, interpolate_scale(sigma, log_sigmas, scales)).item())


def official_ddim_sigmas(log_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """Sigmas of the official DDIM timesteps for `steps`, ending on the t=0 level like the official last step."""
    return ddim_sigmas(log_sigmas, ddim_timesteps(steps, int(log_sigmas.shape[0])), final_level=True)


def ddim_sigmas(log_sigmas: torch.Tensor, timesteps: list[int], final_level: bool) -> torch.Tensor:
    """Descending sigmas for the official DDIM timesteps (ascending list, e.g. 1, 21, ..., 981).

    final_level=True ends on the table's t=0 value, like the official last step (whose a_prev is
    alphas_cumprod[0], not 1); False ends on 0 (a clean x0), like ComfyUI's `ddim_uniform`.
    """
    table = log_sigmas.exp()
    out = [float(table[t]) for t in reversed(timesteps)]
    out.append(float(table[0]) if final_level else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def _find_signal_scale(model):
    """The `signal_scale(sigma)` of the ModelSampling behind ComfyUI's denoiser wrappers, if any."""
    inner = model
    for _ in range(6):
        sampling = getattr(inner, "model_sampling", None)
        if sampling is not None:
            return getattr(sampling, "signal_scale", None)
        inner = getattr(inner, "inner_model", None)
        if inner is None:
            break
    return None


def seeded_noise_sampler(x: torch.Tensor, seed: int | None):
    """Per-step N(0, 1) noise like x, from a generator seeded with `seed` (global RNG when None)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))

    def draw(sigma, sigma_next):
        return torch.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return draw


@torch.no_grad()
def sample_videocrafter_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                             noise_sampler=None):
    """The official VideoCrafter DDIM update (with `use_scale`) as a k-diffusion style sampler.

    model(x, sigma * ones[B], **extra_args) -> denoised, x and the result in y = x0 + sigma' eps form.
    Per step, with a = 1 / (1 + (sigma' s)^2) at this and the next sigma:
        eps = (x - denoised) / sigma'
        sigma_eta = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x_prev = denoised + (sqrt(1 - a_prev - sigma_eta^2) * eps + sigma_eta * z) / (sqrt(a_prev) * s_prev)
    which is the official x-space update divided by sqrt(a_prev) * s_prev. A next sigma of 0 returns
    the denoised latent. s comes from the model's ModelSampling (`signal_scale`), or is 1 for models
    without one (plain DDIM). z comes from `noise_sampler` or a generator seeded with extra_args["seed"].
    """
    extra_args = {} if extra_args is None else extra_args
    signal_scale = _find_signal_scale(model)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])

    def scale_of(sigma: float) -> float:
        if signal_scale is None or sigma <= 0:
            return 1.0
        return float(signal_scale(torch.tensor([sigma], dtype=torch.float32)).item())

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma_next <= 0:
            x = denoised
            continue
        eps = (x - denoised) / sigma
        s_t, s_prev = scale_of(sigma), scale_of(sigma_next)
        a_t = 1.0 / (1.0 + (sigma * s_t) ** 2)
        a_prev = 1.0 / (1.0 + (sigma_next * s_prev) ** 2)
        sigma_eta = eta * math.sqrt(max((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev), 0.0))
        direction = math.sqrt(max(1.0 - a_prev - sigma_eta**2, 0.0))
        k = math.sqrt(a_prev) * s_prev
        x = denoised + eps * (direction / k)
        if sigma_eta > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (sigma_eta / k)
    return x
