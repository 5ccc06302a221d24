"""Reading checkpoint files safely, and naming what a state dict holds.

`.safetensors` files are read tensor by tensor; `.ckpt`/`.pt`/`.pth` pickles are read with
`torch.load(weights_only=True)`, so a file that needs arbitrary code to unpickle is refused before
any of its code can run. Errors are `CheckpointError`: one sentence saying what the file is, what
was expected and what to do.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator, Mapping

import torch

# Where each component lives in an official `model.ckpt` state dict.
COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.model.",
    "image_clip": "embedder.model.visual.",
    "image_proj": "image_proj_model.",
}
_ALL_PREFIXES = tuple(COMPONENT_PREFIXES.values()) + ("embedder.model.",)
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
# dtype names of a safetensors header (read without loading any tensor)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and what to do."""


class _LightningCheckpointStub:
    """Stands in for PyTorch Lightning's callback objects stored beside the weights.

    Unpickling one never runs Lightning code: it only swallows the state it is given.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Harmless globals that training frameworks store beside the weights. Everything else is refused.
_EXTRA_SAFE_GLOBALS = [
    (_LightningCheckpointStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_LightningCheckpointStub, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _numpy_safe_globals() -> list:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch wheels in practice
        return []
    import codecs

    found = [np.dtype, codecs.encode]
    for path in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = __import__(path, fromlist=["scalar"])
            found.append((module.scalar, f"{path}.scalar"))
        except (ImportError, AttributeError):
            pass
    found += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32")]
    return found


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into a flat `{name: tensor}` dict.

    Wrappers are removed: a Lightning `state_dict` entry, or a DeepSpeed `module` entry whose
    keys carry the 16-character `_forward_module.` prefix. Non-tensor entries are dropped.

    On the CPU the tensors are views of the memory-mapped file (pages are read on first use), in a
    dict with `release(key)` (see `lazy_state_dict`), so `build` keeps one copy of each weight. For
    another device each tensor is copied there and its file pages are given back at once.
    """
    mapped = lazy_state_dict(path)
    if torch.device(device).type == "cpu":
        return mapped if isinstance(mapped, MappedStateDict) else MappedStateDict(
            {key: mapped[key] for key in mapped}, mapped.pages)
    out = {}
    for key in list(mapped):
        out[key] = mapped[key].to(device)
        mapped.release(key)
        if isinstance(mapped, dict):  # a pickle read into memory (no mmap) is freed tensor by tensor
            del mapped[key]
    return out


def lazy_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Like `load_state_dict`, but safetensors tensors are read only when accessed.

    Pickled checkpoints are memory-mapped where their format allows, so their tensors are also
    paged in on access. Building from this mapping keeps about one copy of the weights in memory:
    the mapping has a `release(key)` method that `build` calls once a tensor has been copied into
    another dtype, layout or device, handing its file pages back (see `FilePages`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint file at '{path}': check the path and that the download finished.")
    if path.lower().endswith(SAFETENSORS_EXTENSIONS):
        return LazySafetensors(path)
    return MappedStateDict(_unwrap(_load_pickle(path, "cpu"), path), FilePages(path))


def _libc_madvise():
    """libc's madvise where its MADV_DONTNEED drops a private file mapping's pages (Linux); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has madvise
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()
_MADV_DONTNEED = 4


class FilePages:
    """This process's read-only mappings of one file, and a way to give their resident pages back.

    A memory-mapped checkpoint's pages count in the process's RSS once read. When a tensor has been
    copied (cast to another dtype or layout, or moved to a GPU) the pages it was read from are
    dropped with `madvise(MADV_DONTNEED)`, so the process does not hold that weight twice. Only pages
    wholly inside the tensor that lie in a mapping of this very file (checked against /proc/self/maps
    by inode) and that were never written (checked in /proc/self/pagemap) are dropped: for those, a
    later read faults the same bytes back in from the file, so no value ever changes. A tensor
    changed in place keeps its pages. Elsewhere than Linux (or where /proc/self/pagemap cannot be
    read) this does nothing: the copies are correct, and the file's pages stay mapped until the last
    tensor viewing the file is freed.
    """

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self._inode = os.stat(self.path).st_ino
        self._ranges: list[tuple[int, int]] | None = None

    def _mapped(self) -> list[tuple[int, int]]:
        """Address ranges where this file is mapped (read once: the mappings exist by now)."""
        if self._ranges is None:
            self._ranges = []
            try:
                with open("/proc/self/maps") as f:
                    for line in f:
                        fields = line.split(maxsplit=5)
                        if (len(fields) == 6 and int(fields[4]) == self._inode
                                and fields[5].rstrip("\n").startswith(self.path)):
                            start, end = (int(v, 16) for v in fields[0].split("-"))
                            self._ranges.append((start, end))
            except (OSError, ValueError):
                self._ranges = []
        return self._ranges

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages wholly inside `tensor`'s bytes, if they map this file unchanged."""
        if _MADVISE is None or tensor.device.type != "cpu" or not _dense(tensor):
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last <= first:
            return
        if any(lo <= first and last <= hi for lo, hi in self._mapped()) and _never_written(first, last):
            _MADVISE(first, last - first, _MADV_DONTNEED)


def _dense(tensor: torch.Tensor) -> bool:
    """Its elements fill [data_ptr, data_ptr + nbytes) exactly (contiguous in some dimension order)."""
    if tensor.numel() == 0:
        return False
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return span == tensor.numel()


def _never_written(first: int, last: int) -> bool:
    """No page in [first, last) of a private file mapping is the process's own (written) copy.

    /proc/self/pagemap has one 64-bit entry per page: bit 63 present, bit 62 swapped, bit 61 a
    file page. A written page of a private mapping is present and not a file page (or swapped)."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first // page * 8)
            data = f.read((last - first) // page * 8)
    except OSError:
        return False
    if not data:
        return False
    entries = torch.frombuffer(bytearray(data), dtype=torch.int64)
    present, swapped, file_page = entries < 0, (entries >> 62) & 1 == 1, (entries >> 61) & 1 == 1
    return not bool((swapped | (present & ~file_page)).any())


class MappedStateDict(dict):
    """A pickled checkpoint's `{name: tensor}`; with `release(key)` when its tensors are memory-mapped."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], pages: FilePages):
        super().__init__(tensors)
        self.pages = pages

    def release(self, key: str) -> None:
        """Give back the file pages of tensor `key` (after it has been copied elsewhere)."""
        self.pages.release(self[key])


class LazySafetensors(Mapping):
    """A read-only mapping over a safetensors file that loads each tensor on access.

    `release(key)` gives back the file pages tensor `key` was read from (see `FilePages`)."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._file = safe_open(path, framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"'{os.path.basename(path)}' is not a readable safetensors file ({error}); it is probably "
                "truncated or not a checkpoint: download or convert it again."
            ) from None
        self.metadata = self._file.metadata() or {}
        self.pages = FilePages(path)

    def release(self, key: str) -> None:
        """Give back the file pages of tensor `key` (after it has been copied elsewhere)."""
        self.pages.release(self[key])

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as error:  # safetensors raises several types for damaged data
            raise CheckpointError(
                f"'{os.path.basename(self.path)}' is damaged: tensor '{key}' cannot be read ({error}). "
                "Download or convert the file again."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _load_pickle(path: str, device) -> object:
    name = os.path.basename(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(b"PK"):
            raise CheckpointError(
                f"'{name}' is a damaged zip archive (probably truncated by an interrupted download): download it again."
            )
        if not head or head[:1] != b"\x80":
            raise CheckpointError(
                f"'{name}' is not a PyTorch checkpoint (neither a zip-format torch file nor a pickle): "
                "use the model.ckpt or .safetensors file of a VideoCrafter release."
            )
    safe = _EXTRA_SAFE_GLOBALS + _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(safe):
            try:
                return torch.load(path, map_location=device, weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap can only be used" not in str(error):
                    raise
                return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        culprit = text.split("GLOBAL ", 1)[1].split(" ", 1)[0] if "GLOBAL " in text else "a Python object"
        raise CheckpointError(
            f"Refused '{name}': unpickling it would run arbitrary code ({culprit} is stored in it), so it was "
            "not loaded and nothing in it was executed. Use a .safetensors version of the model, or a "
            "checkpoint that holds only tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"'{name}' cannot be read as a PyTorch checkpoint ({str(error).splitlines()[0][:160]}); it is "
            "probably truncated or damaged: download it again."
        ) from None


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    name = os.path.basename(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = {k[len("_forward_module."):] if k.startswith("_forward_module.") else k: v
               for k, v in obj["module"].items()}
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"'{name}' holds a {type(obj).__name__}, not a state dict of tensors: "
            "use the model.ckpt or .safetensors file of a VideoCrafter release."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{name}' contains no tensors: it is not a model checkpoint.")
    return tensors


def split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """Group a state dict's keys by component: `{component: {key without prefix: full key}}`.

    Top-level keys without a dot (schedule buffers) go to `"schedule"`; anything else to `"other"`.
    """
    groups: dict[str, dict[str, str]] = {name: {} for name in (*COMPONENT_PREFIXES, "image_leftovers", "schedule", "other")}
    for key in state_dict:
        for name, prefix in COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                groups[name][key[len(prefix):]] = key
                break
        else:
            if key.startswith("embedder.model."):
                groups["image_leftovers"][key] = key
            elif "." not in key:
                groups["schedule"][key] = key
            else:
                groups["other"][key] = key
    return groups


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the model family a state dict appears to belong to, for error messages."""
    keys = list(state_dict)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    def shape(key: str):
        return tuple(state_dict[key].shape) if key in state_dict else None

    if not keys:
        return "an empty file"
    if has("conditioner.embedders."):
        return "an SDXL or Stable Video Diffusion checkpoint"
    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
        return "a diffusers-format model (VideoCrafter needs the original model.ckpt layout)"
    if has("motion_modules."):
        return "an AnimateDiff motion module"
    unet = "model.diffusion_model."
    conv_in = shape(unet + "input_blocks.0.0.weight")
    if has(unet + "framestride_embed") or (conv_in is not None and conv_in[1] == 8 and has("image_proj_model.")):
        return "a DynamiCrafter or ToonCrafter checkpoint (image-concat video model; use a DynamiCrafter node pack)"
    if has("time_stack.") or has("time_mixer"):
        return "a Stable Video Diffusion checkpoint"
    if conv_in is not None and not has(unet + "input_blocks.1.2.") and not has(unet + "init_attn."):
        context = shape(unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if has("cond_stage_model.transformer.") or (context and context[1] == 768):
            return "a Stable Diffusion 1.x image checkpoint (no temporal layers)"
        if context and context[1] == 1024:
            return "a Stable Diffusion 2.x image checkpoint (no temporal layers)"
        return "an image diffusion U-Net without temporal layers"
    parts = []
    if has(unet):
        parts.append("a VideoCrafter-style 3D U-Net")
    if has("first_stage_model."):
        parts.append("a VAE")
    if has("cond_stage_model."):
        parts.append("a text encoder")
    if has("embedder.model.visual.") or has("image_proj_model."):
        parts.append("an image encoder")
    if parts:
        return "a file with " + ", ".join(parts)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a standalone VAE file (without the first_stage_model. prefix)"
    sample = ", ".join(keys[:3])
    return f"an unknown model (keys such as {sample})"


_BARE_UNET_KEYS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.")


def with_unet_prefix(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A U-Net-only file whose keys lack `model.diffusion_model.` (the way U-Nets are often saved on
    their own), seen under the official names; any other state dict is returned as it is."""
    keys = list(state_dict)
    if any(k.startswith(_ALL_PREFIXES) for k in keys) or not any(k.startswith(_BARE_UNET_KEYS) for k in keys):
        return state_dict
    return PrefixedStateDict(state_dict, COMPONENT_PREFIXES["unet"])


class PrefixedStateDict(Mapping):
    """Another mapping's tensors under `prefix + key`, without copying; `release` is passed on."""

    def __init__(self, inner: Mapping[str, torch.Tensor], prefix: str):
        self._inner, self._prefix = inner, prefix

    def _own(self, key: str) -> str:
        if not isinstance(key, str) or not key.startswith(self._prefix):
            raise KeyError(key)
        return key[len(self._prefix):]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._inner[self._own(key)]

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key.startswith(self._prefix) and key[len(self._prefix):] in self._inner

    def __iter__(self) -> Iterator[str]:
        return (self._prefix + k for k in self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def release(self, key: str) -> None:
        release = getattr(self._inner, "release", None)
        if release is not None:
            release(self._own(key))
