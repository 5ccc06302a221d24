"""The I2V checkpoint's CLIP vision tower as a core CLIP_VISION, and the official image tokens from it.

The embedder (`embedder.model.visual.*`, OpenCLIP ViT-H/14 in the releases) becomes a core
`comfy.clip_vision.ClipVisionModel` sized from the detected config, so ComfyUI loads, offloads and
casts it like any CLIP vision model, and core nodes (CLIP Vision Encode, ...) accept it. It is the
same network as ComfyUI's `clip_vision_h.safetensors`, which therefore works in its place.

`image_tokens` keeps the official path: the image squashed to 224x224 by kornia's antialiased
bicubic resize without crop (`vc_model.image_encoder.preprocess`), then all tokens of the last
block, before `ln_post`.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

import comfy.clip_vision
import comfy.model_management as mm

from ..vc_model.checkpoint import COMPONENT_PREFIXES
from ..vc_model.config import ImageEncoderConfig
from ..vc_model.image_encoder import preprocess
from .guards import explain_out_of_memory
from .logic import grey_images, images_to_model


def clip_vision_config(cfg: ImageEncoderConfig) -> dict:
    """ComfyUI's CLIP vision config (`clip_vision_config_h.json` for the releases) for `cfg`."""
    return {
        "hidden_act": "gelu", "hidden_size": cfg.width, "image_size": cfg.image_size,
        "intermediate_size": int(round(cfg.width * cfg.mlp_ratio)), "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model", "num_attention_heads": cfg.heads, "num_channels": 3,
        "num_hidden_layers": cfg.layers, "patch_size": cfg.patch_size, "projection_dim": cfg.embed_dim,
    }


def load_clip_vision(state_dict, cfg: ImageEncoderConfig) -> comfy.clip_vision.ClipVisionModel:
    """The checkpoint's `embedder.model.visual.*` as a core ClipVisionModel (every key must load)."""
    prefix = COMPONENT_PREFIXES["image_clip"]
    weights = {k: state_dict[k] for k in state_dict if k.startswith(prefix)}
    weights = comfy.clip_vision.convert_to_transformers(weights, prefix)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(clip_vision_config(cfg), file)
    try:
        model = comfy.clip_vision.ClipVisionModel(file.name)
    finally:
        os.unlink(file.name)
    missing, unexpected = model.load_sd(weights)
    if missing or unexpected:
        raise ValueError(f"The CLIP image encoder's weights do not fit a CLIP vision model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}).")
    return model


def image_tokens(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] in [0,1] -> CLIP tokens [B, 1 + patches, width] (float32), official preprocessing."""
    return _tokens(clip_vision, images_to_model(images))


def grey_tokens(clip_vision, batch: int = 1) -> torch.Tensor:
    """Tokens of the official unconditional (mid-grey) image."""
    return _tokens(clip_vision, grey_images(batch, clip_vision.image_size))


def _tokens(clip_vision, pixels: torch.Tensor) -> torch.Tensor:
    describe = lambda: (f"encoding {pixels.shape[0]} start images with the CLIP image encoder",  # noqa: E731
                        "use fewer images in the batch")
    with explain_out_of_memory(describe):
        mm.load_model_gpu(clip_vision.patcher)
        x = preprocess(pixels.to(clip_vision.load_device), clip_vision.image_size)
        tokens = clip_vision.model(pixel_values=x, intermediate_output=-2)[0]
        return tokens.to(mm.intermediate_device(), torch.float32)


def open_clip_state_dict(clip_vision_sd: dict) -> dict:
    """A core CLIP vision state dict (transformers layout) back in the checkpoint's OpenCLIP layout,
    under `embedder.model.visual.` (for CheckpointSave)."""
    prefix = COMPONENT_PREFIXES["image_clip"]
    names = {"vision_model.embeddings.class_embedding": "class_embedding",
             "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
             "vision_model.embeddings.position_embedding.weight": "positional_embedding",
             "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
             "vision_model.post_layernorm.weight": "ln_post.weight", "vision_model.post_layernorm.bias": "ln_post.bias"}
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out, qkv = {}, {}
    for key, tensor in clip_vision_sd.items():
        if key in names:
            out[prefix + names[key]] = tensor
        elif key == "visual_projection.weight":
            out[prefix + "proj"] = tensor.transpose(0, 1)
        elif key.startswith("vision_model.encoder.layers."):
            index, rest = key[len("vision_model.encoder.layers."):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, leaf), {})[module[-6]] = tensor
            else:
                out[block + layer[module] + "." + leaf] = tensor
    for (block, leaf), parts in qkv.items():
        out[f"{block}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {k: v.contiguous() for k, v in out.items()}
