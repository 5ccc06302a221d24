"""Is every tensor what the detected model needs: its shape, a floating-point dtype, finite values.

A damaged download or a hand-edited file usually differs from the model it claims to be in a few
tensors. `detect_config` reads every size by majority, so such a tensor does not change the detected
model; `tensor_problem` then names it, with its shape and the shape the model needs, before anything
is built. Values are checked for NaN and infinity by `FiniteScan` while each tensor is copied into
its module anyway (one sum per tensor in its own dtype, no extra copy, no synchronisation until the end).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .config import RELEASES, ModelConfig

log = logging.getLogger("vc_model")
DAMAGED = "the file is damaged or was modified; download it again (or convert it again from the official file)."


def model_label(config: ModelConfig, detected: bool = True) -> str:
    """How messages name the model a file was compared with."""
    if not detected:
        return f"the given config ({config.name})"
    if any(config.name == release.name for release in RELEASES.values()):
        return f"{config.name} (the release the rest of the file matches)"
    return "the model the rest of the file describes"


def _listed(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def tensor_problem(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], model: str,
                   file: str | None = None) -> str | None:
    """None when every tensor of `expected` present in the file has that shape and a floating-point
    dtype; otherwise one sentence naming the tensors that differ (`model`: see `model_label`; `file`:
    the file's name, to start the sentence with)."""
    wrong, integer = [], []
    for key, want in expected.items():
        if key not in state_dict:
            continue
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(want):
            wrong.append(f"'{key}' has shape {list(tensor.shape)} where {model} needs {list(want)}")
        elif not tensor.dtype.is_floating_point:
            integer.append(f"'{key}' is stored as {str(tensor.dtype).removeprefix('torch.')}")
    if not (wrong or integer):
        return None
    parts = []
    if wrong:
        parts.append(("tensor " if len(wrong) == 1 else "tensors ") + _listed(wrong))
    if integer:
        parts.append(("tensor " if len(integer) == 1 else "tensors ") + _listed(integer)
                     + ", but every VideoCrafter weight is floating point")
    text = "; ".join(parts) + ": " + DAMAGED
    return f"In '{file}', {text}" if file else text[0].upper() + text[1:]


class FiniteScan:
    """Finds NaN and infinite values in tensors as they are copied, for a warning naming them.

    `add` queues each tensor's sum, taken in its own dtype (NaN and infinities propagate into it; the
    fastest full read there is: no mask, no copy), and `warn` reads all sums at once, so a GPU load
    synchronises once. Only the few tensors whose sum is not finite are looked at again: the copy, to
    rule out a sum that merely overflowed (fp16 holds 65504 at most), then the file's tensor, which tells
    values broken in the file from values the target dtype cannot hold (finite in the file, infinite
    once cast, e.g. to fp16).
    """

    def __init__(self):
        self._sums: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (key, sum, scanned tensor)
        self._found: dict[str, int] = {}

    def add(self, key: str, copy: torch.Tensor, original: torch.Tensor, now: bool = False) -> None:
        """Queue `copy` (made from `original`, the file's tensor). A float8 copy saturates infinities,
        so its original is scanned instead. `now` judges it at once (for callers that do not keep the
        originals, such as the converter; the originals must be on the CPU)."""
        tensor = original if copy.element_size() == 1 else copy
        if not tensor.dtype.is_floating_point or tensor.is_meta or not tensor.numel():
            return
        # float8 has few reduction kernels: widen it (a temporary of one tensor)
        total = (tensor if tensor.element_size() > 1 else tensor.half()).sum().float()
        if not now:
            self._sums.append((key, total, tensor))
        elif not bool(total.isfinite()) and _non_finite(tensor):
            self._found[key] = _non_finite(original)

    def warn(self, source: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Log a warning naming the tensors with NaN/inf values; `source` maps the keys queued (not
        judged at once) to the file's tensors. Returns {key: NaN/inf values in the file (0: they
        appeared in the cast)}, and starts over."""
        flagged, self._found = self._found, {}
        by_device: dict[torch.device, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for entry in self._sums:  # float8 loads scan their originals on the CPU, the rest where they went
            by_device.setdefault(entry[1].device, []).append(entry)
        self._sums = []
        for queued in by_device.values():
            finite = torch.stack([total for _, total, _ in queued]).isfinite().tolist()  # one synchronisation
            flagged.update({key: _non_finite(source[key]) for (key, _, tensor), ok in zip(queued, finite)
                            if not ok and _non_finite(tensor)})
        if not flagged:
            return flagged
        broken = [f"'{key}' ({count} value{'s' if count > 1 else ''})" for key, count in flagged.items() if count]
        overflow = [f"'{key}'" for key, count in flagged.items() if not count]
        if broken:
            log.warning("VideoCrafter: %s %s NaN or infinite values, so the video will probably come out black "
                        "or as noise: %s", _tensors(broken), "hold" if len(broken) > 1 else "holds", DAMAGED)
        if overflow:
            log.warning("VideoCrafter: %s %s values too large for the chosen weight dtype (they became infinite "
                        "when cast): load the model in bf16 or fp32 instead.", _tensors(overflow),
                        "hold" if len(overflow) > 1 else "holds")
        return flagged


def _tensors(items: list[str]) -> str:
    return ("tensor " if len(items) == 1 else "tensors ") + _listed(items, 5)


def _non_finite(tensor: torch.Tensor) -> int:
    """How many values of `tensor` are NaN or infinite (float8 has no isfinite kernel: widened first)."""
    return int((~torch.isfinite(tensor if tensor.element_size() > 1 else tensor.half())).sum())
