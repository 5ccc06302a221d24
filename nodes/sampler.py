"""The official VideoCrafter DDIM as a ComfyUI SAMPLER, and the sampling behind VideoCrafter Sampler.

Runs through `comfy.sample.sample_custom`, so CFG, model management, previews, the progress bar and
interrupts are ComfyUI's own.
"""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..vc_model.sampling import ddim_timesteps
from . import sigmas as vs
from .conditioning import has_image, image_count, videocrafter_model
from .guards import explain_out_of_memory, sampling_oom
from .logic import eta_problem, image_batch_problem, latent_problem, latent_size_problem, sampler_problem


def ddim_sampler(eta: float) -> comfy.samplers.KSAMPLER:
    """SAMPLER doing the official DDIM update with `use_scale` (any scheduler's sigmas)."""
    problem = eta_problem(eta)
    if problem:
        raise ValueError(problem)
    return comfy.samplers.KSAMPLER(vs.sample_videocrafter_ddim, extra_options={"eta": float(eta)})


def official_sigmas(model, steps: int):
    """Sigmas of the official DDIM timesteps, ending on the t=0 level like the official last step."""
    sampling = model.get_model_object("model_sampling")
    timesteps = ddim_timesteps(steps, int(sampling.sigmas.shape[0]))
    return vs.ddim_sigmas(sampling.log_sigmas.cpu(), timesteps, final_level=True)


def sample(model, positive, negative, latent, seed: int, steps: int, cfg: float, eta: float):
    """The official VideoCrafter DDIM: returns a LATENT like the official sampler's final x.

    Every input is checked before the model is loaded; an out-of-memory error says what to lower."""
    inner = videocrafter_model(model)
    problem = (sampler_problem(steps, cfg, eta) or latent_problem(latent["samples"])
               or latent_size_problem(latent["samples"], inner.size_multiple))
    if problem:
        raise ValueError(problem)
    if has_image(positive) != inner.is_i2v:
        raise ValueError(f"{inner.release.name} is {'image' if inner.is_i2v else 'text'}-to-video but the positive "
                         f"conditioning {'lacks' if inner.is_i2v else 'carries'} image tokens from VideoCrafter Image Encode.")
    if inner.is_i2v:
        problem = image_batch_problem(image_count(positive), latent["samples"].shape[0])
        if problem:
            raise ValueError(problem)
    with explain_out_of_memory(lambda: sampling_oom(latent["samples"].shape, inner.get_dtype())):
        return _sample(model, positive, negative, latent, seed, steps, cfg, eta)


def _sample(model, positive, negative, latent, seed, steps, cfg, eta):
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    sigmas = official_sigmas(model, steps)
    noise = comfy.sample.prepare_noise(samples, seed)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = comfy.sample.sample_custom(model, noise, cfg, ddim_sampler(eta), sigmas, positive, negative, samples,
                                     noise_mask=latent.get("noise_mask"), callback=callback,
                                     disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    # The official sampler returns x at the t=0 level, i.e. y * sqrt(alphas_cumprod[0]) * s_0.
    sampling = model.get_model_object("model_sampling")
    last = sigmas[-1:]
    out = out * float(vs.input_scale(last, sampling.signal_scale(last)).item())
    result = latent.copy()
    result["samples"] = out
    return result
