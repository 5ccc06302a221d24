"""Converting a `.ckpt` checkpoint to `.safetensors` in fp16, bf16 or fp32.

Memory: the source is memory-mapped (or read lazily for a safetensors source) and the output is
streamed to disk one tensor at a time: each tensor is cast, written and dropped before the next,
so at no point do two full copies of the weights sit in memory.

Safety: the output is written under a temporary name in the destination folder and renamed only
once every tensor is on disk, so an interrupted conversion leaves no file that looks complete.
The written file is then re-opened lazily and every tensor's key, shape, dtype and checksum is
compared with what was written.

The top-level schedule buffers (`alphas_cumprod`, `scale_arr`, ...; keys without a dot) stay
float32: they are tiny and the sampler's precision depends on them.

T2V-Turbo files convert too (recognised from their contents): the v1 LoRA's unnamed list becomes the
keys `lora.0000.up`, `lora.0000.down`, ... (`vc_model.turbo`), the v2 U-Net keeps its keys. They keep
their stored precision (float32) unless a dtype is asked for.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import build
from .checkpoint import (PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, CheckpointError, FilePages, LazySafetensors,
                         MappedStateDict, _load_pickle, _unwrap)
from .files import atomic_output
from .integrity import FiniteScan
from .turbo import _lora_list, looks_like_turbo, turbo_version

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# torch dtype -> safetensors header name
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass
class ConversionReport:
    """What a conversion wrote."""

    source: Path
    output: Path
    dtype: str  # "fp16", "bf16", "fp32", or "as stored"
    release: str | None  # detected model, None if detection was not possible
    tensors: int
    kept_fp32: int  # schedule buffers left in float32
    source_bytes: int
    output_bytes: int
    seconds: float
    verified: bool

    def summary(self) -> str:
        lines = [
            f"converted {self.source.name} -> {self.output}",
            f"  model:    {self.release or 'unknown'}",
            f"  tensors:  {self.tensors} ({self.kept_fp32} schedule buffers kept in fp32, the rest {self.dtype})",
            f"  size:     {human_size(self.source_bytes)} -> {human_size(self.output_bytes)}",
            f"  verified: {'every key, shape, dtype and checksum matches' if self.verified else 'skipped'}",
            f"  time:     {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def human_size(nbytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"  # pragma: no cover


def default_output(source: str | os.PathLike, dtype: str | None) -> Path:
    """`model.ckpt` -> `model.fp16.safetensors` beside it (`unet_lora.safetensors` when kept as stored)."""
    source = Path(source)
    return source.with_name(f"{source.stem}.{dtype}.safetensors" if dtype else f"{source.stem}.safetensors")


def _target_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or "." not in key or not tensor.is_floating_point():
        return tensor.dtype  # schedule buffers and integer tensors are kept as they are
    return dtype


def _tensor_bytes(tensor: torch.Tensor):
    """A contiguous CPU tensor's raw little-endian bytes as a numpy uint8 view (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _write_tensor(f, tensor: torch.Tensor) -> str:
    """Append one tensor's bytes to the open file; returns their checksum."""
    data = _tensor_bytes(tensor)
    f.write(memoryview(data))
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def _check_source(source: Path) -> None:
    if not source.is_file():
        raise CheckpointError(f"No checkpoint file at '{source}': check the path.")
    if not source.name.lower().endswith(PICKLE_EXTENSIONS + SAFETENSORS_EXTENSIONS):
        raise CheckpointError(
            f"'{source.name}' is not a checkpoint file: expected a .ckpt (or .pt, .pth, .safetensors) file."
        )


def _check_output(source: Path, output: Path, force: bool) -> None:
    if output.suffix.lower() != ".safetensors":
        raise CheckpointError(f"The output '{output.name}' must end in .safetensors.")
    if output.resolve() == source.resolve():
        raise CheckpointError("The output would overwrite the source checkpoint: choose another output name.")
    if output.exists() and not force:
        raise FileExistsError(f"'{output}' already exists: pass --force to overwrite it.")


def _detect_release(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The release name, or CheckpointError when this is not a VideoCrafter checkpoint or a tensor
    of it is damaged (a build on `meta` checks every key, shape and dtype without using memory)."""
    return build(state_dict, device="meta").config.name


def _open_source(source: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """(tensors, what they are): memory-mapped or lazy, read once, with `release(key)`. `what` is the
    detected VideoCrafter release, or "T2V-Turbo v1"/"T2V-Turbo v2"; CheckpointError for anything else."""
    if source.name.lower().endswith(SAFETENSORS_EXTENSIONS):
        tensors = LazySafetensors(str(source))
    else:
        data = _load_pickle(str(source), "cpu")
        # only T2V-Turbo's v1 LoRA is a plain list
        tensors = _lora_list(data, source.name) if isinstance(data, (list, tuple)) else _unwrap(data, str(source))
        tensors = MappedStateDict(tensors, FilePages(str(source)))
    if looks_like_turbo(tensors):
        return tensors, f"T2V-Turbo {turbo_version(tensors, source.name)}"
    return tensors, _detect_release(tensors)


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    dtype: str | None = "fp16",
    force: bool = False,
    verify: bool = True,
    progress=None,
) -> ConversionReport:
    """Convert `source` (.ckpt, or .safetensors to change precision) to a .safetensors file.

    dtype: "fp16", "bf16" or "fp32"; None keeps a T2V-Turbo file's stored precision (fp16 for a
    VideoCrafter checkpoint). Raises CheckpointError for unusable input (wrong extension, unsafe pickle,
    neither a VideoCrafter checkpoint nor a T2V-Turbo file) and FileExistsError when `output` exists
    and not `force`. progress(done, total) is called after each tensor is written.
    """
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"Unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}.")
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian data
        raise RuntimeError("Converting needs a little-endian machine.")
    start = time.perf_counter()
    source = Path(source)
    _check_source(source)
    if output is not None:
        _check_output(source, Path(output), force)
    state_dict, release = _open_source(source)  # memory-mapped / lazy: no full copy in memory
    if dtype is None and not release.startswith("T2V-Turbo"):
        dtype = "fp16"
    output = Path(output) if output is not None else default_output(source, dtype)
    _check_output(source, output, force)
    keys = list(state_dict)
    header_entries, plan, offset = {}, [], 0
    for key in keys:
        tensor = state_dict[key]
        out_dtype = _target_dtype(key, tensor, DTYPES.get(dtype))
        if out_dtype not in _ST_DTYPES:
            raise CheckpointError(f"Tensor '{key}' has dtype {tensor.dtype}, which safetensors cannot store.")
        nbytes = tensor.numel() * torch.empty((), dtype=out_dtype).element_size()
        header_entries[key] = {"dtype": _ST_DTYPES[out_dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + nbytes]}
        plan.append((key, out_dtype))
        offset += nbytes
    metadata = {"format": "pt", "converted_by": "comfyui-videocrafter", "source": source.name,
                "dtype": dtype or "as stored"}
    if release:
        metadata["model"] = release
    header = json.dumps({"__metadata__": metadata, **header_entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned

    checksums, scan = {}, FiniteScan()
    with atomic_output(output, force=force) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for done, (key, out_dtype) in enumerate(plan, 1):
                original = state_dict[key]
                tensor = original.to(device="cpu", dtype=out_dtype).contiguous()
                scan.add(key, tensor, original, now=True)
                checksums[key] = _write_tensor(f, tensor)
                del tensor, original
                # written: give back the source's file pages, and drop a loaded dict's reference
                state_dict.release(key)
                if isinstance(state_dict, dict):
                    del state_dict[key]
                if progress is not None:
                    progress(done, len(plan))
            f.flush()
            os.fsync(f.fileno())
    del state_dict
    scan.warn()

    if verify:
        verify_safetensors(output, header_entries, checksums)
    return ConversionReport(
        source=source, output=output, dtype=dtype or "as stored", release=release, tensors=len(plan),
        kept_fp32=sum(1 for key, _ in plan if "." not in key),
        source_bytes=source.stat().st_size, output_bytes=output.stat().st_size,
        seconds=time.perf_counter() - start, verified=verify,
    )


def verify_safetensors(path: Path, expected: dict, checksums: dict[str, str]) -> None:
    """Re-open `path` lazily and compare every tensor's key, dtype, shape and checksum.

    On a mismatch the file is deleted (it must not look usable) and CheckpointError is raised.
    """
    from safetensors import safe_open

    inverse = {v: k for k, v in _ST_DTYPES.items()}
    try:
        problem = _compare(safe_open, path, expected, checksums, inverse)
    except Exception as error:  # any read failure means the file is not good
        problem = f"it cannot be read back ({error})"
    if problem:
        Path(path).unlink(missing_ok=True)
        raise CheckpointError(f"Verification of '{path}' failed: {problem}; the file was deleted, convert again.")


def _compare(safe_open, path, expected, checksums, inverse) -> str | None:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        if set(f.keys()) != set(expected):
            return "its keys differ from the source"
        for key, want in expected.items():
            tensor = f.get_tensor(key)
            if tensor.dtype != inverse[want["dtype"]] or list(tensor.shape) != want["shape"]:
                return f"tensor '{key}' has the wrong dtype or shape"
            digest = hashlib.blake2b(memoryview(_tensor_bytes(tensor.contiguous())), digest_size=16)
            if digest.hexdigest() != checksums[key]:
                return f"tensor '{key}' does not read back as written"
    return None
