"""Running heavy work safely: out-of-memory errors that say what to lower, chunked work with interrupt points.

No ComfyUI import: the nodes pass ComfyUI's interrupt check and progress bar in as plain callables, so
tests can drive these with fakes.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable

import torch

from .logic import chunks

ADVICE_ATTRIBUTE = "videocrafter_advice"  # set on errors already explained, so nested guards pass them on


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS, XPU), or a CPU allocator failure (a plain RuntimeError)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def explained_out_of_memory(error: BaseException, doing: str, advice: str) -> torch.OutOfMemoryError:
    """A torch.OutOfMemoryError (so ComfyUI still frees its models) saying what ran out and what to lower."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    new = torch.OutOfMemoryError(f"Out of memory while {doing}: {advice}. (PyTorch: {detail})")
    setattr(new, ADVICE_ATTRIBUTE, True)
    return new


class explain_out_of_memory:
    """`with explain_out_of_memory(lambda: (doing, advice)):` re-raises an out-of-memory error inside the
    block as `explained_out_of_memory(...)`; every other error, and one already explained, passes unchanged.

    The message is built only on failure. The failed work's frames are cleared first, so the tensors they
    held are freed before ComfyUI handles the error (it unloads its models on out-of-memory).
    """

    def __init__(self, describe: Callable[[], tuple[str, str]]):
        self.describe = describe

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or getattr(error, ADVICE_ATTRIBUTE, False) or not is_out_of_memory(error):
            return False
        doing, advice = self.describe()
        new = explained_out_of_memory(error, doing, advice)
        traceback.clear_frames(tb)
        raise new from None


def map_chunks(fn: Callable[[torch.Tensor], torch.Tensor], items: torch.Tensor, size: int,
               check_interrupt: Callable[[], None] | None = None, progress: Callable[[], None] | None = None,
               describe: Callable[[int, int], tuple[str, str]] | None = None) -> torch.Tensor:
    """cat([fn(items[a:b]) for each chunk of `size` along dim 0]).

    `check_interrupt()` runs before every chunk (it raises to stop: nothing is returned, the chunks done
    so far are dropped), `progress()` after every chunk. An out-of-memory error in chunk [a, b) is
    explained with `describe(a, b) -> (doing, advice)`.
    """
    out = []
    for start, end in chunks(items.shape[0], size):
        if check_interrupt is not None:
            check_interrupt()
        if describe is None:
            out.append(fn(items[start:end]))
        else:
            with explain_out_of_memory(lambda: describe(start, end)):  # noqa: B023 - called inside this iteration
                out.append(fn(items[start:end]))
        if progress is not None:
            progress()
    return torch.cat(out)


def sampling_oom(latent_shape, weight_dtype: torch.dtype | None) -> tuple[str, str]:
    """(doing, advice) for an out-of-memory error while the U-Net runs on a latent [B, 4, T, h, w]."""
    batch, _, frames, h, w = (list(latent_shape) + [0] * 5)[:5]
    doing = f"sampling {frames} frames at {w * 8}x{h * 8} (U-Net batch {batch})"
    advice = "lower frames, width/height or batch_size in VideoCrafter Conditioning"
    if weight_dtype == torch.float32:
        advice += ", or load the checkpoint with weight_dtype fp16 or bf16 (half the weight memory)"
    return doing, advice


def coding_oom(verb: str, node: str, start: int, end: int, total: int, size: int, pixels: str) -> tuple[str, str]:
    """(doing, advice) for an out-of-memory error in VideoCrafter Decode/Encode's chunk [start, end)."""
    doing = f"{verb} frames {start + 1}-{end} of {total} ({pixels})"
    if size > 1:
        advice = f"lower frames_per_chunk in {node} (now {size}; 1 works on one frame at a time)"
    else:
        advice = "even one frame at a time does not fit: lower the video size, or free memory used by other models"
    return doing, advice
