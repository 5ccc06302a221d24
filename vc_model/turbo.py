"""T2V-Turbo (Ji4chenLi/t2v-turbo): reading its files and applying them to a VideoCrafter2 U-Net.

T2V-Turbo distils VideoCrafter2 into a consistency model that samples in 4-16 steps without CFG
(`vc_model.turbo_sampler`). Two releases:

* v1 `unet_lora.pt`: a pickled plain list `[up_0, down_0, up_1, down_1, ...]` of float32 LoRA factors,
  no names. One pair per `Linear`, `Conv2d` and `Conv3d` module of the official U-Net in registration
  order (`Conv1d` is skipped, so `init_attn`'s projections get none), the guidance projection
  `time_cond_proj` included (entry 4). Shapes: Linear up [out, r], down [r, in]; Conv2d up [out, r, 1, 1],
  down [r, in, kh, kw]; Conv3d up [out, r, 1, 1, 1], down [r, in, 3, 1, 1]; r is 64 clamped to
  min(in, out). Merged as `W + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`, scale 1.
* v2 `unet_mg.pt` / `unet_no_mg.pt`: a whole U-Net state dict without the `model.diffusion_model.`
  prefix, plus `time_cond_proj.weight` and, with motion guidance, `motion_cond_proj.weight` and
  `combine_proj.weight`.

`load_turbo` returns one flat `{name: tensor}` for both: v1 as `lora.0000.up`, `lora.0000.down`,
`lora.0001.up`, ... (the list position, zero-padded), v2 with its own keys. A v1 file converted to
`.safetensors` (`python -m vc_model convert unet_lora.pt`) holds exactly those keys.

The base weight of `time_cond_proj` (Linear 256 -> model_channels, no bias) is in no released file: the
official v1 loader builds it with `nn.Linear`'s default (unseeded) init and adds the LoRA delta on top.
`default_time_cond_proj` is the same distribution from a generator seeded with `TIME_COND_PROJ_SEED`;
`apply_turbo(..., time_cond_proj=W)` takes a given one instead.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .build import assign_weights
from .checkpoint import (PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, CheckpointError, LazySafetensors, _load_pickle,
                         _unwrap, describe_state_dict)
from .config import UNetConfig
from .unet import UNet3D

GUIDANCE_DIM = 256  # width of the w (and motion) embedding: `time_cond_proj_dim` of the official code
TIME_COND_PROJ_SEED = 0  # seed of `default_time_cond_proj`
GUIDANCE_KEYS = ("time_cond_proj.weight", "motion_cond_proj.weight", "combine_proj.weight")
_LORA_KEY = re.compile(r"^lora\.(\d+)\.(up|down)$")


class TurboError(CheckpointError):
    """A T2V-Turbo file or model combination that cannot be used, with the reason and what to do."""


def lora_key(index: int, part: str) -> str:
    """Key of LoRA factor `part` ("up" or "down") of list entry `index`: `lora.0004.up`."""
    return f"lora.{index:04d}.{part}"


# ---------------------------------------------------------------------------------------------------
# reading


def load_turbo(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a T2V-Turbo v1 LoRA (`unet_lora.pt`, or its converted `.safetensors`) or v2 U-Net
    (`unet_mg.pt`, `unet_no_mg.pt`) -> `{name: tensor}` (naming in the module docstring).

    Pickles are read with `torch.load(weights_only=True)`: a file that would run code is refused
    unread. Anything that is neither release raises TurboError saying what the file is."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise TurboError(f"No T2V-Turbo file at '{path}': check the path and that the download finished.")
    if path.lower().endswith(SAFETENSORS_EXTENSIONS):
        lazy = LazySafetensors(path)
        tensors = {key: lazy[key] for key in lazy}
    elif path.lower().endswith(PICKLE_EXTENSIONS):
        data = _load_pickle(path, "cpu")
        if isinstance(data, (list, tuple)):
            tensors = _lora_list(data, name)
        else:
            tensors = _unwrap(data, path)
    else:
        raise TurboError(f"'{name}' is not a T2V-Turbo file: expected unet_lora.pt, unet_mg.pt, unet_no_mg.pt "
                         "or a converted .safetensors.")
    turbo_version(tensors, name)  # refuses anything that is neither release
    return tensors


def _lora_list(items, name: str) -> dict[str, torch.Tensor]:
    """The v1 list [up_0, down_0, ...] -> {lora.0000.up: ..., lora.0000.down: ..., ...}."""
    if not items or len(items) % 2 or not all(isinstance(t, torch.Tensor) for t in items):
        kinds = sorted({type(t).__name__ for t in items})
        raise TurboError(f"'{name}' holds a list of {len(items)} items ({', '.join(kinds) or 'empty'}), not the "
                         "[up, down, up, down, ...] tensor pairs of a T2V-Turbo v1 LoRA (unet_lora.pt).")
    return {lora_key(i // 2, "up" if i % 2 == 0 else "down"): t for i, t in enumerate(items)}


def looks_like_turbo(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict has T2V-Turbo's keys (v1 `lora.NNNN.up/down`, or v2's unprefixed U-Net with
    `time_cond_proj.weight`), without checking it further (`turbo_version` does)."""
    keys = list(tensors)
    if keys and all(_LORA_KEY.match(k) for k in keys):
        return True
    return "time_cond_proj.weight" in tensors and "input_blocks.0.0.weight" in tensors


def turbo_version(turbo: Mapping[str, torch.Tensor], name: str = "the file") -> str:
    """"v1" (LoRA factors) or "v2" (whole U-Net with `time_cond_proj`); TurboError for anything else."""
    keys = list(turbo)
    if keys and all(_LORA_KEY.match(k) for k in keys):
        indices = sorted({int(_LORA_KEY.match(k).group(1)) for k in keys})
        missing = [lora_key(i, part) for i in range(len(indices)) for part in ("up", "down") if lora_key(i, part) not in turbo]
        if indices != list(range(len(indices))) or missing:
            raise TurboError(f"{name} is an incomplete T2V-Turbo v1 LoRA: every entry needs lora.NNNN.up and .down "
                             f"from 0 on (missing {', '.join(missing[:3]) or 'entries'}); convert unet_lora.pt again.")
        return "v1"
    if "time_cond_proj.weight" in turbo and "input_blocks.0.0.weight" in turbo:
        return "v2"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise TurboError(f"{name} is {describe_state_dict(turbo)}, a VideoCrafter checkpoint rather than a T2V-Turbo "
                         "file: use it as the base model and apply unet_lora.pt (v1) or unet_mg.pt (v2) to it.")
    if "input_blocks.0.0.weight" in turbo:
        raise TurboError(f"{name} is a U-Net state dict without the guidance projection `time_cond_proj.weight`, "
                         "so it is not a T2V-Turbo v2 file (unet_mg.pt / unet_no_mg.pt).")
    sample = ", ".join(keys[:3]) or "nothing"
    raise TurboError(f"{name} is neither a T2V-Turbo v1 LoRA (unet_lora.pt) nor a v2 U-Net (unet_mg.pt, "
                     f"unet_no_mg.pt): it holds {sample}{' ...' if len(keys) > 3 else ''}.")


def lora_factors(turbo: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (up, down) pairs of a v1 LoRA in list order."""
    count = len(turbo) // 2
    return [(turbo[lora_key(i, "up")], turbo[lora_key(i, "down")]) for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# the model side


def require_videocrafter2(unet: UNetConfig | None, name: str) -> None:
    """Refuse (TurboError) a model whose U-Net is not VideoCrafter2's kind, or already has T2V-Turbo."""
    if unet is None:
        raise TurboError(f"{name} has no U-Net: T2V-Turbo is applied to the U-Net of a VideoCrafter2 model.")
    if unet.time_cond_proj_dim is not None:
        raise TurboError(f"{name} already has T2V-Turbo applied: apply it once, to the plain VideoCrafter2 model.")
    vc2 = unet.temporal_conv and unet.fps_cond and unet.init_attn and not unet.image_attention and not unet.relative_position
    if not vc2:
        raise TurboError(f"T2V-Turbo is distilled from VideoCrafter2 and works only on it; {name} is not a VideoCrafter2 "
                         "text-to-video model (it lacks its temporal convolutions or fps conditioning, or has image "
                         "attention). Load videocrafter2_t2v_512.ckpt.")


def lora_targets(unet: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, weight shape) of every module a v1 LoRA entry belongs to, in list order: the
    Linear (2-d weight), Conv2d (4-d) and Conv3d (5-d) modules in registration order; Conv1d (3-d) and
    norms are skipped. Our U-Net registers its modules in the official order (checked against the
    official layout by the tests)."""
    out = []
    for name, module in unet.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.ndim in (2, 4, 5):
            out.append((name, tuple(weight.shape)))
    return out


def _lora_problem(index: int, name: str, shape, up: torch.Tensor, down: torch.Tensor) -> str | None:
    ndim = len(shape)
    fits = (up.ndim == down.ndim == ndim and up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
            and all(d == 1 for d in up.shape[2:]) and tuple(down.shape[1:]) == tuple(shape[1:]))
    if fits:
        return None
    return (f"T2V-Turbo LoRA entry {index} (tensors {2 * index} and {2 * index + 1} of the list) is for '{name}', whose "
            f"weight is {list(shape)}, but has up {list(up.shape)} and down {list(down.shape)}")


def check_lora(targets: list[tuple[str, tuple[int, ...]]], factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every (up, down) against its target's weight shape, in order, before anything merges."""
    for index, ((name, shape), (up, down)) in enumerate(zip(targets, factors)):
        problem = _lora_problem(index, name, shape, up, down)
        if problem:
            raise TurboError(problem + ": the LoRA does not belong to this model (T2V-Turbo v1 is made for VideoCrafter2).")
    if len(factors) != len(targets):
        raise TurboError(f"The T2V-Turbo LoRA has {len(factors)} entries, but this U-Net has {len(targets)} layers that "
                         "take one: it was made for a different model (T2V-Turbo v1 is made for VideoCrafter2).")


def lora_delta(up: torch.Tensor, down: torch.Tensor, shape, device=None) -> torch.Tensor:
    """`(up.flatten(1) @ down.flatten(1)).reshape(shape)` in float32 (the official merge, scale 1)."""
    up = up.to(device=device, dtype=torch.float32)
    down = down.to(device=device, dtype=torch.float32)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def merge_lora(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A new tensor W + up @ down, added in float32 and stored in W's dtype."""
    return (weight.float() + lora_delta(up, down, weight.shape, weight.device)).to(weight.dtype)


def default_time_cond_proj(model_channels: int, dim: int = GUIDANCE_DIM, seed: int = TIME_COND_PROJ_SEED) -> torch.Tensor:
    """The documented base of `time_cond_proj.weight` [model_channels, dim] for v1: `nn.Linear`'s default
    init U(-1/sqrt(dim), 1/sqrt(dim)) drawn from a CPU generator seeded with `seed` (the official loader
    draws it from the unseeded global generator, so no value is the official one)."""
    bound = 1.0 / math.sqrt(dim)
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(model_channels, dim).uniform_(-bound, bound, generator=generator)


@dataclass
class TurboParts:
    """A checked T2V-Turbo file, resolved against one U-Net config (see `prepare_turbo`).

    config: the Turbo U-Net's config (the base's plus the guidance layers).
    guidance: final `time_cond_proj.weight` (v1: base + LoRA delta) [, `motion_cond_proj.weight`,
    `combine_proj.weight`]. lora (v1): module name -> (up, down) for every other layer. weights (v2):
    every key of the base U-Net -> its new value.
    """

    version: str
    config: UNetConfig
    guidance: dict[str, torch.Tensor]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def motion(self) -> bool:
        """Whether the model has the v2 motion-guidance path."""
        return self.config.motion_cond_proj_dim is not None


def prepare_turbo(unet: UNetConfig | None, turbo: Mapping[str, torch.Tensor], time_cond_proj: torch.Tensor | None = None,
                  name: str = "this model") -> TurboParts:
    """Check a `load_turbo` result against a VideoCrafter2 U-Net config and resolve it into TurboParts.

    Every check (model kind, v1 layout and shapes in list order, v2 keys and shapes, the given
    `time_cond_proj` shape) runs here, before anything is merged. time_cond_proj: v1 only, the base
    weight [model_channels, 256]; None uses `default_time_cond_proj`."""
    require_videocrafter2(unet, name)
    version = turbo_version(turbo)
    if version == "v2":
        if time_cond_proj is not None:
            raise TurboError("time_cond_proj is the base weight of a v1 LoRA; a v2 file brings its own.")
        motion = turbo.get("motion_cond_proj.weight")
        config = replace(unet, time_cond_proj_dim=int(turbo["time_cond_proj.weight"].shape[-1]),
                         motion_cond_proj_dim=None if motion is None else int(motion.shape[-1]))
        expected = _meta_unet(config).state_dict()
        _check_state_dict(turbo, expected)
        guidance = {k: turbo[k] for k in GUIDANCE_KEYS if k in turbo}
        return TurboParts("v2", config, guidance, weights={k: v for k, v in turbo.items() if k not in guidance})
    config = replace(unet, time_cond_proj_dim=GUIDANCE_DIM, motion_cond_proj_dim=None)
    targets = lora_targets(_meta_unet(config))
    factors = lora_factors(turbo)
    check_lora(targets, factors)
    shape = dict(targets)["time_cond_proj"]
    if time_cond_proj is None:
        time_cond_proj = default_time_cond_proj(*shape)
    elif tuple(time_cond_proj.shape) != shape:
        raise TurboError(f"time_cond_proj has shape {list(time_cond_proj.shape)}; this model needs {list(shape)} "
                         f"([model_channels, {GUIDANCE_DIM}]).")
    lora = {target: pair for (target, _), pair in zip(targets, factors)}
    up, down = lora.pop("time_cond_proj")
    guidance = {"time_cond_proj.weight": merge_lora(time_cond_proj.float(), up, down)}
    return TurboParts("v1", config, guidance, lora=lora)


def _meta_unet(config: UNetConfig) -> UNet3D:
    with torch.device("meta"):
        return UNet3D(config)


def _check_state_dict(turbo: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(turbo))
    extra = sorted(set(turbo) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")]
                 if missing else [])
        parts += [f"unexpected {', '.join(extra[:4])}" + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")] if extra else []
        raise TurboError(f"The T2V-Turbo v2 U-Net does not match this model ({'; '.join(parts)}): it is made for "
                         "VideoCrafter2 320x512.")
    for key, value in expected.items():
        if tuple(turbo[key].shape) != tuple(value.shape):
            raise TurboError(f"The T2V-Turbo v2 weight '{key}' has shape {list(turbo[key].shape)}, where this model needs "
                             f"{list(value.shape)}: it is made for VideoCrafter2 320x512.")


def turbo_unet_weights(parts: TurboParts, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Turbo U-Net's whole state dict: v1 merges each LoRA into the base weight (new tensors; `base`
    is not changed), v2 takes its own weights. `base` is the plain U-Net's state dict (no prefix)."""
    if parts.version == "v2":
        weights = dict(parts.weights)
    else:
        weights = {key: (merge_lora(value, *parts.lora[key[:-len(".weight")]])
                         if key.endswith(".weight") and key[:-len(".weight")] in parts.lora else value)
                   for key, value in base.items()}
    weights.update(parts.guidance)
    return weights


def apply_turbo(bundle, turbo: Mapping[str, torch.Tensor], time_cond_proj: torch.Tensor | None = None):
    """A VideoCrafter2 bundle -> a new bundle whose U-Net is T2V-Turbo (v1 LoRA merged, or v2 weights)
    with the guidance embedding: `bundle.unet(x, t, context, fps=..., guidance=w, motion_guidance=m)`.

    turbo: `load_turbo`'s result. time_cond_proj: v1's base guidance projection [model_channels, 256]
    (None: `default_time_cond_proj`). The given bundle is left as it was; the new U-Net has the old
    one's dtype and device (merged in float32, then cast). The new bundle's `turbo` is "v1" or "v2" and
    its config's fps the official Turbo default (16 for v1, 8 for v2)."""
    parts = prepare_turbo(bundle.config.unet if bundle.unet is not None else None, turbo, time_cond_proj,
                          name=bundle.config.name)
    base = bundle.unet
    weights = turbo_unet_weights(parts, base.state_dict())
    unet = _meta_unet(parts.config)
    assign_weights(unet, {k: k for k in unet.state_dict()}, weights, base.dtype, _device(base))
    unet.eval().requires_grad_(False)
    defaults = TURBO_DEFAULTS[parts.version]
    config = bundle.config.replace(name=f"{bundle.config.name} + T2V-Turbo {parts.version}", unet=parts.config,
                                   fps=defaults.fps)
    return replace(bundle, config=config, unet=unet, turbo=parts.version)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass(frozen=True)
class TurboDefaults:
    """The official inference settings of one release."""

    steps: int
    guidance: float
    fps: int
    motion_guidance: float | None  # None: no motion path
    motion_percentage: float


TURBO_DEFAULTS = {
    # app.py / the README for v1
    "v1": TurboDefaults(steps=4, guidance=7.5, fps=16, motion_guidance=None, motion_percentage=0.0),
    # predict.py (the published v2 predictor): 16 steps, fps 8, motion guidance 0.05 over the first half
    "v2": TurboDefaults(steps=16, guidance=7.5, fps=8, motion_guidance=0.05, motion_percentage=0.5),
}


def random_turbo_lora(unet: UNetConfig, rank: int = 4, scale: float = 0.3, seed: int = 0) -> list[torch.Tensor]:
    """A random v1 LoRA for a VideoCrafter2-kind U-Net, in the official file format (a list to `torch.save`),
    for tests, host tests and benchmarks. Each up @ down has about `scale` times the std of a unit-variance
    weight's rows (N(0, 1/fan_in)); rank is clamped to min(in, out) as officially."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _, shape in lora_targets(_meta_unet(replace(unet, time_cond_proj_dim=GUIDANCE_DIM, motion_cond_proj_dim=None))):
        fan_in = math.prod(shape[1:])
        r = min(rank, shape[0], fan_in)
        down = torch.randn((r, *shape[1:]), generator=generator) / math.sqrt(fan_in)
        up = torch.randn((shape[0], r, *[1] * (len(shape) - 2)), generator=generator) * (scale / math.sqrt(r))
        out += [up, down]
    return out
