"""Turning a state dict into ready modules, strictly, with one copy of the weights.

Each component present in the state dict is built on the `meta` device, its expected keys and
shapes are checked against the file (missing or unexpected keys are an error that names them and
what the file appears to be), and the tensors are then assigned straight in the target dtype and
device. Components absent from the file are None in the bundle.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from .checkpoint import (COMPONENT_PREFIXES, CheckpointError, describe_state_dict, lazy_state_dict, split_components,
                         with_unet_prefix)
from .config import ModelConfig
from .conv import channels_last_format
from .detect import detect_config, detect_resampler
from .image_encoder import ImageEncoder, image_encoder_unused_keys
from .integrity import DAMAGED, FiniteScan, model_label, tensor_problem
from .ops import Conv2d, Conv3d
from .schedule import Schedule, schedule_buffer_shapes, schedule_buffers
from .text_encoder import TextEncoder
from .unet import UNet3D
from .vae import VideoVAE


@dataclass
class Bundle:
    """The parts of one VideoCrafter model; a part the file lacks is None."""

    config: ModelConfig
    unet: UNet3D | None = None
    vae: VideoVAE | None = None
    text_encoder: TextEncoder | None = None
    image_encoder: ImageEncoder | None = None
    schedule: Schedule | None = None
    turbo: str | None = None  # "v1" / "v2" once vc_model.apply_turbo made the U-Net T2V-Turbo

    def modules(self) -> dict[str, nn.Module]:
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "image_encoder": self.image_encoder}
        return {name: module for name, module in parts.items() if module is not None}


def _shell(config: ModelConfig) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    """Meta-device modules for every configured component, with `{module key: checkpoint key}`.

    Sizes no module can have (read from an inconsistent file, or a hand-made config) are a
    CheckpointError saying so, not an error from deep inside a layer."""
    try:
        return _meta_modules(config)
    except (ValueError, RuntimeError, ZeroDivisionError, AssertionError) as error:
        raise CheckpointError(f"The sizes of {config.name} do not make a working model ({error}); if they were "
                              f"read from a file, {DAMAGED}") from None


def _meta_modules(config: ModelConfig) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    out: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    with torch.device("meta"):
        if config.unet is not None:
            unet = UNet3D(config.unet)
            out["unet"] = (unet, {k: COMPONENT_PREFIXES["unet"] + k for k in unet.state_dict()})
        if config.vae is not None:
            vae = VideoVAE(config.vae)
            out["vae"] = (vae, {k: COMPONENT_PREFIXES["vae"] + k for k in vae.state_dict()})
        if config.text_encoder is not None:
            text = TextEncoder(config.text_encoder)
            out["text_encoder"] = (text, {k: COMPONENT_PREFIXES["text_encoder"] + k for k in text.state_dict()})
        if config.image_encoder is not None:
            image = ImageEncoder(config.image_encoder)
            names = {}
            for k in image.state_dict():
                part, rest = k.split(".", 1)
                names[k] = COMPONENT_PREFIXES["image_clip" if part == "clip" else "image_proj"] + rest
            out["image_encoder"] = (image, names)
    return out


def expected_shapes(config: ModelConfig, shells=None) -> dict[str, tuple[int, ...]]:
    """Every key and shape an official checkpoint of `config` holds (meta build; no memory)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, names in (shells or _shell(config)).values():
        state = module.state_dict()
        shapes.update({full: tuple(state[k].shape) for k, full in names.items()})
    if config.image_encoder is not None:
        shapes.update(image_encoder_unused_keys(config.image_encoder))
    shapes.update(schedule_buffer_shapes(config.schedule))
    return shapes


def build(state_dict: Mapping[str, torch.Tensor], config: ModelConfig | None = None,
          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Bundle:
    """Build every component present in `state_dict`, strictly, in `dtype` on `device`.

    `config` is detected from the weights when not given. A U-Net-only file may lack the
    `model.diffusion_model.` prefix. `device="meta"` checks keys and shapes
    and builds without memory. Floating-point weights are cast to `dtype`; the schedule stays float32.
    A tensor of the wrong shape or an integer dtype is a CheckpointError naming it; NaN or infinite
    values are logged as a warning naming the tensors (found while the weights are copied).
    """
    state_dict = with_unet_prefix(state_dict)
    given = config
    config = config or detect_config(state_dict)
    groups = split_components(state_dict)
    present = {
        "unet": bool(groups["unet"]),
        "vae": bool(groups["vae"]),
        "text_encoder": bool(groups["text_encoder"]),
        "image_encoder": bool(groups["image_clip"] or groups["image_proj"]),
    }
    if not any(present.values()):
        raise CheckpointError(
            f"This is {describe_state_dict(state_dict)}, not a VideoCrafter checkpoint: no U-Net, VAE, text "
            "or image encoder keys were found."
        )
    if present["image_encoder"] and config.image_encoder is not None and groups["image_proj"]:
        # The official code fixes the resampler's sizes in code; the weights say what they are.
        config = config.replace(image_encoder=replace(config.image_encoder, resampler=detect_resampler(state_dict)))
    wanted = {name: getattr(config, name) for name in present if present[name]}
    for name, part in wanted.items():
        if part is None:
            raise CheckpointError(
                f"The file holds a {name.replace('_', ' ')} but the given config has none (for an official "
                "config whose open_clip arch is unknown, pass open_clip_archs); pass a config that describes it, "
                "or let build() detect one."
            )
    config = config.replace(**{name: None for name in present if not present[name]})
    present_keys = {
        "unet": list(groups["unet"].values()),
        "vae": list(groups["vae"].values()),
        "text_encoder": list(groups["text_encoder"].values()),
        "image_encoder": list(groups["image_clip"].values()) + list(groups["image_proj"].values()),
    }
    shells = _shell(config)
    for name, (module, names) in shells.items():
        _validate(module, names, present_keys[name], state_dict, name)
    _check_extra_keys(state_dict, groups, config)
    label = model_label(config, _detected(given, state_dict))
    problem = tensor_problem(state_dict, expected_shapes(config, shells), label)
    if problem:
        raise CheckpointError(problem)

    bundle = Bundle(config=config)
    for name, (module, names) in shells.items():
        assign_weights(module, names, state_dict, dtype, device)
        module.eval().requires_grad_(False)
        setattr(bundle, name, module)
    if bundle.unet is not None or groups["schedule"]:
        bundle.schedule = _schedule(config, state_dict, groups)
    return bundle


def load(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         config: ModelConfig | None = None) -> Bundle:
    """Read a checkpoint file and build it, keeping about one copy of the weights in memory."""
    return build(lazy_state_dict(path), config=config, dtype=dtype, device=device)


def _detected(config: ModelConfig | None, state_dict) -> bool:
    """Whether `config` (None: none was given) is what the file itself describes (a detection when
    a config was given: milliseconds, beside the build)."""
    try:
        return config is None or config == detect_config(state_dict)
    except CheckpointError:
        return False


def _check_extra_keys(state_dict, groups, config: ModelConfig) -> None:
    unexpected = list(groups["other"])
    if config.image_encoder is None:
        unexpected += list(groups["image_leftovers"])
    else:
        allowed = image_encoder_unused_keys(config.image_encoder)
        unexpected += [k for k in groups["image_leftovers"] if k not in allowed]
    known = schedule_buffer_shapes(config.schedule)
    unexpected += [k for k in groups["schedule"] if k not in known]
    if unexpected:
        raise CheckpointError(
            f"Unexpected keys {_first(unexpected)} in a file that looks like {describe_state_dict(state_dict)}: "
            "it is not a VideoCrafter checkpoint of a known layout."
        )


def _first(keys, n: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _validate(module: nn.Module, names: dict[str, str], present: list[str], state_dict, part: str) -> None:
    """Strict key check of one component before anything is copied (shapes and dtypes: `tensor_problem`)."""
    claimed = set(names.values())
    missing = [full for full in names.values() if full not in state_dict]
    stray = [k for k in present if k not in claimed]
    label = part.replace("_", " ")
    if missing or stray:
        problems = ([f"missing {_first(missing)}"] if missing else []) + ([f"unexpected {_first(stray)}"] if stray else [])
        raise CheckpointError(
            f"The {label} does not match the VideoCrafter layout ({'; '.join(problems)}); the file looks like "
            f"{describe_state_dict(state_dict)}. Use a complete VideoCrafter checkpoint, or pass the matching "
            "official config."
        )


def assign_weights(module: nn.Module, names: dict[str, str], state_dict, dtype, device) -> None:
    """Copy (or cast) each tensor once, straight into `dtype` on `device`, and hand it to the module.

    `names` maps the module's keys to checkpoint keys; the module was built on `meta`.

    When the source is a memory-mapped file (`lazy_state_dict`, or `load_state_dict` on the CPU), a
    tensor's file pages are given back as soon as it has been copied (another dtype, channels-last,
    another device), so each weight is held once and peak memory is the built weights plus one
    tensor. A tensor that needs no copy (same dtype, CPU) stays a view of the file: its pages are the
    weight, paged in on use.

    Every tensor is summed on its way in (`FiniteScan`); NaN or infinite values are logged as one
    warning naming the tensors. A view is read by that sum, so its pages are given back too."""
    on_meta = str(device) == "meta"
    release = getattr(state_dict, "release", None)
    scan = FiniteScan()
    tensors = {}
    for key, full in names.items():
        tensor = state_dict[full]
        target = dtype if tensor.is_floating_point() else tensor.dtype
        if on_meta or tensor.is_meta:
            tensors[key] = torch.empty(tensor.shape, dtype=target, device="meta" if on_meta else device)
        else:
            layout = channels_last_format(tensor) if _wants_channels_last(module, key, tensor) else None
            tensors[key] = tensor.to(device=device, dtype=target, memory_format=layout or torch.preserve_format)
            scan.add(full, tensors[key], tensor)
            if release is not None:
                del tensor
                release(full)
    module.load_state_dict(tensors, strict=True, assign=True)
    scan.warn(state_dict)


def _wants_channels_last(module: nn.Module, key: str, tensor: torch.Tensor) -> bool:
    """The U-Net's `vc_model.ops` convolution weights are stored channels-last: its activations
    are, so the convolution never copies its weight into that layout per call, and the GEMM form
    reads it as is. (The VAE runs NCHW in float32; other ops layers keep the file's layout.)"""
    owner, _, leaf = key.rpartition(".")
    return (isinstance(module, UNet3D) and leaf == "weight" and tensor.is_floating_point()
            and channels_last_format(tensor) is not None
            and isinstance(module.get_submodule(owner), (Conv2d, Conv3d)))


def _schedule(config: ModelConfig, state_dict, groups) -> Schedule:
    shapes = schedule_buffer_shapes(config.schedule)
    if not groups["schedule"]:
        return Schedule.from_config(config.schedule)
    missing = [k for k in shapes if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"The schedule buffers are incomplete (missing {_first(missing)}): the file is not a whole VideoCrafter "
            "checkpoint."
        )
    for key, want in shapes.items():
        if tuple(state_dict[key].shape) != tuple(want):
            raise CheckpointError(f"Schedule buffer '{key}' has shape {list(state_dict[key].shape)}, expected {list(want)}.")
    buffers = {k: state_dict[k] for k in shapes}
    if any(b.is_meta for b in buffers.values()):  # shapes only: values follow the config
        return Schedule.from_config(config.schedule)
    return Schedule.from_buffers(config.schedule, buffers)


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random model in the official key layout (for tests, the demo and host tests).

    Values are drawn from a seeded generator, independent of any module's own init: matrices
    ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), other vectors ~ N(0, 0.02^2).
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(config).items():
        if key in schedule_buffer_shapes(config.schedule):
            continue
        leaf = key.rsplit(".", 1)[-1]
        if len(shape) >= 2 and leaf not in ("positional_embedding", "latents", "embeddings_table"):
            value = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        elif leaf == "weight" and len(shape) == 1:
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif leaf == "logit_scale":
            value = torch.full(shape, math.log(1 / 0.07))
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        out[key] = value
    out.update(schedule_buffers(config.schedule))
    return out
