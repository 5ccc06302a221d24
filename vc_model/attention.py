"""Attention layers of the VideoCrafter 3D U-Net.

Parameter names follow the official checkpoint (`to_q`, `to_out.0`, `ff.net.0.proj`,
`relative_position_k.embeddings_table`, `to_k_ip`, ...). All attention goes through
`F.scaled_dot_product_attention`, whose default scale `dim_head ** -0.5` is the official one.

Token layouts:
- SpatialTransformer: frames folded into the batch, `(b t) (h w) c`; its cross-attention sees the
  frames of one video as one long query sequence `b (t h w) c`, so the text/image context is used
  once per video instead of being repeated per frame (same result: every query row attends
  independently to the same keys).
  With per-frame context [b, t, L, D] (prompt travel) it runs per frame, `(b t) (h w) c`.
- TemporalTransformer: spatial positions folded into the batch, `(b h w) t c`. With a FreeNoise
  window (`vc_model.freenoise`) both of its self-attentions run in overlapping windows of frames.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .freenoise import windowed_attention


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] -> [B, heads, N, d] (a view)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]."""
    return x.transpose(1, 2).flatten(2)


class RelativePosition(nn.Module):
    """Learned embeddings of the clipped key-minus-query offset, shared by all heads.

    `embeddings_table`: [2*max_distance + 1, dim_head].
    """

    def __init__(self, dim_head: int, max_distance: int):
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, dim_head))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, n_q: int, n_k: int) -> torch.Tensor:
        """-> [n_q, n_k, dim_head], entry [i, j] = table[clamp(j - i) + max_distance]."""
        device = self.embeddings_table.device
        offset = torch.arange(n_k, device=device)[None, :] - torch.arange(n_q, device=device)[:, None]
        offset = offset.clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.embeddings_table[offset]


def relative_position_attention(q, k, v, emb_k, emb_v):
    """Softmax attention with relative position terms, as one SDPA call.

    q, k, v: [B, H, n, d]; emb_k, emb_v: [n_q, n_k, d].
    logits[i, j] = scale*q_i.k_j + scale*q_i.emb_k[i, j];  out_i = sum_j p_ij (v_j + emb_v[i, j]).
    Each query gets its key-term row r_i = (q_i.emb_k[i, j])_j appended and each key/value the one-hot
    e_j, so the augmented dot product is q_i.k_j + r_ij and the augmented output carries the
    probability row p_i. Equal head widths keep SDPA on its fused kernel (an additive mask plus a
    wider v would send it to the slow reference path).
    """
    n_k, d = k.shape[-2], q.shape[-1]
    eye = torch.eye(n_k, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], n_k, n_k)
    q = torch.cat([q, torch.einsum("bhid,ijd->bhij", q, emb_k)], dim=-1)
    out = F.scaled_dot_product_attention(q, torch.cat([k, eye], dim=-1), torch.cat([v, eye], dim=-1),
                                         scale=d ** -0.5)
    out, probs = out.split([d, n_k], dim=-1)
    return out + torch.einsum("bhij,ijd->bhid", probs, emb_v)


class Attention(nn.Module):
    """Multi-head attention (`CrossAttention` in the official code).

    Self-attention when `context_dim` is None. Options: relative position tables (temporal
    layers of VideoCrafter1 T2V) and a decoupled image branch (`to_k_ip`, `to_v_ip`, I2V), whose
    output is added scaled by `image_scale`.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, max_relative_position: int = 0, image_attention: bool = False,
                 temporal: bool = False):
        super().__init__()
        self.temporal = temporal  # self-attention over frames: FreeNoise windows apply
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))
        self.relative_position_k = self.relative_position_v = None
        if max_relative_position:
            self.relative_position_k = RelativePosition(dim_head, max_relative_position)
            self.relative_position_v = RelativePosition(dim_head, max_relative_position)
        self.image_attention = image_attention
        self.image_scale = 1.0
        if image_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
        """x [B, N, query_dim]; context [B, L, context_dim] (None: self-attention);
        image_context [B, M, context_dim] (image branch, only with image_attention) -> [B, N, query_dim].
        window (temporal layers): FreeNoise's (window, stride) over the N frames, None: all frames."""
        h = self.heads
        context = x if context is None else context
        q = split_heads(self.to_q(x), h)
        k = split_heads(self.to_k(context), h)
        v = split_heads(self.to_v(context), h)
        if self.temporal and window is not None:
            out = windowed_attention(self.attend, q, k, v, *window)
        else:
            out = self.attend(q, k, v)
        if image_context is not None and self.image_scale != 0:
            if not self.image_attention:
                raise ValueError("image_context was given but this attention layer has no image branch")
            k_ip = split_heads(self.to_k_ip(image_context), h)
            v_ip = split_heads(self.to_v_ip(image_context), h)
            out = out + self.image_scale * F.scaled_dot_product_attention(q, k_ip, v_ip)
        return self.to_out(merge_heads(out))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of q [B, H, n, d] to k, v [B, H, m, d] (plus relative positions for n, m)."""
        if self.relative_position_k is None:
            return F.scaled_dot_product_attention(q, k, v)
        n_q, n_k = q.shape[-2], k.shape[-2]
        return relative_position_attention(q, k, v, self.relative_position_k(n_q, n_k),
                                           self.relative_position_v(n_q, n_k))


class GEGLU(nn.Module):
    """Linear to 2*dim_out; first half is the value, second half the (exact GELU) gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


# Bytes of GEGLU intermediate ([tokens, 2 * mult * dim]) one feed-forward chunk may hold. The
# intermediate is the U-Net's largest activation (8x the residual stream); running the tokens in
# chunks bounds it without changing any result (every token is independent).
FF_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}


class FeedForward(nn.Module):
    """`net.0` GEGLU(dim -> mult*dim), `net.1` dropout (inference: identity), `net.2` Linear back.

    Runs over the tokens in chunks of at most `FF_CHUNK_BYTES` of intermediate when not training."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]"""
        tokens = x.shape[:-1].numel()
        per_token = self.net[0].proj.out_features * x.element_size()
        chunk = max(1, FF_CHUNK_BYTES.get(x.device.type, 256 << 20) // per_token)
        if tokens <= chunk or (self.training and torch.is_grad_enabled()):
            return self.net(x)
        flat = x.reshape(tokens, x.shape[-1])
        out = torch.empty_like(flat)
        for start in range(0, tokens, chunk):
            out[start:start + chunk] = self.net(flat[start:start + chunk])
        return out.view(x.shape)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, second attention, GEGLU feed-forward.

    `attn2` is cross-attention to the context when `context_dim` is given, otherwise a second
    self-attention (temporal layers).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 max_relative_position: int = 0, image_attention: bool = False, temporal: bool = False):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, max_relative_position, temporal=temporal)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, max_relative_position, image_attention,
                               temporal=temporal)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cross = context_dim is not None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
        """x [G, S, N, dim]: self-attention over N tokens in each of G*S groups; the cross-attention
        sees the S*N tokens of a group as one query sequence against context [G, L, D], or, with
        per-frame context [G, S, L, D], each group of N tokens against its own context row.
        window: FreeNoise (window, stride) of temporal blocks."""
        g, s, n, c = x.shape
        x = self.attn1(self.norm1(x).view(g * s, n, c), window=window).view(g, s, n, c) + x
        if self.cross and context.ndim == 4:  # per-frame context (prompt travel)
            image = None if image_context is None else image_context.repeat_interleave(s, dim=0)
            h = self.attn2(self.norm2(x).view(g * s, n, c), context.flatten(0, 1), image)
        elif self.cross:
            h = self.attn2(self.norm2(x).view(g, s * n, c), context, image_context)
        else:
            h = self.attn2(self.norm2(x).view(g * s, n, c), window=window)
        x = h.view(g, s, n, c) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer: GroupNorm(eps 1e-6), Linear proj_in, blocks, Linear proj_out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 image_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, image_attention=image_attention)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        """x [(b t), c, h, w]; context [b, L, D] or per frame [b, t, L, D]; image_context [b, M, D] or
        None -> like x."""
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "(b t) c h w -> b t (h w) c", t=frames)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, image_context)
        h = self.proj_out(h)
        return x + rearrange(h, "b t (h w) c -> (b t) c h w", h=height, w=width)


class TemporalTransformer(nn.Module):
    """Per-location transformer over frames: GroupNorm(eps 1e-6) pooled over all frames, proj_in,
    blocks of two self-attentions, proj_out, residual.

    `conv_proj` (the `init_attn` layer) keeps the official kernel-1 Conv1d projections
    (weights [inner, c, 1]); they are applied as the equal matrix product on channel-last tokens.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1,
                 max_relative_position: int = 0, conv_proj: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        proj = (lambda i, o: nn.Conv1d(i, o, 1)) if conv_proj else nn.Linear
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, None, max_relative_position, temporal=True)
            for _ in range(depth))
        self.proj_out = proj(inner, channels)

    @staticmethod
    def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = layer.weight
        return F.linear(x, weight.squeeze(-1) if weight.ndim == 3 else weight, layer.bias)

    def forward(self, x: torch.Tensor, frames: int, window: tuple[int, int] | None = None) -> torch.Tensor:
        """x [(b t), c, h, w] -> same shape. window: FreeNoise's (window, stride) for both self-attentions."""
        height, width = x.shape[-2:]
        # One copy into contiguous tokens [b, (h w), t, c]. Viewed as [b, c, (h w), t] this is a
        # channels-last tensor, so GroupNorm pools each group over all frames and positions in place.
        h = rearrange(x, "(b t) c h w -> b (h w) t c", t=frames).contiguous()
        h = self.norm(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h = self._project(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, window=window)
        h = self._project(self.proj_out, h)
        # Residual on 5D views: the sum takes x's memory layout without an extra copy of h.
        h = rearrange(h, "b (h w) t c -> b t c h w", h=height, w=width)
        return (x.unflatten(0, (-1, frames)) + h).flatten(0, 1)
