"""Attention layers of the VideoCrafter 3D U-Net.

Parameter names follow the official checkpoint (`to_q`, `to_out.0`, `ff.net.0.proj`,
`relative_position_k.embeddings_table`, `to_k_ip`, ...). Every layer with weights comes from the
`ops` namespace (`vc_model.ops` by default, see there), and every attention product goes through
one injectable function with ComfyUI's `optimized_attention` calling convention:

    attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
              transformer_options=...) -> out

q [B, N, heads*d], k/v [B, M, heads*d] -> out [B, N, heads*d] (with skip_reshape q/k/v are
[B, heads, N, d]; with skip_output_reshape out is [B, heads, N, d]), softmax scale d ** -0.5, the
official one. The default is `sdpa_attention`.

Token layouts:
- SpatialTransformer: frames folded into the batch, `(b t) (h w) c`; its cross-attention sees the
  frames of one video as one long query sequence `b (t h w) c`, so the text/image context is used
  once per video instead of being repeated per frame (same result: every query row attends
  independently to the same keys). With attention patches (`vc_model.patches`) it runs per frame,
  the layout ComfyUI's patches expect.
- TemporalTransformer: spatial positions folded into the batch, `(b h w) t c`.

`transformer_options` (a dict, ComfyUI's protocol) is handed down to every block and attention
call; the spatial blocks honour its patches (`vc_model.patches`), the temporal ones only pass it on
to the attention function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops as default_ops
from .patches import has_block_patches, patched_block_forward

# Batches above this run in slices on CUDA: the fused SDPA kernels fail on larger grids
# (the temporal attention of one 576x1024 video already has b*h*w = 18,432 rows per call).
SDPA_BATCH_LIMIT = 2 ** 15
SLICED_DEVICES = ("cuda",)


def sdpa_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   transformer_options=None, **kwargs):
    """`F.scaled_dot_product_attention` in ComfyUI's attention calling convention (module docstring).

    As ComfyUI's own functions, k and v are split into heads with q's batch size. On CUDA batches
    above SDPA_BATCH_LIMIT run in slices."""
    if skip_reshape:
        b, dim_head = q.shape[0], q.shape[-1]
    else:
        b, dim_head = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    if q.device.type not in SLICED_DEVICES or b <= SDPA_BATCH_LIMIT:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        for i in range(0, b, SDPA_BATCH_LIMIT):
            m = mask[i:i + SDPA_BATCH_LIMIT] if mask is not None and mask.shape[0] > 1 else mask
            s = slice(i, i + SDPA_BATCH_LIMIT)
            out[s] = F.scaled_dot_product_attention(q[s], k[s], v[s], attn_mask=m)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


class RelativePosition(nn.Module):
    """Learned embeddings of the clipped key-minus-query offset, shared by all heads.

    `embeddings_table`: [2*max_distance + 1, dim_head]. Not an ops layer: the table is cast to the
    dtype and device of the attention it serves at every call (it is small)."""

    def __init__(self, dim_head: int, max_distance: int):
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, dim_head))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, n_q: int, n_k: int, like: torch.Tensor) -> torch.Tensor:
        """-> [n_q, n_k, dim_head] in `like`'s dtype and device, entry [i, j] = table[clamp(j - i) + max_distance]."""
        table = self.embeddings_table.to(device=like.device, dtype=like.dtype)
        offset = torch.arange(n_k, device=like.device)[None, :] - torch.arange(n_q, device=like.device)[:, None]
        offset = offset.clamp(-self.max_distance, self.max_distance) + self.max_distance
        return table[offset]


def relative_position_attention(q, k, v, emb_k, emb_v, heads: int, attention=sdpa_attention,
                                transformer_options=None):
    """Softmax attention with relative position terms, as one call of `attention`.

    q [B, n_q, heads*d], k/v [B, n_k, heads*d]; emb_k, emb_v [n_q, n_k, d] -> [B, n_q, heads*d].
    logits[i, j] = s*q_i.k_j + s*q_i.emb_k[i, j] (s = d^-1/2); out_i = sum_j p_ij (v_j + emb_v[i, j]).
    Each query gets its key-term row r_i = (q_i.emb_k[i, j])_j appended and each key/value the one-hot
    e_j, so the augmented dot product is q_i.k_j + r_ij and the augmented output carries the
    probability row p_i. Equal head widths keep SDPA on its fused kernel. The attention function
    scales by (d + n_k)^-1/2, so q is scaled by sqrt((d + n_k) / d) first. Called without
    skip_reshape/skip_output_reshape: ComfyUI's sliced SDPA path ignores skip_output_reshape."""
    b, n_q = q.shape[:2]
    n_k, d = k.shape[1], emb_k.shape[-1]
    q = q.unflatten(-1, (heads, d)) * math.sqrt((d + n_k) / d)
    eye = torch.eye(n_k, dtype=v.dtype, device=v.device)[None, :, None, :].expand(b, n_k, heads, n_k)
    q = torch.cat([q, torch.einsum("bihd,ijd->bihj", q, emb_k)], dim=-1).flatten(2)
    k = torch.cat([k.unflatten(-1, (heads, d)), eye], dim=-1).flatten(2)
    v = torch.cat([v.unflatten(-1, (heads, d)), eye], dim=-1).flatten(2)
    out = attention(q, k, v, heads, transformer_options=transformer_options or {})
    out, probs = out.unflatten(-1, (heads, d + n_k)).split([d, n_k], dim=-1)
    return (out + torch.einsum("bihj,ijd->bihd", probs, emb_v)).flatten(2)


class Attention(nn.Module):
    """Multi-head attention (`CrossAttention` in the official code).

    Self-attention when `context_dim` is None. Options: relative position tables (temporal
    layers of VideoCrafter1 T2V) and a decoupled image branch (`to_k_ip`, `to_v_ip`, I2V), whose
    output is added scaled by `image_scale`.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, max_relative_position: int = 0, image_attention: bool = False,
                 ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.attention = attention or sdpa_attention
        self.to_q = ops.Linear(query_dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, query_dim))
        self.relative_position_k = self.relative_position_v = None
        if max_relative_position:
            self.relative_position_k = RelativePosition(dim_head, max_relative_position)
            self.relative_position_v = RelativePosition(dim_head, max_relative_position)
        self.image_attention = image_attention
        self.image_scale = 1.0
        if image_attention:
            self.to_k_ip = ops.Linear(context_dim, inner, bias=False)
            self.to_v_ip = ops.Linear(context_dim, inner, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                transformer_options=None) -> torch.Tensor:
        """x [B, N, query_dim]; context [B, L, context_dim] (None: self-attention); value: the
        values' source when it differs from context (ComfyUI patches); image_context
        [B, M, context_dim] (image branch, only with image_attention) -> [B, N, query_dim]."""
        opts = {} if transformer_options is None else transformer_options
        context = x if context is None else context
        q = self.to_q(x)
        out = self.attend(q, self.to_k(context), self.to_v(context if value is None else value), opts)
        image = self.image_branch(q, image_context, opts)
        return self.to_out(out if image is None else out + image)

    def attend(self, q, k, v, transformer_options) -> torch.Tensor:
        """Attention of projected q [B, N, inner] to k, v [B, M, inner] -> [B, N, inner]."""
        if self.relative_position_k is None:
            return self.attention(q, k, v, self.heads, transformer_options=transformer_options)
        n_q, n_k = q.shape[1], k.shape[1]
        return relative_position_attention(
            q, k, v, self.relative_position_k(n_q, n_k, q), self.relative_position_v(n_q, n_k, q),
            self.heads, self.attention, transformer_options)

    def image_branch(self, q, image_context, transformer_options) -> torch.Tensor | None:
        """image_scale * attention of q to the image tokens, or None (no image or scale 0)."""
        if image_context is None or self.image_scale == 0:
            return None
        if not self.image_attention:
            raise ValueError("image_context was given but this attention layer has no image branch")
        out = self.attention(q, self.to_k_ip(image_context), self.to_v_ip(image_context), self.heads,
                             transformer_options=transformer_options)
        return self.image_scale * out


class GEGLU(nn.Module):
    """Linear to 2*dim_out; first half is the value, second half the (exact GELU) gate."""

    def __init__(self, dim_in: int, dim_out: int, ops=None):
        super().__init__()
        self.proj = (ops or default_ops).Linear(dim_in, dim_out * 2)

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

    def __init__(self, dim: int, mult: int = 4, ops=None):
        super().__init__()
        ops = ops or default_ops
        self.net = nn.Sequential(GEGLU(dim, dim * mult, ops), nn.Identity(), ops.Linear(dim * mult, dim))

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
                 max_relative_position: int = 0, image_attention: bool = False, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        self.attn1 = Attention(dim, None, heads, dim_head, max_relative_position, ops=ops, attention=attention)
        self.ff = FeedForward(dim, ops=ops)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, max_relative_position, image_attention,
                               ops=ops, attention=attention)
        self.norm1 = ops.LayerNorm(dim)
        self.norm2 = ops.LayerNorm(dim)
        self.norm3 = ops.LayerNorm(dim)
        self.cross = context_dim is not None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None, transformer_options=None) -> torch.Tensor:
        """x [G, S, N, dim]: self-attention over N tokens in each of G*S groups; the cross-attention
        sees the S*N tokens of a group as one query sequence against context [G, L, D]. Spatial
        blocks (cross) with attention patches in transformer_options run `patched_block_forward`."""
        opts = {} if transformer_options is None else transformer_options
        if self.cross and has_block_patches(opts):
            return patched_block_forward(self, x, context, image_context, opts)
        g, s, n, c = x.shape
        x = self.attn1(self.norm1(x).view(g * s, n, c), transformer_options=opts).view(g, s, n, c) + x
        if self.cross:
            h = self.attn2(self.norm2(x).view(g, s * n, c), context, image_context, transformer_options=opts)
        else:
            h = self.attn2(self.norm2(x).view(g * s, n, c), transformer_options=opts)
        x = h.view(g, s, n, c) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer: GroupNorm(eps 1e-6), Linear proj_in, blocks, Linear proj_out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 image_attention: bool = False, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        inner = heads * dim_head
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, image_attention=image_attention,
                                  ops=ops, attention=attention)
            for _ in range(depth))
        self.proj_out = ops.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int,
                image_context: torch.Tensor | None = None, transformer_options=None) -> torch.Tensor:
        """x [(b t), c, h, w]; context [b, L, D]; image_context [b, M, D] or None -> like x.
        Sets transformer_options "activations_shape" and, per block, "block_index" (as ComfyUI's)."""
        opts = {} if transformer_options is None else transformer_options
        opts["activations_shape"] = list(x.shape)
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "(b t) c h w -> b t (h w) c", t=frames)
        h = self.proj_in(h)
        for i, block in enumerate(self.transformer_blocks):
            opts["block_index"] = i
            h = block(h, context, image_context, opts)
        h = self.proj_out(h)
        return x + rearrange(h, "b t (h w) c -> (b t) c h w", h=height, w=width)


class TemporalTransformer(nn.Module):
    """Per-location transformer over frames: GroupNorm(eps 1e-6) pooled over all frames, proj_in,
    blocks of two self-attentions, proj_out, residual.

    `conv_proj` (the `init_attn` layer) keeps the official kernel-1 Conv1d projections
    (weights [inner, c, 1]); they run on the tokens as a batch of length-1 sequences.
    transformer_options reaches every attention call; spatial patches do not apply here.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1,
                 max_relative_position: int = 0, conv_proj: bool = False, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        inner = heads * dim_head
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        proj = (lambda i, o: ops.Conv1d(i, o, 1)) if conv_proj else ops.Linear
        self.conv_proj = conv_proj
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, None, max_relative_position, ops=ops, attention=attention)
            for _ in range(depth))
        self.proj_out = proj(inner, channels)

    def _project(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., c] through a Linear, or a kernel-1 Conv1d as length-1 sequences [N, c, 1]."""
        if not self.conv_proj:
            return layer(x)
        return layer(x.reshape(-1, x.shape[-1], 1)).view(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor, frames: int, transformer_options=None) -> torch.Tensor:
        """x [(b t), c, h, w] -> same shape."""
        opts = {} if transformer_options is None else transformer_options
        height, width = x.shape[-2:]
        # One copy into contiguous tokens [b, (h w), t, c]. Viewed as [b, c, (h w), t] this is a
        # channels-last tensor, so GroupNorm pools each group over all frames and positions in place.
        h = rearrange(x, "(b t) c h w -> b (h w) t c", t=frames).contiguous()
        h = self.norm(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h = self._project(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, transformer_options=opts)
        h = self._project(self.proj_out, h)
        # Residual on 5D views: the sum takes x's memory layout without an extra copy of h.
        h = rearrange(h, "b (h w) t c -> b t c h w", h=height, w=width)
        return (x.unflatten(0, (-1, frames)) + h).flatten(0, 1)
