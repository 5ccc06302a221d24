"""CLIP image conditioning for I2V: OpenCLIP ViT vision tower tokens + Perceiver resampler.

`ImageEncoder.clip` holds `embedder.model.visual.*`, `ImageEncoder.resampler` holds
`image_proj_model.*`. The official embedder also keeps some text-tower leftovers
(`embedder.model.token_embedding.weight`, ...); they are never used, so they are not held here:
`image_encoder_unused_keys` names them for the loader.

`ClipVision(cfg, ops=None)` builds its stem (`conv1`) and norms (`ln_pre`, `ln_post`) from `ops`
(default `vc_model.ops`); its transformer blocks stay open_clip's modules read by
`text_encoder.residual_block` (ComfyUI runs the tower as a core CLIP vision model instead). The
class and positional embeddings (parameters of this non-leaf module) are cast to the tokens'
dtype and device where used. `ImageEncoder(cfg, ops=None, attention=None)` passes both on to
its resampler.
"""
from __future__ import annotations

import kornia
import torch
from einops import rearrange, repeat
from torch import nn

from . import ops as default_ops
from .config import ImageEncoderConfig
from .resampler import Resampler
from .text_encoder import build_blocks, residual_block

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, size, size] CLIP-normalised, float32.

    Squashed to a square (no crop, no aspect ratio kept) with kornia's antialiased bicubic
    resize (align_corners=True); an image already size x size is not resampled.
    """
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = kornia.geometry.resize(x, (size, size), interpolation="bicubic", align_corners=True, antialias=True)
    x = (x + 1) / 2
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipVision(nn.Module):
    """OpenCLIP ViT vision tower; `forward` returns the tokens of the last block, before
    `ln_post` and `proj` (both held only because the checkpoint has them)."""

    def __init__(self, cfg: ImageEncoderConfig, ops=None):
        super().__init__()
        ops = ops or default_ops
        self.cfg = cfg
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.conv1 = ops.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = ops.LayerNorm(width)
        self.transformer = build_blocks(width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = ops.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, cfg.embed_dim))
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(p, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the open_clip blocks' (and the embeddings') weights."""
        return self.positional_embedding.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, 1 + (image_size/patch_size)^2, width], computed in
        the dtype of the weights (the pixels are preprocessed in float32, then cast)."""
        x = preprocess(images.to(self.positional_embedding.device), self.cfg.image_size).to(self.dtype)
        x = rearrange(self.conv1(x), "b c h w -> b (h w) c")
        cls = repeat(self.class_embedding.to(x), "c -> b 1 c", b=x.shape[0])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = residual_block(block, x, self.cfg.heads)
        return x


class ImageEncoder(nn.Module):
    """Image -> I2V image context tokens: `resampler(clip(images))`."""

    def __init__(self, cfg: ImageEncoderConfig, ops=None, attention=None):
        super().__init__()
        self.cfg = cfg
        self.clip = ClipVision(cfg, ops)
        self.resampler = Resampler(cfg.resampler, ops, attention)

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, num_queries, output_dim]."""
        return self.resampler(self.clip(images))

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """The official classifier-free-guidance image: all zeros in [-1, 1] (mid-grey), 224 x 224.
        Returns [batch_size, num_queries, output_dim]."""
        size = self.cfg.image_size
        return self(torch.zeros(batch_size, 3, size, size, device=self.clip.positional_embedding.device))


def image_encoder_unused_keys(cfg: ImageEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Full checkpoint names -> shapes of the text-tower leftovers the official I2V embedder keeps
    (`embedder.model.*` outside `visual.`). They are never used; a loader accepts and drops them."""
    text = cfg.text
    prefix = "embedder.model."
    shapes = {
        "token_embedding.weight": (text.vocab_size, text.width),
        "positional_embedding": (text.context_length, text.width),
        "ln_final.weight": (text.width,),
        "ln_final.bias": (text.width,),
        "text_projection": (text.width, text.embed_dim),
        "logit_scale": (),
    }
    return {prefix + k: v for k, v in shapes.items()}
