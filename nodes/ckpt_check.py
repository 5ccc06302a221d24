"""What a checkpoint file holds, read cheaply enough for ComfyUI's input validation.

No ComfyUI import. `inspect_checkpoint(path)` reads only keys, shapes and dtypes (the safetensors
header, or a memory-mapped pickle) plus the small schedule buffers, detects the release from them and
checks the file against the full VideoCrafter layout, so a U-Net-only file, a VAE-only file, another
model's checkpoint or a damaged tensor is refused with one sentence before anything is loaded.
`inspect_unet(path)` does the same for Load VideoCrafter U-Net, which takes a text-to-video U-Net
alone (with or without the `model.diffusion_model.` prefix) or the U-Net of a full checkpoint.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..vc_model.build import expected_shapes
from ..vc_model.checkpoint import (
    COMPONENT_PREFIXES,
    SAFETENSORS_DTYPES,
    SAFETENSORS_EXTENSIONS,
    CheckpointError,
    describe_state_dict,
    lazy_state_dict,
    split_components,
    with_unet_prefix,
)
from ..vc_model.config import ModelConfig
from ..vc_model.detect import detect_config
from ..vc_model.integrity import model_label, tensor_problem

PART_NAMES = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}
_cache: dict[tuple, ModelConfig | str] = {}  # refusals as their message


def header_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """{key: tensor} where the big tensors may be shape-only (`meta`, with the file's dtype); schedule
    buffers are real."""
    if not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        return lazy_state_dict(path)  # memory-mapped: shapes are free, data is paged in on access
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                if "." not in key:  # schedule buffers: small, and their values matter
                    out[key] = f.get_tensor(key)
                else:
                    view = f.get_slice(key)
                    out[key] = torch.empty(view.get_shape(), device="meta",
                                           dtype=SAFETENSORS_DTYPES.get(view.get_dtype(), torch.uint8))
            return out
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"'{os.path.basename(path)}' is not a readable safetensors file ({error}); it is probably truncated "
            "or not a checkpoint: download or convert it again."
        ) from None


def _parts_problem(name: str, state_dict) -> str | None:
    groups = split_components(state_dict)
    description = describe_state_dict(state_dict)
    found = [part for part in ("unet", "vae", "text_encoder", "image_clip", "image_proj") if groups[part]]
    if not found or not description.startswith("a file with"):
        return (f"'{name}' is {description}, not a VideoCrafter checkpoint; the loader needs an official "
                "VideoCrafter model.ckpt (or its .safetensors conversion).")
    missing = [label for part, label in PART_NAMES.items() if not groups[part]]
    if missing:
        held = ", ".join(PART_NAMES.get(p, "image encoder") for p in found if p != "image_proj") or "nothing usable"
        unet_only = " (a U-Net on its own loads with Load VideoCrafter U-Net)" if found == ["unet"] else ""
        return (f"'{name}' is a partial checkpoint (it holds {held} but no {' or '.join(missing)}); the loader needs "
                f"the complete VideoCrafter model.ckpt with U-Net, VAE and text encoder{unet_only}.")
    if bool(groups["image_clip"]) != bool(groups["image_proj"]):
        return (f"'{name}' has an incomplete image encoder (CLIP vision tower and image_proj_model must both be "
                "present); use the complete VideoCrafter I2V model.ckpt.")
    return None


def _layout_problem(name: str, state_dict, config: ModelConfig, prefixes: tuple[str, ...] | None = None) -> str | None:
    """Missing or unexpected keys, then shapes and dtypes (`tensor_problem`), of the keys under
    `prefixes` (None: the whole file) plus the schedule buffers."""
    want = expected_shapes(config)
    if prefixes is not None:
        want = {k: v for k, v in want.items() if k.startswith(prefixes) or "." not in k}
    leftovers = [k for k in want if k.startswith("embedder.model.") and not k.startswith(COMPONENT_PREFIXES["image_clip"])]
    schedule = [k for k in want if "." not in k]
    missing = [k for k in want if k not in state_dict and k not in leftovers and k not in schedule]
    unexpected = [k for k in state_dict if k not in want and (prefixes is None or k.startswith(prefixes))]
    if missing or unexpected:
        detail = "; ".join(
            f"{label} {', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys
        )
        return (f"'{name}' does not match the VideoCrafter layout it resembles ({detail}); it is damaged or not a "
                "VideoCrafter checkpoint.")
    return tensor_problem(state_dict, want, model_label(config), file=name)


def inspect_checkpoint(path: str) -> ModelConfig:
    """The detected ModelConfig of a complete VideoCrafter checkpoint; CheckpointError otherwise.

    Results are cached per (path, size, mtime, ctime), so validation and loading read the header once.
    A cached refusal is raised as a new exception each time: re-raising one stored exception would
    chain every raise's traceback onto it, and a long session validating a bad file would leak.
    """
    return _cached(path, screen)


def inspect_unet(path: str) -> ModelConfig:
    """The detected ModelConfig of a file whose text-to-video U-Net Load VideoCrafter U-Net can use."""
    return _cached(path, screen_unet)


def _cached(path: str, check) -> ModelConfig:
    stat = os.stat(path)
    key = (check.__name__, os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _cache:
        _cache[key] = _inspect(path, check)
    result = _cache[key]
    if isinstance(result, str):
        raise CheckpointError(result)
    return result


def _inspect(path: str, check) -> ModelConfig | str:
    name = os.path.basename(path)
    try:
        return check(name, header_state_dict(path))
    except CheckpointError as error:
        return str(error)
    except OSError as error:  # unreadable (permissions, I/O error): worth a sentence, not a traceback
        return (f"'{name}' cannot be read ({error.strerror or error}); check that the file is complete and "
                "readable by ComfyUI, or download it again.")


def screen(name: str, state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Detected config of a complete VideoCrafter state dict (tensors may be `meta`); CheckpointError otherwise."""
    state_dict = with_unet_prefix(state_dict)
    problem = _parts_problem(name, state_dict)
    if problem:
        raise CheckpointError(problem)
    try:
        config = detect_config(state_dict)
    except CheckpointError:
        raise
    except (KeyError, ValueError, IndexError, StopIteration, ZeroDivisionError):
        raise CheckpointError(
            f"'{name}' is {describe_state_dict(state_dict)} whose layout is not a VideoCrafter one; "
            "use an official VideoCrafter model.ckpt."
        ) from None
    problem = _layout_problem(name, state_dict, config)
    if problem:
        raise CheckpointError(problem)
    return config


def screen_unet(name: str, state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Detected config of a file holding a VideoCrafter text-to-video U-Net (alone, bare or prefixed, or
    inside a full checkpoint whose other parts are ignored); CheckpointError otherwise."""
    state_dict = with_unet_prefix(state_dict)
    groups = split_components(state_dict)
    description = describe_state_dict(state_dict)
    if not groups["unet"] or not description.startswith("a file with"):
        raise CheckpointError(f"'{name}' is {description}, not a VideoCrafter checkpoint or U-Net; Load VideoCrafter "
                              "U-Net needs a VideoCrafter text-to-video U-Net (or a full VideoCrafter model.ckpt).")
    try:
        config = detect_config(state_dict)
    except CheckpointError:
        raise
    except (KeyError, ValueError, IndexError, StopIteration, ZeroDivisionError):
        raise CheckpointError(f"'{name}' is {description} whose layout is not a VideoCrafter one.") from None
    if config.unet.image_attention:
        raise CheckpointError(f"'{name}' holds the image-to-video U-Net, which needs the image encoder of the full "
                              "VideoCrafter1 I2V checkpoint: load that file with Load VideoCrafter Checkpoint.")
    problem = _layout_problem(name, state_dict, config, (COMPONENT_PREFIXES["unet"],))
    if problem:
        raise CheckpointError(problem)
    return config
