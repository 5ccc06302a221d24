"""One VideoCrafter checkpoint -> MODEL, CLIP, VAE and (I2V) CLIP_VISION, all memory-managed.

The release is detected from the weights (`vc_model.detect_config`), never from the file name. The
U-Net (with the I2V resampler) becomes a `VideoCrafterModel` in a ModelPatcher, built from
`comfy.ops.pick_operations(...)` exactly as core `BaseModel` builds its U-Net (manual cast, fp8
storage, partial loading) with ComfyUI's `optimized_attention`; the text tower a core SD2 CLIP-H
(`comfy.sd.CLIP`), the VAE a core SD VAE that takes 5D video latents (`vae_io.VideoCrafterVAE`),
the CLIP vision tower a core CLIP vision model (`clip_vision.py`). Tensors are read once from the
file, straight into the storage dtype.

`weight_dtype` is the U-Net's storage dtype, like core UNETLoader's: fp8 formats are stored in 8 bits
and computed in bf16/fp16/fp32 by manual cast (`model_management.unet_manual_cast`); `auto` is
ComfyUI's choice, bf16 first where the device supports it.
"""
from __future__ import annotations

import logging
import math
import os

import torch

import comfy.ldm.modules.attention
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths

try:  # moved out of comfy/ in July 2024
    from comfy.text_encoders import sd2_clip
except ImportError:  # pragma: no cover - older hosts
    from comfy import sd2_clip

from ..vc_model.build import assign_weights, expected_shapes
from ..vc_model.checkpoint import COMPONENT_PREFIXES, CheckpointError, lazy_state_dict, with_unet_prefix
from ..vc_model.config import ModelConfig, TextEncoderConfig, VAEConfig
from ..vc_model.integrity import FiniteScan
from ..vc_model.schedule import Schedule, schedule_buffer_shapes
from .ckpt_check import inspect_checkpoint, inspect_unet
from .clip_vision import load_clip_vision
from .logic import clip_text_config, vae_config
from .model import ComfyVideoCrafterUNet, VideoCrafterLatent, VideoCrafterModel, VideoCrafterModelConfig
from .video_vae import VideoCrafterVAE

FOLDER = "videocrafter"
WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}
SUPPORTED_DTYPES = VideoCrafterModelConfig.supported_inference_dtypes


def register_folder() -> None:
    """models/videocrafter/ (plus any `videocrafter:` paths from extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass


def model_files(*folders: str) -> list[str]:
    """The files of ComfyUI model folders, one list (a name in several folders is listed once)."""
    return sorted(set().union(*(folder_paths.get_filename_list(folder) for folder in folders)))


def model_file(name: str, *folders: str) -> str:
    """The path of `name` in the first of `folders` that has it."""
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    places = [f"models/{folder}/" for folder in folders]
    where = f"is not in {places[0]}" if len(places) == 1 else f"is in neither {' nor '.join(places)}"
    raise FileNotFoundError(f"'{name}' {where}.")


def checkpoint_names() -> list[str]:
    """Files in models/videocrafter/ and models/checkpoints/ (videocrafter/ wins on equal names)."""
    return model_files(FOLDER, "checkpoints")


def checkpoint_path(name: str) -> str:
    return model_file(name, FOLDER, "checkpoints")


def unet_names() -> list[str]:
    """Files in models/videocrafter/ and models/diffusion_models/ (videocrafter/ wins on equal names)."""
    return model_files(FOLDER, "diffusion_models")


def unet_path(name: str) -> str:
    return model_file(name, FOLDER, "diffusion_models")


def lora_names() -> list[str]:
    return model_files("loras")


def load_lora_file(name: str) -> dict:
    return comfy.utils.load_torch_file(model_file(name, "loras"), safe_load=True)


def _release(state_dict, prefix: str) -> None:
    """ComfyUI's CLIP and VAE copy their weights into modules of their own: give back the file pages
    the copies were read from (see `vc_model.checkpoint.FilePages`; values never change). A plain dict
    in memory (random weights, a caller's own tensors) has no file pages to give back."""
    if not hasattr(state_dict, "release"):
        return
    for key in state_dict:
        if key.startswith(prefix):
            state_dict.release(key)


def _tensors(state_dict, prefix: str, dtype, device) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, without it; NaN/inf values are logged (ComfyUI reads them next anyway)."""
    out, scan = {}, FiniteScan()
    for key in state_dict:
        if key.startswith(prefix):
            tensor = state_dict[key]
            out[key[len(prefix):]] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            scan.add(key, out[key[len(prefix):]], tensor)
    scan.warn(state_dict)
    return out


def _parameter_count(config: ModelConfig, prefixes: tuple[str, ...]) -> int:
    return sum(math.prod(shape) for key, shape in expected_shapes(config).items() if key.startswith(prefixes))


def _dtypes(choice: str, params: int, load_device) -> tuple[torch.dtype, torch.dtype | None]:
    """(storage dtype, manual-cast compute dtype or None) as core UNETLoader picks them."""
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {choice!r}.")
    dtype = WEIGHT_DTYPES[choice] or mm.unet_dtype(model_params=params, supported_dtypes=SUPPORTED_DTYPES)
    return dtype, mm.unet_manual_cast(dtype, load_device, SUPPORTED_DTYPES)


def operations(model_config: VideoCrafterModelConfig):
    """The ops namespace core `BaseModel.__init__` would pick for this model config."""
    if model_config.custom_operations is not None:
        return model_config.custom_operations
    return comfy.ops.pick_operations(model_config.unet_config.get("dtype", None), model_config.manual_cast_dtype,
                                     fp8_optimizations=model_config.optimizations.get("fp8", False),
                                     model_config=model_config)


def _schedule(state_dict, config: ModelConfig) -> Schedule:
    names = schedule_buffer_shapes(config.schedule)
    present = {k: state_dict[k] for k in names if k in state_dict}
    if not present:
        return Schedule.from_config(config.schedule)
    try:
        return Schedule.from_buffers(config.schedule, present)
    except ValueError as error:
        raise CheckpointError(f"The checkpoint's schedule buffers are unusable: {error}") from None


def _diffusion_model(state_dict, config: ModelConfig, dtype, device, ops) -> ComfyVideoCrafterUNet:
    resampler = config.image_encoder.resampler if config.image_encoder is not None else None
    with torch.device("meta"):
        unet = ComfyVideoCrafterUNet(config.unet, resampler, ops=ops,
                                     attention=comfy.ldm.modules.attention.optimized_attention)
    proj = "image_proj_model."
    names = {k: COMPONENT_PREFIXES["image_proj"] + k[len(proj):] if k.startswith(proj) else COMPONENT_PREFIXES["unet"] + k
             for k in unet.state_dict()}
    assign_weights(unet, names, state_dict, dtype, device)
    return unet.eval().requires_grad_(False)


def _clip(state_dict, cfg: TextEncoderConfig) -> comfy.sd.CLIP:
    prefix = COMPONENT_PREFIXES["text_encoder"]
    weights = {"clip_h." + k: v for k, v in _tensors(state_dict, prefix, None, "cpu").items()}
    weights = comfy.utils.clip_text_transformers_convert(weights, "clip_h.", "clip_h.transformer.")
    sizes = clip_text_config(cfg)  # the core SD2 CLIP-H config, sized to this checkpoint's tower
    target = comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
    params = sum(t.numel() for t in weights.values())
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                        state_dict=weights, parameters=params, model_options={"clip_h_model_config": sizes})
    _release(state_dict, prefix)
    return clip


def _vae(state_dict, cfg: VAEConfig) -> VideoCrafterVAE:
    weights = _tensors(state_dict, COMPONENT_PREFIXES["vae"], None, "cpu")
    config = vae_config(cfg, VAEConfig())
    vae = VideoCrafterVAE(sd=weights, config=config)
    _release(state_dict, COMPONENT_PREFIXES["vae"])
    return vae


def _model_patcher(state_dict, config: ModelConfig, weight_dtype: str,
                   clip_vision=None) -> comfy.model_patcher.ModelPatcher:
    """The MODEL: the U-Net (with the I2V resampler) and the schedule of `config`, in a ModelPatcher."""
    load_device = mm.get_torch_device()
    params = _parameter_count(config, (COMPONENT_PREFIXES["unet"], COMPONENT_PREFIXES["image_proj"]))
    dtype, manual_cast = _dtypes(weight_dtype, params, load_device)

    model_config = VideoCrafterModelConfig(config)
    model_config.latent_format = VideoCrafterLatent((config.vae or VAEConfig()).scale_factor)
    model_config.set_inference_dtype(dtype, manual_cast)
    if weight_dtype == "fp8_e4m3fn_fast":
        model_config.optimizations["fp8"] = True
    diffusion = _diffusion_model(state_dict, config, dtype, mm.unet_inital_load_device(params, dtype),
                                 operations(model_config))
    model = VideoCrafterModel(model_config, diffusion, _schedule(state_dict, config), clip_vision=clip_vision)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    logging.info("VideoCrafter: %s U-Net weights %s, compute %s", config.name, dtype, manual_cast or dtype)
    return patcher


def build_models(state_dict, config: ModelConfig, weight_dtype: str = "auto"):
    """load_checkpoint's work on a state dict in the official layout, whose keys and shapes match `config`.

    Each weight is held once: the U-Net is assigned tensor by tensor (file pages given back after each
    copy, or the file's pages used as they are). ComfyUI's CLIP, VAE and CLIP vision copy their whole
    part of the file before its pages can be given back, so they are built first, while the U-Net does
    not exist yet: loading then peaks at about the weights held at the end."""
    clip = _clip(state_dict, config.text_encoder)
    vae = _vae(state_dict, config.vae)
    clip_vision = None
    if config.image_encoder is not None:
        clip_vision = load_clip_vision(state_dict, config.image_encoder)
        _release(state_dict, COMPONENT_PREFIXES["image_clip"])
    patcher = _model_patcher(state_dict, config, weight_dtype, clip_vision)
    return patcher, clip, vae, clip_vision, config


def load_unet(path: str, weight_dtype: str = "auto"):
    """A U-Net-only file (or the U-Net of a full checkpoint) -> (ModelPatcher, ModelConfig)."""
    config = inspect_unet(path).replace(vae=None, text_encoder=None, image_encoder=None)  # other parts unused
    return _model_patcher(with_unet_prefix(lazy_state_dict(path)), config, weight_dtype), config


def load_checkpoint(path: str, weight_dtype: str = "auto"):
    """-> (ModelPatcher, comfy.sd.CLIP, VideoCrafterVAE, core ClipVisionModel or None, ModelConfig)."""
    config = inspect_checkpoint(path)
    out = build_models(lazy_state_dict(path), config, weight_dtype)
    logging.info("VideoCrafter: loaded %s (%s)", os.path.basename(path), config.name)
    return out
