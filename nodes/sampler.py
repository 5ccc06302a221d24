"""The official VideoCrafter DDIM as a ComfyUI SAMPLER, and the sampling behind VideoCrafter Sampler.

Runs through `comfy.sample.sample_custom`, so CFG, model management, previews, the progress bar and
interrupts are ComfyUI's own.
"""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

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
    sampling = model.get_model_object("model_sampling")
    sigmas = vs.official_ddim_sigmas(sampling.log_sigmas.cpu(), steps)
    noise = comfy.sample.prepare_noise(samples, seed)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = comfy.sample.sample_custom(model, noise, cfg, ddim_sampler(eta), sigmas, positive, negative, samples,
                                     noise_mask=latent.get("noise_mask"), callback=callback,
                                     disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result["samples"] = vs.official_latent(out, sigmas[-1:], sampling.log_sigmas, sampling.signal_scales)
    return result
