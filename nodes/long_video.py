"""Long videos in ComfyUI: the FreeNoise MODEL patch, rescheduled NOISE and prompt-travel conditioning.

* `long_video_model`: a clone of the MODEL whose transformer options carry the temporal window and stride
  (so every sampler's U-Net calls use FreeNoise's windowed temporal attention) and, optionally, a
  SAMPLER_SAMPLE wrapper that reschedules the starting noise of every sampler (KSampler, SamplerCustom,
  SamplerCustomAdvanced, VideoCrafter Sampler) from the sampler's seed.
* `RescheduledNoise`: a NOISE for SamplerCustomAdvanced, ComfyUI's seeded noise then rescheduled.
* `travel_conditioning`: one CONDITIONING for a video that travels through several prompts.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension
import comfy.sample

from ..vc_model.freenoise import STRIDE_OPTION, WINDOW_OPTION, reschedule_noise
from .conditioning import videocrafter_model
from .logic import latent_problem
from .long_video_logic import TRAVEL_KEY, stack_prompt_tokens, travel_prompts, window_problem

NOISE_WRAPPER = "videocrafter_freenoise_noise"


def _check(window: int, stride: int) -> None:
    problem = window_problem(window, stride)
    if problem:
        raise ValueError(problem)


def seeded_rescheduled(noise: torch.Tensor, window: int, stride: int, seed: int | None) -> torch.Tensor:
    """FreeNoise rescheduling of a sampler's starting noise, the permutations drawn from a CPU generator
    seeded with the sampler's seed (a random one without)."""
    problem = latent_problem(noise)
    if problem:
        raise ValueError(problem)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return reschedule_noise(noise, window, stride, generator=generator)


def _reschedule_wrapper(executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
    options = extra_args["model_options"].get("transformer_options", {})
    if options.get(WINDOW_OPTION) is not None:
        noise = seeded_rescheduled(noise, options[WINDOW_OPTION], options[STRIDE_OPTION], extra_args.get("seed"))
    return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)


def long_video_model(model, window: int, stride: int, reschedule: bool):
    """-> a MODEL with FreeNoise windowed temporal attention (and rescheduled starting noise)."""
    _check(window, stride)
    videocrafter_model(model)
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    options[WINDOW_OPTION], options[STRIDE_OPTION] = int(window), int(stride)
    kind = comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE
    patched.remove_wrappers_with_key(kind, NOISE_WRAPPER)
    if reschedule:
        patched.add_wrapper_with_key(kind, NOISE_WRAPPER, _reschedule_wrapper)
    return patched


class RescheduledNoise:
    """NOISE for SamplerCustomAdvanced: ComfyUI's noise for `seed`, then FreeNoise-rescheduled."""

    def __init__(self, seed: int, window: int, stride: int):
        _check(window, stride)
        self.seed, self.window, self.stride = seed, window, stride

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        latent = input_latent["samples"]
        noise = comfy.sample.prepare_noise(latent, self.seed, input_latent.get("batch_index"))
        return seeded_rescheduled(noise, self.window, self.stride, self.seed)


def travel_conditioning(clip, text: str):
    """One prompt per line -> a CONDITIONING: the last prompt's tokens, plus every prompt's under TRAVEL_KEY."""
    if clip is None:
        raise ValueError("No CLIP: connect the CLIP output of Load VideoCrafter Checkpoint.")
    encoded = [clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True) for prompt in travel_prompts(text)]
    tokens = stack_prompt_tokens([cond for cond, _ in encoded])
    last, pooled = encoded[-1]
    return [[last, {"pooled_output": pooled, TRAVEL_KEY: tokens}]]
