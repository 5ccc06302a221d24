"""Host-free helpers of the long-video nodes (FreeNoise windows, rescheduled noise, prompt travel).

No ComfyUI import. What rides where:

* `transformer_options["temporal_window"]` / `["temporal_stride"]` (set on the MODEL by VideoCrafter Long
  Video): the U-Net's windowed temporal attention, for every sampler.
* The prompt-travel conditioning: `cross_attn` is the last prompt's tokens [1, L, D] (what samplers and
  models that know nothing of prompt travel see) and `TRAVEL_KEY` holds every prompt's tokens [K, L, D].
  At sampling, `VideoCrafterModel.extra_conds` turns them into the per-frame tokens of the latent's frame
  count, `frame_context` [B, L, T, D]: frames on axis 2 like the latent, so the core context-window
  handler slices them with the latent.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

from ..vc_model.freenoise import check_window, per_frame_step, travel_embeddings

TRAVEL_KEY = "videocrafter_prompt_travel"
MAX_WINDOW = 256


def window_problem(window, stride) -> str | None:
    """None when (window, stride) are usable FreeNoise settings (None values: linked inputs, checked later)."""
    if window is None or stride is None:
        return None
    try:
        check_window(window, stride)
    except ValueError as error:
        return str(error)
    if window > MAX_WINDOW:
        return f"The temporal window must be at most {MAX_WINDOW} frames, got {window}."
    return None


def travel_prompts(text: str) -> list[str]:
    """The prompts of a prompt-travel text box: one per line, blank lines and surrounding spaces ignored."""
    prompts = [line.strip() for line in str(text).splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError("Prompt travel needs at least one prompt: write one prompt per line.")
    return prompts


def stack_prompt_tokens(tokens: list[torch.Tensor]) -> torch.Tensor:
    """Each prompt's CLIP tokens [1, L, D] -> [K, L, D]; every prompt must give the same token count."""
    lengths = [t.shape[1] for t in tokens]
    if len(set(lengths)) > 1:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"Prompt travel blends the prompts token by token, so each must fit in one 77-token chunk; "
                         f"prompt {longest + 1} is longer ({lengths[longest]} tokens): shorten it.")
    return torch.cat([t[:1] for t in tokens])


def frame_context(travel: torch.Tensor, frames: int) -> torch.Tensor:
    """Every prompt's tokens [K, L, D] -> the per-frame tokens [1, L, frames, D] of prompt travel."""
    return rearrange(travel_embeddings(travel, frames), "t l d -> 1 l t d")


def sampling_step(transformer_options: dict) -> tuple[int, int] | None:
    """(index of this model call's sigma in the run's sigmas, number of steps), or None when unknown.

    ComfyUI puts the run's sigmas in `sample_sigmas` and the current ones in `sigmas`. Samplers that
    evaluate between two sigmas get the step of the nearest one (in log sigma).
    """
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None or len(sample_sigmas) < 2:
        return None
    table = sample_sigmas.detach().float().cpu()
    sigma = float(sigmas.detach().reshape(-1)[0].float().cpu())
    positive = table > 0
    if sigma <= 0 or not bool(positive.any()):
        return None
    distance = (table[positive].log() - math.log(sigma)).abs()
    index = int(torch.nonzero(positive)[int(distance.argmin())])
    return index, len(table) - 1


def unet_text_arguments(context: torch.Tensor, frame_tokens: torch.Tensor | None, transformer_options: dict) -> dict:
    """The U-Net's text keywords for one call: `context` alone, or with prompt travel the per-frame tokens
    (frame_tokens [B, L, T, D] -> context [B, T, L, D]) and, outside FreeNoise's per-frame steps, the last
    prompt (`context`) as `down_context` for the input and middle blocks."""
    if frame_tokens is None:
        return {"context": context}
    per_frame = rearrange(frame_tokens, "b l t d -> b t l d").to(context.dtype)
    step = sampling_step(transformer_options)
    uses_last = step is not None and not per_frame_step(*step)
    return {"context": per_frame, "down_context": context if uses_last else None}

