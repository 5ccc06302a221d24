"""The VideoCrafter 3D U-Net (`model.diffusion_model.*` of the official checkpoints).

An SD-2.x style U-Net run on frames folded into the batch, `(b t) c h w`, with a temporal
transformer after every spatial transformer, an extra temporal transformer (`init_attn`) after the
input conv, optional temporal convolutions in every ResBlock (`temopral_conv`, sic), optional fps
conditioning and optional decoupled image cross-attention (I2V).

`UNet3D(cfg, ops=None, attention=None)`: every Linear/Conv/GroupNorm/LayerNorm comes from `ops`
(default `vc_model.ops`), every attention product goes through `attention` (default
`attention.sdpa_attention`, ComfyUI's calling convention). The forward computes in the dtype of x
and takes ComfyUI's `transformer_options` (see `vc_model.patches`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops as default_ops
from .attention import SpatialTransformer, TemporalTransformer
from .config import UNetConfig
from .freenoise import DEFAULT_STRIDE, STRIDE_OPTION, WINDOW_OPTION, check_window
from .patches import check_transformer_options

DEFAULT_FPS = 16  # the official forward's default when no fps is given


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first, in float32. t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """T2V-Turbo's embedding of a guidance scale, in float32. w [B] -> [B, dim].

    sin half first, of w * 1000 times exp(-i * ln(10000) / (dim/2 - 1)), i < dim/2 (unlike
    `timestep_embedding`: the other order and divisor). The arithmetic follows the official float32 order;
    the sines of arguments up to ~10^4 are sensitive to it (float64 differs by 2e-4)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_layers(cfg: UNetConfig, ops=None) -> dict[str, nn.Module]:
    """T2V-Turbo's guidance projections of a config, in registration order: `time_cond_proj` (w embedding
    -> model_channels) and, for v2 motion guidance, `motion_cond_proj` and `combine_proj` (2 mc -> mc).
    All without bias, built from `ops`. Empty for a plain VideoCrafter U-Net."""
    ops = ops or default_ops
    mc, layers = cfg.model_channels, {}
    if cfg.time_cond_proj_dim is not None:
        layers["time_cond_proj"] = ops.Linear(cfg.time_cond_proj_dim, mc, bias=False)
    if cfg.motion_cond_proj_dim is not None:
        layers["motion_cond_proj"] = ops.Linear(cfg.motion_cond_proj_dim, mc, bias=False)
        layers["combine_proj"] = ops.Linear(2 * mc, mc, bias=False)
    return layers


def mlp_embedding(dim: int, out_dim: int, ops=None) -> nn.Sequential:
    """`Linear -> SiLU -> Linear` (keys `.0.` and `.2.`)."""
    ops = ops or default_ops
    return nn.Sequential(ops.Linear(dim, out_dim), nn.SiLU(), ops.Linear(out_dim, out_dim))


def temporal_conv_stage(channels: int, first: bool, ops) -> nn.Sequential:
    """GroupNorm -> SiLU -> [dropout slot] -> Conv3d kernel (3,1,1) zero-padded in time."""
    conv = ops.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
    layers = [ops.GroupNorm(32, channels), nn.SiLU()] + ([] if first else [nn.Identity()]) + [conv]
    return nn.Sequential(*layers)


class TemporalConvBlock(nn.Module):
    """Four GroupNorm/SiLU/temporal-conv stages with a residual. x [b, c, t, h, w] -> same.

    The GroupNorms see the whole clip, so their statistics pool over frames."""

    def __init__(self, channels: int, ops=None):
        super().__init__()
        ops = ops or default_ops
        self.conv1 = temporal_conv_stage(channels, True, ops)
        self.conv2 = temporal_conv_stage(channels, False, ops)
        self.conv3 = temporal_conv_stage(channels, False, ops)
        self.conv4 = temporal_conv_stage(channels, False, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """Per-frame ResBlock with the time embedding added as a channel bias, then (VC2 / I2V) the
    temporal conv block on the unfolded clip. Its GroupNorms are the official float32
    `GroupNormSpecific` (the default ops' GroupNorm computes in float32)."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, temporal_conv: bool = False, ops=None):
        super().__init__()
        ops = ops or default_ops
        self.in_layers = nn.Sequential(
            ops.GroupNorm(32, channels), nn.SiLU(), ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            ops.GroupNorm(32, out_channels), nn.SiLU(), nn.Identity(),
            ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else ops.Conv2d(channels, out_channels, 1))
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, ops)  # (sic): official key name
        else:
            self.temopral_conv = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        """x [(b t), c, h, w]; emb [b, emb_dim] (one row per video) -> [(b t), out, h, w]."""
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb)
        h = (h.unflatten(0, (-1, frames)) + emb_out[:, None, :, None, None]).flatten(0, 1)
        h = self.skip_connection(x) + self.out_layers(h)
        if self.temopral_conv is not None:
            h = rearrange(h, "(b t) c h w -> b c t h w", t=frames)
            h = rearrange(self.temopral_conv(h), "b c t h w -> (b t) c h w")
        return h


class Downsample(nn.Module):
    """3x3 stride-2 conv per frame (`op`)."""

    def __init__(self, channels: int, ops=None):
        super().__init__()
        self.op = (ops or default_ops).Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv per frame (`conv`)."""

    def __init__(self, channels: int, ops=None):
        super().__init__()
        self.conv = (ops or default_ops).Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.ModuleList):
    """A U-Net stage (`TimestepEmbedSequential`): hands each layer the inputs it needs, and counts
    spatial transformers in transformer_options["transformer_index"] as ComfyUI's U-Net does."""

    def forward(self, x, emb, context, image_context, frames, transformer_options):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, frames, image_context, transformer_options)
                transformer_options["transformer_index"] += 1
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, frames, transformer_options)
            else:
                x = layer(x)
        return x


class UNet3D(nn.Module):
    """Predicts noise eps for a latent video. See `forward`."""

    def __init__(self, cfg: UNetConfig, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
        relpos = cfg.temporal_length if cfg.relative_position else 0
        self.spatial_blocks: dict[tuple[str, int], int] = {}  # (block name, id) -> transformer depth

        def res(ch_in, ch_out):
            return ResBlock(ch_in, ch_out, emb_dim, cfg.temporal_conv, ops)

        def attention_layers(ch, where):
            heads = ch // cfg.num_head_channels
            self.spatial_blocks[where] = cfg.transformer_depth
            return [
                SpatialTransformer(ch, heads, cfg.num_head_channels, cfg.context_dim,
                                   cfg.transformer_depth, cfg.image_attention, ops, attention),
                TemporalTransformer(ch, heads, cfg.num_head_channels, cfg.transformer_depth, relpos,
                                    ops=ops, attention=attention),
            ]

        self.time_embed = mlp_embedding(mc, emb_dim, ops)
        self.fps_embedding = mlp_embedding(mc, emb_dim, ops) if cfg.fps_cond else None
        # T2V-Turbo's guidance embedding (registered here, as officially: the v1 LoRA list follows this order)
        self.time_cond_proj = self.motion_cond_proj = self.combine_proj = None
        for name, layer in guidance_layers(cfg, ops).items():
            setattr(self, name, layer)

        self.input_blocks = nn.ModuleList([Block([ops.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        self.init_attn = None
        if cfg.init_attn:
            self.init_attn = Block([TemporalTransformer(
                mc, cfg.init_attn_heads, cfg.num_head_channels, cfg.transformer_depth, relpos,
                conv_proj=True, ops=ops, attention=attention)])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += attention_layers(ch, ("input", len(self.input_blocks)))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch, ops)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = Block([res(ch, ch), *attention_layers(ch, ("middle", 0)), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += attention_layers(ch, ("output", len(self.output_blocks)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, ops))
                    ds //= 2
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(
            ops.GroupNorm(32, ch), nn.SiLU(), ops.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (ComfyUI's BaseModel reads it). With the default
        ops it is also the dtype to hand inputs in; the forward computes in the dtype of x."""
        return self.out[2].weight.dtype

    @property
    def image_scale(self) -> float:
        """Weight of the image branch in every spatial cross-attention (I2V)."""
        return getattr(self, "_image_scale", 1.0)

    @image_scale.setter
    def image_scale(self, value: float) -> None:
        self._image_scale = float(value)
        for module in self.modules():
            if getattr(module, "image_attention", False):
                module.image_scale = float(value)

    def guidance_cond(self, guidance: torch.Tensor | None, motion_guidance: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """T2V-Turbo: time_cond_proj(w_emb), or with motion guidance
        combine_proj([time_cond_proj(w_emb), motion_cond_proj(m_emb)]); [B, model_channels] in `dtype`.
        The embedding widths are the layers' own (ComfyUI adds these layers to a plain U-Net as object
        patches)."""
        if guidance is None:
            raise ValueError("This U-Net has T2V-Turbo's guidance embedding: pass guidance=w (official 7.5).")
        cond = self.time_cond_proj(guidance_embedding(guidance, self.time_cond_proj.in_features).to(dtype))
        if motion_guidance is None:
            return cond
        if self.motion_cond_proj is None:
            raise ValueError("motion_guidance was given, but this U-Net has no motion-guidance layers (only T2V-Turbo "
                             "v2 files with motion_cond_proj have them); pass motion_guidance=None.")
        motion = self.motion_cond_proj(guidance_embedding(motion_guidance, self.motion_cond_proj.in_features).to(dtype))
        return self.combine_proj(torch.cat([cond, motion], dim=1))

    def embed(self, timesteps: torch.Tensor, fps: torch.Tensor | None, dtype: torch.dtype,
              guidance: torch.Tensor | None = None, motion_guidance: torch.Tensor | None = None) -> torch.Tensor:
        """timesteps [B], fps [B] or None, guidance / motion_guidance [B] or None (T2V-Turbo) -> time
        (+ guidance) (+ fps) embedding [B, time_embed_dim] in `dtype`."""
        mc = self.cfg.model_channels
        t_emb = timestep_embedding(timesteps, mc).to(dtype)
        if self.time_cond_proj is not None:
            t_emb = t_emb + self.guidance_cond(guidance, motion_guidance, dtype)
        elif guidance is not None or motion_guidance is not None:
            raise ValueError("guidance was given, but this U-Net has no T2V-Turbo guidance embedding: apply "
                             "T2V-Turbo first (vc_model.apply_turbo).")
        emb = self.time_embed(t_emb)
        if self.fps_embedding is not None:
            emb = emb + self.fps_embedding(timestep_embedding(fps, mc).to(dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor, fps=None,
                image_context: torch.Tensor | None = None, transformer_options: dict | None = None,
                temporal_window: int | None = None, temporal_stride: int = DEFAULT_STRIDE,
                down_context: torch.Tensor | None = None, guidance=None, motion_guidance=None) -> torch.Tensor:
        """x [B, in_channels, T, h, w] latent video; timesteps [B] or a number; context [B, L, D]
        text tokens; fps None (16), a number or [B] (used only with `fps_cond`); image_context
        [B, N, D] image tokens (I2V; None: no image branch); transformer_options: ComfyUI's dict
        (`vc_model.patches`; a shallow copy is used); guidance, motion_guidance: T2V-Turbo's guidance
        scale w and v2 motion guidance, a number or [B] (motion None: no motion path)
        -> eps [B, out_channels, T, h, w].

        Long videos (`vc_model.freenoise`): temporal_window W (or transformer_options["temporal_window"],
        with "temporal_stride") makes every temporal transformer attend in windows of W frames every
        temporal_stride frames (FreeNoise; None or T <= W: all frames). context may also be per frame,
        [B, T, L, D] (prompt travel); down_context ([B, L, D] or [B, T, L, D]; None: context) replaces it
        in the input and middle blocks.

        Computes in x's dtype (context and image_context are cast to it)."""
        b, _, frames = x.shape[:3]
        dtype, device = x.dtype, x.device
        options = dict(transformer_options or {})
        check_transformer_options(options, self.spatial_blocks)
        if temporal_window is not None:
            options[WINDOW_OPTION], options[STRIDE_OPTION] = temporal_window, temporal_stride
        if options.get(WINDOW_OPTION) is not None:
            check_window(options[WINDOW_OPTION], options.setdefault(STRIDE_OPTION, DEFAULT_STRIDE))
        options["original_shape"] = list(x.shape)
        options["transformer_index"] = 0
        patches = options.get("patches") or {}

        timesteps = _per_sample(timesteps, b, device)
        if self.fps_embedding is not None:
            fps = _per_sample(DEFAULT_FPS if fps is None else fps, b, device)
        if guidance is not None:
            guidance = _per_sample(guidance, b, device)
        if motion_guidance is not None:
            motion_guidance = _per_sample(motion_guidance, b, device)
        emb = self.embed(timesteps, fps, dtype, guidance, motion_guidance)
        for patch in patches.get("emb_patch") or ():
            emb = patch(emb, self.cfg.model_channels, options)
        context = _text_context(context, b, frames, "context").to(dtype)
        down_context = context if down_context is None else _text_context(down_context, b, frames, "down_context").to(dtype)
        if image_context is not None:
            if not self.cfg.image_attention:
                raise ValueError("image_context was given but this U-Net has no image cross-attention")
            image_context = image_context.to(dtype)

        # Channels-last throughout: convs run faster, the spatial transformers' token view and the
        # temporal convs' [b, c, t, h, w] view come without copies.
        h = rearrange(x, "b c t h w -> (b t) c h w").contiguous(memory_format=torch.channels_last)
        down = (emb, down_context, image_context, frames, options)
        up = (emb, context, image_context, frames, options)
        skips = []
        for i, block in enumerate(self.input_blocks):
            options["block"] = ("input", i)
            h = block(h, *down)
            if i == 0 and self.init_attn is not None:
                h = self.init_attn(h, *down)
            for patch in patches.get("input_block_patch") or ():
                h = patch(h, options)
            skips.append(h)
            for patch in patches.get("input_block_patch_after_skip") or ():
                h = patch(h, options)
        options["block"] = ("middle", 0)
        h = self.middle_block(h, *down)
        for i, block in enumerate(self.output_blocks):
            options["block"] = ("output", i)
            skip = skips.pop()
            for patch in patches.get("output_block_patch") or ():
                h, skip = patch(h, skip, options)
            h = block(torch.cat([h, skip], dim=1), *up)
        return rearrange(self.out(h), "(b t) c h w -> b c t h w", t=frames).contiguous()


def _text_context(context: torch.Tensor, batch: int, frames: int, name: str) -> torch.Tensor:
    """Check text tokens: [B, L, D], or per frame [B, T, L, D] for this latent's T frames."""
    if context.ndim == 4 and context.shape[1] != frames:
        raise ValueError(f"{name} has {context.shape[1]} per-frame rows, the latent has {frames} frames.")
    if context.ndim not in (3, 4) or context.shape[0] != batch:
        raise ValueError(f"{name} must be [{batch}, tokens, dim] or per frame [{batch}, {frames}, tokens, dim], "
                         f"got shape {list(context.shape)}.")
    return context


def _per_sample(value, batch: int, device) -> torch.Tensor:
    """A number, 0-d or 1-element tensor, or [B] tensor -> [B] tensor."""
    value = torch.as_tensor(value, device=device)
    if value.numel() == 1:
        value = value.reshape(1).expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"expected one value or {batch} values, got shape {tuple(value.shape)}")
    return value
