"""Perceiver resampler: CLIP patch tokens -> a few image context tokens (`image_proj_model.*`).

Learned query latents attend to [image features ; latents]; each layer is attention then a
GELU feed-forward, both residual. Output: `norm_out(proj_out(latents))`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .config import ResamplerConfig


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear (no bias) -> exact GELU -> Linear (no bias); keys 0, 1, 3."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to the concatenation of image features and latents."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # image features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] image features, latents: [B, Q, dim] -> [B, Q, dim] (no residual)."""
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads).float() for t in (q, k, v))
        # Official: q and k each scaled by dim_head^-1/4, softmax in float32. Same product as
        # SDPA's default 1/sqrt(dim_head); the whole attention runs in float32 here.
        out = F.scaled_dot_product_attention(q, k, v).to(latents.dtype)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Resampler(nn.Module):
    """[B, N, embedding_dim] CLIP tokens -> [B, num_queries, output_dim] context tokens."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.dim))
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        nn.init.normal_(self.latents, std=cfg.dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, embedding_dim] -> [B, num_queries, output_dim]."""
        x = self.proj_in(x.to(self.latents))
        latents = repeat(self.latents, "1 q d -> b q d", b=x.shape[0])
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
