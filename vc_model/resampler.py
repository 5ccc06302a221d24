"""Perceiver resampler: CLIP patch tokens -> a few image context tokens (`image_proj_model.*`).

Learned query latents attend to [image features ; latents]; each layer is attention then a
GELU feed-forward, both residual. Output: `norm_out(proj_out(latents))`.

`Resampler(cfg, ops=None, attention=None)`: layers from `ops` (default `vc_model.ops`), attention
through `attention` (ComfyUI's calling convention, default `attention.sdpa_attention`), run in
float32 as the official softmax is. Computes in the dtype of its input; `latents` (a parameter of
this non-leaf module, not of an ops layer) is cast to the input's dtype and device where used.
"""
from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from . import ops as default_ops
from .attention import sdpa_attention
from .config import ResamplerConfig


def feed_forward(dim: int, mult: int, ops=None) -> nn.Sequential:
    """LayerNorm -> Linear (no bias) -> exact GELU -> Linear (no bias); keys 0, 1, 3."""
    ops = ops or default_ops
    inner = dim * mult
    return nn.Sequential(
        ops.LayerNorm(dim),
        ops.Linear(dim, inner, bias=False),
        nn.GELU(),
        ops.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to the concatenation of image features and latents."""

    def __init__(self, dim: int, dim_head: int, heads: int, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        self.heads = heads
        self.attention = attention or sdpa_attention
        inner = dim_head * heads
        self.norm1 = ops.LayerNorm(dim)  # image features
        self.norm2 = ops.LayerNorm(dim)  # latents
        self.to_q = ops.Linear(dim, inner, bias=False)
        self.to_kv = ops.Linear(dim, inner * 2, bias=False)
        self.to_out = ops.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] image features, latents: [B, Q, dim] -> [B, Q, dim] (no residual)."""
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        # Official: q and k each scaled by dim_head^-1/4, softmax in float32. Same product as the
        # default 1/sqrt(dim_head); the whole attention runs in float32 here.
        out = self.attention(q.float(), k.float(), v.float(), self.heads, transformer_options={})
        return self.to_out(out.to(latents.dtype))


class Resampler(nn.Module):
    """[B, N, embedding_dim] CLIP tokens -> [B, num_queries, output_dim] context tokens."""

    def __init__(self, cfg: ResamplerConfig, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        self.cfg = cfg
        self.latents = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.dim))
        self.proj_in = ops.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = ops.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = ops.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads, ops, attention),
                           feed_forward(cfg.dim, cfg.ff_mult, ops)])
            for _ in range(cfg.depth)
        )
        nn.init.normal_(self.latents, std=cfg.dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, embedding_dim] -> [B, num_queries, output_dim], in x's dtype."""
        x = self.proj_in(x)
        latents = repeat(self.latents.to(device=x.device, dtype=x.dtype), "1 q d -> b q d", b=x.shape[0])
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
