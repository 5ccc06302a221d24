"""OpenCLIP text tower read at the penultimate layer (`cond_stage_model.model.*`).

The blocks are open_clip's `Transformer` modules (so the parameter names are exactly the
checkpoint's `transformer.resblocks.N.*`), but the forward pass is our own: it only reads the
blocks' parameters, so it does not depend on open_clip's tensor layout (sequence-first in 2.x,
batch-first in 3.x) or on its buffers. `residual_block` is shared with the CLIP vision tower.

open_clip is imported lazily: importing it takes seconds (it pulls in torchvision), which would
otherwise be paid by everything that imports `vc_model`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TextEncoderConfig

SOT_TOKEN = 49406
EOT_TOKEN = 49407
PAD_TOKEN = 0


def build_blocks(width: int, layers: int, heads: int, mlp_ratio: float) -> nn.Module:
    """open_clip's `Transformer`: `resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`.

    Only its parameters are used; `residual_block` below is the forward pass.
    """
    from open_clip.transformer import Transformer

    return Transformer(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio, act_layer=nn.GELU)


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Multi-head self-attention with the weights of an `nn.MultiheadAttention`. x: [B, N, width]."""
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attn.out_proj(rearrange(out, "b h n d -> b n (h d)"))


def residual_block(block: nn.Module, x: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """One pre-LayerNorm CLIP block (attention, then GELU MLP, both residual). x: [B, N, width]."""
    x = x + self_attention(block.attn, block.ln_1(x), heads, causal)
    return x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))


def tokenize(prompts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's SimpleTokenizer: [SOT, bpe..., EOT] padded with 0, cut to `context_length`
    with the last kept token forced to EOT. Returns LongTensor [B, context_length]."""
    import open_clip

    if isinstance(prompts, str):
        prompts = [prompts]
    return open_clip.tokenize(list(prompts), context_length=context_length)


class TextEncoder(nn.Module):
    """OpenCLIP text transformer; `forward` returns the per-token features of block L-1-skip
    (the "penultimate" layer for skip_last_layers=1) after `ln_final`: [B, 77, width].

    `text_projection` and `logit_scale` are held only because the checkpoint has them.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = build_blocks(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self):
        """open_clip-like random init (real weights always come from a checkpoint)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.cfg.width ** -0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> LongTensor [B, context_length] (see module-level `tokenize`)."""
        return tokenize(prompts, self.cfg.context_length)

    def forward(self, prompts: str | list[str] | torch.Tensor) -> torch.Tensor:
        """prompts: list of strings or token ids [B, n<=context_length] -> [B, n, width]."""
        tokens = prompts if torch.is_tensor(prompts) else self.tokenize(prompts)
        tokens = tokens.to(self.token_embedding.weight.device)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        used = len(self.transformer.resblocks) - self.cfg.skip_last_layers
        for block in self.transformer.resblocks[:used]:
            x = residual_block(block, x, self.cfg.heads, causal=True)
        return self.ln_final(x)
