"""FreeNoise (AILab-CVC/FreeNoise): longer videos from the 16-frame models without training.

Three pieces, each a pure function here; the U-Net, the sampler and the pipeline call them.

* Windowed temporal attention (`window_plan`, `windowed_attention`). For F frames, windows of W
  frames start every S frames (0, S, ..., F - W); when F - W is not a multiple of S a last window
  ends at frame F, so every frame is covered (the official code needs F = W + kS). Attention runs
  inside each window; each window's output is weighted per frame by the triangle
  [1, 2, ..., W/2, W/2, ..., 2, 1] (odd W: 1, ..., (W+1)/2, ..., 1), summed, and each frame divided
  by its summed weight. F <= W is plain attention (identical to the model without windows).
* Noise rescheduling (`reschedule_noise`). Frames 0..W-1 keep the drawn noise; then, in order, for
  i = W, W+S, ... < F, frames [i, i+S) become a random permutation of frames [i-W, i-W+S). A last
  block shorter than S (F - W not a multiple of S) is a permutation of the as many frames W earlier.
* Prompt travel (`travel_embeddings`, `per_frame_step`). K prompts share the frames as K holds and
  K-1 linear ramps between neighbouring text embeddings; the official two-prompt rule is the K = 2
  case. During the steps where `per_frame_step` is False the input and middle blocks' cross-attention
  use the last prompt for every frame; the output blocks always use the per-frame embeddings, and the
  unconditional pass is unchanged.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

DEFAULT_WINDOW = 16  # frames the models were trained on
DEFAULT_STRIDE = 4
# transformer_options keys (ComfyUI's per-call dict, handed down the U-Net) of the temporal window
WINDOW_OPTION = "temporal_window"
STRIDE_OPTION = "temporal_stride"

# Official prompt-travel step rule: DDIM step i (0 = the noisiest) of 50 uses the per-frame
# embeddings in the input and middle blocks when 5 <= i <= 15, the last prompt otherwise.
# For other step counts the same fractions of the run are used.
PER_FRAME_STEPS = (5, 15, 50)


def check_window(window: int, stride: int) -> None:
    """ValueError with one sentence unless window and stride are whole numbers with 1 <= stride <= window."""
    for name, value in (("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"The temporal {name} must be a whole number of frames >= 1, got {value!r}.")
    if stride > window:
        raise ValueError(f"The temporal stride ({stride}) must not exceed the window ({window}): frames between "
                         "windows would be left out.")


def triangle_weights(n: int) -> list[int]:
    """FreeNoise's per-frame weights of an n-frame window: [1, ..., n/2, n/2, ..., 1] for even n,
    [1, ..., (n+1)/2, ..., 1] for odd n."""
    half = (n + 1) // 2
    rising = list(range(1, half + 1))
    return rising + rising[::-1][n % 2:]


def window_starts(frames: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> list[int]:
    """First frame of every window: 0, S, ..., F - W, plus F - W when the stride does not land on it.
    [0] when frames <= window (one window: plain attention)."""
    check_window(window, stride)
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


class WindowPlan(NamedTuple):
    """Windows of one frame count: `starts` (each window is [s, s + length)) and `weights`
    [windows, length] float32, the triangle divided by each frame's summed weight (the per-frame
    sum over windows is 1)."""

    starts: list[int]
    length: int
    weights: torch.Tensor


def window_plan(frames: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> WindowPlan | None:
    """The FreeNoise windows for `frames`, or None when frames <= window (plain attention)."""
    starts = window_starts(frames, window, stride)
    if frames <= window:
        return None
    triangle = torch.tensor(triangle_weights(window), dtype=torch.float32)
    count = torch.zeros(frames, dtype=torch.float32)
    for s in starts:
        count[s:s + window] += triangle
    weights = torch.stack([triangle / count[s:s + window] for s in starts])
    return WindowPlan(starts, window, weights)


def windowed_attention(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       window: int | None, stride: int = DEFAULT_STRIDE) -> torch.Tensor:
    """FreeNoise window fusion of self-attention over the frame axis.

    q, k, v: [..., F, d] with the frames on the second-to-last axis (e.g. [B, heads, F, d]).
    attend(q, k, v) -> [..., n, e] is the attention itself on n frames (with whatever relative
    positions it adds for length n); it is called once per window on slices of n = window frames.
    window None, or F <= window: attend(q, k, v) on all frames. Returns [..., F, e] in attend's dtype.
    """
    frames = q.shape[-2]
    plan = None if window is None else window_plan(frames, window, stride)
    if plan is None:
        return attend(q, k, v)
    out = None
    for start, weight in zip(plan.starts, plan.weights):
        end = start + plan.length
        part = attend(q[..., start:end, :], k[..., start:end, :], v[..., start:end, :])
        if out is None:
            out = part.new_zeros(*part.shape[:-2], frames, part.shape[-1])
        out[..., start:end, :] += part * weight.to(part.device, part.dtype)[:, None]
    return out


def reschedule_noise(noise: torch.Tensor, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """FreeNoise noise rescheduling. noise [B, C, F, h, w] -> a new tensor of the same shape.

    Frames 0..window-1 are kept; then, in order, for i = window, window+stride, ... < F, frames
    [i, i+stride) become a random permutation (`torch.randperm` from `generator`, on its device) of frames
    [i-window, i-window+stride) of the result so far; a last block of r < stride frames is a
    permutation of frames [i-window, i-window+r). The same generator state gives the same result;
    every video of the batch gets the same permutation (as officially).
    """
    check_window(window, stride)
    if noise.ndim != 5:
        raise ValueError(f"reschedule_noise expects noise [B, C, frames, h, w], got shape {list(noise.shape)}.")
    out = noise.clone()
    frames = out.shape[2]
    source = generator.device if generator is not None else torch.device("cpu")
    for i in range(window, frames, stride):
        n = min(stride, frames - i)
        order = torch.randperm(n, generator=generator, device=source) + (i - window)
        out[:, :, i:i + n] = out[:, :, order.to(out.device)]
    return out


def travel_segments(frames: int, prompts: int) -> list[tuple[int, int, int]]:
    """How K prompts share F frames: [(first prompt index, next prompt index, length), ...] in frame order.

    Holds (k, k, n) and ramps (k, k+1, n) alternate: hold 0, ramp 0->1, hold 1, ..., hold K-1. Every
    hold has floor(3F / (5K - 2)) frames; the ramps share the rest, the earlier ramps one frame more when
    it does not divide evenly. K = 2 is the official rule: floor(3F/8) frames of the first prompt,
    F - 2 floor(3F/8) of the blend, floor(3F/8) of the second.
    """
    if prompts < 1:
        raise ValueError("Prompt travel needs at least one prompt.")
    if frames < prompts:
        raise ValueError(f"Prompt travel over {prompts} prompts needs at least {prompts} frames, got {frames}.")
    hold = 3 * frames // (5 * prompts - 2)
    ramp_total = frames - prompts * hold
    segments = []
    for k in range(prompts):
        segments.append((k, k, hold))
        if k < prompts - 1:
            base, extra = divmod(ramp_total, prompts - 1)
            segments.append((k, k + 1, base + (1 if k < extra else 0)))
    return [s for s in segments if s[2] > 0]


def travel_embeddings(embeddings: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-frame text embeddings of prompt travel. embeddings [K, L, D] (one per prompt, in order)
    -> [F, L, D].

    A hold repeats its prompt's embedding; a ramp of n frames from prompt a to b gives
    e_a + (e_b - e_a) / (n - 1) * j for j = 0..n-1 (both ends included, as officially); a one-frame ramp
    is the midpoint (the official code divides by zero there).
    """
    if embeddings.ndim != 3:
        raise ValueError(f"Prompt travel expects one embedding per prompt [K, L, D], got shape {list(embeddings.shape)}.")
    rows = []
    for a, b, n in travel_segments(frames, embeddings.shape[0]):
        first, last = embeddings[a], embeddings[b]
        if a == b:
            rows.append(first.expand(n, *first.shape))
        elif n == 1:
            rows.append((first + (last - first) * 0.5)[None])
        else:
            step = (last - first) / (n - 1)
            j = torch.arange(n, device=embeddings.device, dtype=embeddings.dtype)
            rows.append(first[None] + step[None] * j[:, None, None])
    return torch.cat(rows)


def per_frame_step(step: int, steps: int) -> bool:
    """Prompt travel: whether sampling step `step` (0 = the first, noisiest) of `steps` uses the per-frame
    embeddings in the input and middle blocks (else the last prompt there). Officially steps 5..15 of 50."""
    low, high, total = PER_FRAME_STEPS
    return low * steps <= step * total <= high * steps
