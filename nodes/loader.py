"""One VideoCrafter checkpoint -> MODEL, CLIP, VAE and (I2V) the image encoder, all memory-managed.

The release is detected from the weights (`vc_model.detect_config`), never from the file name. The
U-Net (with the I2V resampler) becomes a `VideoCrafterModel` in a ModelPatcher; the text tower a core
SD2 CLIP-H (`comfy.sd.CLIP`), the VAE a core `comfy.sd.VAE`, the CLIP vision tower our own module in a
ModelPatcher. Tensors are read once from the file, straight into the target dtype.
"""
from __future__ import annotations

import logging
import math
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
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
from ..vc_model.image_encoder import ImageEncoder
from ..vc_model.integrity import FiniteScan
from ..vc_model.schedule import Schedule, schedule_buffer_shapes
from .ckpt_check import inspect_checkpoint, inspect_unet
from .diffusion import VideoCrafterUNet
from .guards import explain_out_of_memory
from .logic import clip_text_config, grey_images, images_to_model, vae_config
from .model import VideoCrafterLatent, VideoCrafterModel, VideoCrafterModelConfig

FOLDER = "videocrafter"
WEIGHT_DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUPPORTED_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


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


def checkpoint_names() -> list[str]:
    """Files in models/videocrafter/ and models/checkpoints/ (videocrafter/ wins on equal names)."""
    return sorted(set(folder_paths.get_filename_list(FOLDER)) | set(folder_paths.get_filename_list("checkpoints")))


def checkpoint_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise FileNotFoundError(f"'{name}' is in neither models/{FOLDER}/ nor models/checkpoints/.")
    return path


def unet_names() -> list[str]:
    """Files in models/videocrafter/ and models/diffusion_models/ (videocrafter/ wins on equal names)."""
    return sorted(set(folder_paths.get_filename_list(FOLDER)) | set(folder_paths.get_filename_list("diffusion_models")))


def unet_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path("diffusion_models", name)
    if path is None:
        raise FileNotFoundError(f"'{name}' is in neither models/{FOLDER}/ nor models/diffusion_models/.")
    return path


class VideoCrafterImageEncoder:
    """The I2V checkpoint's CLIP vision tower under model management: IMAGE -> CLIP patch tokens."""

    def __init__(self, tower: torch.nn.Module, image_size: int):
        self.image_size = image_size
        self.load_device = mm.text_encoder_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            tower, load_device=self.load_device, offload_device=mm.text_encoder_offload_device())

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        describe = lambda: (f"encoding {pixels.shape[0]} start images with the CLIP image encoder",  # noqa: E731
                            "use fewer images in the batch")
        with explain_out_of_memory(describe):
            mm.load_model_gpu(self.patcher)
            tokens = self.patcher.model(pixels.to(self.load_device))
            return tokens.to(mm.intermediate_device(), torch.float32)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B,H,W,C] in [0,1] -> [B, tokens, width]: official squash to 224, no crop."""
        return self._run(images_to_model(images))

    def encode_grey(self, batch: int = 1) -> torch.Tensor:
        """Tokens of the official unconditional (mid-grey) image, [batch, tokens, width]."""
        return self._run(grey_images(batch, self.image_size))


def _release(state_dict, prefix: str) -> None:
    """ComfyUI's CLIP and VAE copy their weights into modules of their own: give back the file pages
    the copies were read from (see `vc_model.checkpoint.FilePages`; values never change)."""
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


def _weight_dtype(choice: str, params: int, load_device) -> torch.dtype:
    """ComfyUI's choice for `auto`; our modules compute in their weight dtype, so a dtype the device
    cannot compute in is replaced by ComfyUI's manual-cast dtype for it (fp32 on CPUs)."""
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {choice!r}.")
    dtype = WEIGHT_DTYPES[choice] or mm.unet_dtype(model_params=params, supported_dtypes=SUPPORTED_DTYPES)
    manual = mm.unet_manual_cast(dtype, load_device, SUPPORTED_DTYPES)
    if manual is not None and manual != dtype:
        logging.info("VideoCrafter: %s weights cannot run on %s; using %s.", dtype, load_device, manual)
        dtype = manual
    return dtype


def _schedule(state_dict, config: ModelConfig) -> Schedule:
    names = schedule_buffer_shapes(config.schedule)
    present = {k: state_dict[k] for k in names if k in state_dict}
    if not present:
        return Schedule.from_config(config.schedule)
    try:
        return Schedule.from_buffers(config.schedule, present)
    except ValueError as error:
        raise CheckpointError(f"The checkpoint's schedule buffers are unusable: {error}") from None


def _diffusion_model(state_dict, config: ModelConfig, dtype, device) -> VideoCrafterUNet:
    resampler = config.image_encoder.resampler if config.image_encoder is not None else None
    with torch.device("meta"):
        unet = VideoCrafterUNet(config.unet, resampler)
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


def _vae(state_dict, cfg: VAEConfig) -> comfy.sd.VAE:
    weights = _tensors(state_dict, COMPONENT_PREFIXES["vae"], None, "cpu")
    config = vae_config(cfg, VAEConfig())
    vae = comfy.sd.VAE(sd=weights, config=config)
    _release(state_dict, COMPONENT_PREFIXES["vae"])
    return vae


def _image_encoder(state_dict, config: ModelConfig) -> VideoCrafterImageEncoder:
    cfg = config.image_encoder
    load_device = mm.text_encoder_device()
    dtype = mm.text_encoder_dtype(load_device)
    dtype = mm.unet_manual_cast(dtype, load_device, SUPPORTED_DTYPES) or dtype  # our tower computes in its weight dtype
    with torch.device("meta"):
        tower = ImageEncoder(cfg).clip
    names = {k: COMPONENT_PREFIXES["image_clip"] + k for k in tower.state_dict()}
    assign_weights(tower, names, state_dict, dtype, mm.text_encoder_offload_device())
    return VideoCrafterImageEncoder(tower.eval().requires_grad_(False), cfg.image_size)


def _model_patcher(state_dict, config: ModelConfig, weight_dtype: str, path: str) -> comfy.model_patcher.ModelPatcher:
    """The MODEL: the U-Net (with the I2V resampler) and the schedule of `config`, in a ModelPatcher."""
    load_device = mm.get_torch_device()
    params = _parameter_count(config, (COMPONENT_PREFIXES["unet"], COMPONENT_PREFIXES["image_proj"]))
    dtype = _weight_dtype(weight_dtype, params, load_device)

    model_config = VideoCrafterModelConfig(config)
    model_config.latent_format = VideoCrafterLatent((config.vae or VAEConfig()).scale_factor)
    model_config.set_inference_dtype(dtype, None)
    diffusion = _diffusion_model(state_dict, config, dtype, mm.unet_inital_load_device(params, dtype))
    model = VideoCrafterModel(model_config, diffusion, _schedule(state_dict, config))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    logging.info("VideoCrafter: loaded %s (%s) as %s", os.path.basename(path), config.name, dtype)
    return patcher


def load_unet(path: str, weight_dtype: str = "auto"):
    """A U-Net-only file (or the U-Net of a full checkpoint) -> (ModelPatcher, ModelConfig)."""
    config = inspect_unet(path).replace(vae=None, text_encoder=None, image_encoder=None)  # other parts unused
    return _model_patcher(with_unet_prefix(lazy_state_dict(path)), config, weight_dtype, path), config


def load_checkpoint(path: str, weight_dtype: str = "auto"):
    """-> (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE, VideoCrafterImageEncoder or None, ModelConfig).

    Each weight is held once: the U-Net and the image tower are assigned tensor by tensor (file
    pages given back after each copy, or the file's pages used as they are). ComfyUI's CLIP and VAE
    read their whole part of the file before its pages can be given back, so they are built first,
    while the U-Net does not exist yet: loading then peaks at about the weights held at the end."""
    config = inspect_checkpoint(path)
    state_dict = lazy_state_dict(path)
    clip = _clip(state_dict, config.text_encoder)
    vae = _vae(state_dict, config.vae)
    image_encoder = _image_encoder(state_dict, config) if config.image_encoder is not None else None
    patcher = _model_patcher(state_dict, config, weight_dtype, path)
    return patcher, clip, vae, image_encoder, config
