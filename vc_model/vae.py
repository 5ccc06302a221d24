"""Per-frame KL autoencoder (`first_stage_model.*`): the SD-style AutoencoderKL, run frame by frame.

Videos are [B, C, T, H, W]. Frames are folded into the batch in chunks of a few frames, so peak
memory does not grow with T. Latents handed in and out are already multiplied by `scale_factor`.
Parameter names are the official ones with `first_stage_model.` stripped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from . import ops as default_ops
from .attention import sdpa_attention
from .config import VAEConfig

# Default chunks (at least one frame each). CPU: a fixed small chunk, 64 KiB of pixels x element
# size (one 128x128 frame in fp32, two in bf16; one frame from 256x256 up). Measured on a 2-core
# CPU, 8 frames of 128x128: fp32 1 frame/chunk 3.7 s, 8 frames/chunk 4.1 s; bf16 1: 1.37 s, 2: 1.02 s,
# 8: 0.93 s; about 3.4 KB (fp32) / 1.7 KB (bf16) of activations per pixel in flight.
# CUDA: as many frames as fit in half of the free memory at BYTES_PER_PIXEL x element size.
CPU_CHUNK_PIXEL_BYTES = 4 * 128 * 128
BYTES_PER_PIXEL = 1000  # x element size: activation bytes in flight per output pixel (measured ~850)


def centre_groups(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """x [N, C, H, W] minus an estimate of each group's mean (every 8th row and column; a group norm
    is shift-invariant), when some group's mean is large against its spread; else x itself.

    PyTorch's CPU channels-last GroupNorm takes the variance as E[x^2] - E[x]^2, which cancels badly
    for such groups; `norm` applies this before every GroupNorm of the VAE on that path."""
    sample = rearrange(x[:, :, ::8, ::8].float(), "n (g c) h w -> n g (c h w)", g=num_groups)
    var, mean = torch.var_mean(sample, dim=2, correction=0)
    limit = 64.0 if x.dtype in (torch.float16, torch.bfloat16) else 0.0  # error ~ eps32 * ratio
    if bool((mean.square() <= limit * var + eps).all()):
        return x
    shift = repeat(mean, "n g -> n (g c) 1 1", c=x.shape[1] // num_groups)
    return x - shift.to(x.dtype)


def norm(layer: nn.GroupNorm, x: torch.Tensor, act: bool = False) -> torch.Tensor:
    """The VAE's GroupNorm(32, eps 1e-6) `layer` (an ops layer), then swish if `act`. [N, C, H, W] -> same.

    On the CPU's channels-last kernel, groups whose mean dwarfs their spread are centred first."""
    if x.device.type == "cpu" and not x.is_contiguous():
        x = centre_groups(x, layer.num_groups, layer.eps)
    h = layer(x)
    return F.silu(h, inplace=True) if act else h


def group_norm(dim: int, ops) -> nn.GroupNorm:
    return ops.GroupNorm(32, dim, eps=1e-6)


class ResnetBlock(nn.Module):
    """GN-swish-conv3x3, GN-swish-conv3x3, plus the input (1x1 `nin_shortcut` if widths differ)."""

    def __init__(self, dim: int, dim_out: int, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        self.norm1 = group_norm(dim, ops)
        self.conv1 = ops.Conv2d(dim, dim_out, 3, padding=1)
        self.norm2 = group_norm(dim_out, ops)
        self.conv2 = ops.Conv2d(dim_out, dim_out, 3, padding=1)
        if dim != dim_out:
            self.nin_shortcut = ops.Conv2d(dim, dim_out, 1)

    def forward(self, x):
        """x [N, dim, H, W] -> [N, dim_out, H, W]"""
        h = self.conv2(norm(self.norm2, self.conv1(norm(self.norm1, x, True)), True))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 conv q/k/v/proj_out, residual."""

    def __init__(self, dim: int, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        self.attention = attention or sdpa_attention
        self.norm = group_norm(dim, ops)
        self.q = ops.Conv2d(dim, dim, 1)
        self.k = ops.Conv2d(dim, dim, 1)
        self.v = ops.Conv2d(dim, dim, 1)
        self.proj_out = ops.Conv2d(dim, dim, 1)

    def forward(self, x):
        """x [N, C, H, W] -> same"""
        height = x.shape[2]
        h = norm(self.norm, x)
        q, k, v = (rearrange(conv(h), "n c h w -> n (h w) c") for conv in (self.q, self.k, self.v))
        out = self.attention(q, k, v, 1, transformer_options={})  # scale c^-0.5
        out = rearrange(out, "n (h w) c -> n c h w", h=height)  # channels-last strides
        if x.is_contiguous():  # keep NCHW (oneDNN's NHWC float32 convs round differently)
            out = out.contiguous()
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then 3x3 stride-2 conv: [N, C, H, W] -> [N, C, H//2, W//2]."""

    def __init__(self, dim: int, ops=None, attention=None):
        super().__init__()
        self.conv = (ops or default_ops).Conv2d(dim, dim, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: [N, C, H, W] -> [N, C, 2H, 2W] (the ops conv's
    `upsample_nearest2x` when it has one: no upsampled input is built)."""

    def __init__(self, dim: int, ops=None, attention=None):
        super().__init__()
        self.conv = (ops or default_ops).Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        if hasattr(self.conv, "upsample_nearest2x"):
            return self.conv.upsample_nearest2x(x)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResnetBlocks (each followed by an AttnBlock if `attn`), then a resampler
    stored under `resample_name` (`downsample` / `upsample`), if any."""

    def __init__(self, dim, dim_out, blocks, attn, resample=None, resample_name="downsample", ops=None, attention=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(dim if i == 0 else dim_out, dim_out, ops) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(dim_out, ops, attention) for _ in range(blocks if attn else 0))
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample(dim_out, ops))

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resample = getattr(self, self.resample_name, None)
        return resample(x) if resample is not None else x


class Mid(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at constant width."""

    def __init__(self, dim: int, ops=None, attention=None):
        super().__init__()
        self.block_1 = ResnetBlock(dim, dim, ops)
        self.attn_1 = AttnBlock(dim, ops, attention)
        self.block_2 = ResnetBlock(dim, dim, ops)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Frames [N, in_channels, H, W] -> moments [N, 2*z_channels, H/f, W/f] (f = cfg.downscale)."""

    def __init__(self, cfg: VAEConfig, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        widths = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
        last = len(cfg.ch_mult) - 1
        self.conv_in = ops.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[i], widths[i + 1], cfg.num_res_blocks,
                  attn=(cfg.resolution >> i) in cfg.attn_resolutions,
                  resample=Downsample if i != last else None, resample_name="downsample",
                  ops=ops, attention=attention)
            for i in range(len(cfg.ch_mult))
        )
        self.mid = Mid(widths[-1], ops, attention)
        self.norm_out = group_norm(widths[-1], ops)
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = ops.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(norm(self.norm_out, self.mid(h), True))


class Decoder(nn.Module):
    """Latent [N, z_channels, h, w] -> frames [N, out_ch, h*f, w*f]. `up[i]` is the level at
    resolution i (official order: built from the lowest resolution, run from `up[-1]` to `up[0]`)."""

    def __init__(self, cfg: VAEConfig, ops=None, attention=None):
        super().__init__()
        ops = ops or default_ops
        levels = len(cfg.ch_mult)
        width = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = Mid(width, ops, attention)
        up = []
        for i in reversed(range(levels)):
            width_out = cfg.ch * cfg.ch_mult[i]
            up.insert(0, Level(width, width_out, cfg.num_res_blocks + 1,
                               attn=(cfg.resolution >> i) in cfg.attn_resolutions,
                               resample=Upsample if i != 0 else None, resample_name="upsample",
                               ops=ops, attention=attention))
            width = width_out
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(width, ops)
        self.conv_out = ops.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(norm(self.norm_out, h, True))


def _frame_ranges(n_frames: int, chunk: int):
    return [(n0, min(n0 + chunk, n_frames)) for n0 in range(0, n_frames, chunk)]


def _gather(video, n0: int, n1: int):
    """Frames n0:n1 of the frame-major (b t) order of video [B, C, T, ...] -> [n1-n0, C, ...]
    (a view when the range lies within one video)."""
    t = video.shape[2]
    pieces = [video[b, :, max(n0 - b * t, 0):min(n1 - b * t, t)].transpose(0, 1)
              for b in range(n0 // t, (n1 - 1) // t + 1)]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _scatter(out, frames, n0: int):
    """Write frames [N, C, ...] to frame-major positions n0:n0+N of out [B, C, T, ...]."""
    t = out.shape[2]
    n1 = n0 + frames.shape[0]
    for b in range(n0 // t, (n1 - 1) // t + 1):
        t0, t1 = max(n0 - b * t, 0), min(n1 - b * t, t)
        out[b, :, t0:t1] = frames[b * t + t0 - n0:b * t + t1 - n0].transpose(0, 1)


class VideoVAE(nn.Module):
    """KL autoencoder applied to each frame of a video.

    `VideoVAE(cfg, ops=None, attention=None)`: layers from `ops` (default `vc_model.ops`), the mid
    block's attention through `attention` (ComfyUI's calling convention). The modules compute in
    the dtype of their input; `encode`/`decode`/`posterior`/`decode_frames` hand them the frames in
    the weights' dtype, on the weights' device."""

    def __init__(self, cfg: VAEConfig, ops=None, attention=None):
        super().__init__()
        if not cfg.double_z:
            raise ValueError("the KL autoencoder needs double_z (mean and log-variance)")
        ops = ops or default_ops
        self.cfg = cfg
        self.encoder = Encoder(cfg, ops, attention)
        self.decoder = Decoder(cfg, ops, attention)
        self.quant_conv = ops.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = ops.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _chunk(self, frames_per_chunk, height: int, width: int) -> int:
        """Frames per chunk at height x width pixels: the given number, else sized from free memory
        (CUDA: `torch.cuda.mem_get_info` plus what PyTorch's cache holds unused) or fixed (CPU)."""
        if frames_per_chunk:
            return int(frames_per_chunk)
        device = self.quant_conv.weight.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            per_frame = BYTES_PER_PIXEL * self.quant_conv.weight.element_size() * height * width
            return max(1, int(0.5 * free // per_frame))
        return max(1, CPU_CHUNK_PIXEL_BYTES // (self.quant_conv.weight.element_size() * height * width))

    def _prepare(self, frames):
        """Move to the weights' device and dtype. On CPU in half precision also channels_last:
        oneDNN would otherwise reorder around every conv (2x slower in bf16); in float32 it makes
        no difference there, and NCHW keeps the exact GroupNorm kernel."""
        device = self.quant_conv.weight.device
        half = self.dtype in (torch.float16, torch.bfloat16)
        fmt = torch.channels_last if device.type == "cpu" and half else torch.contiguous_format
        return frames.to(device=device, dtype=self.dtype, memory_format=fmt)

    def posterior(self, frames):
        """frames [N, 3, H, W] in [-1, 1] -> (mean, logvar), each [N, embed_dim, H/f, W/f],
        unscaled; logvar clamped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(self._prepare(frames)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_frames(self, z):
        """Unscaled latent frames [N, embed_dim, h, w] -> frames [N, out_ch, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(self._prepare(z)))

    def encode(self, video, sample: bool = False, generator=None, frames_per_chunk=None, noise=None):
        """video [B, 3, T, H, W] in [-1, 1] -> scaled latent [B, embed_dim, T, H/f, W/f].

        The posterior mean times scale_factor; with `sample`, scale_factor * (mean + std * noise),
        noise drawn from `generator` as one float32 [(B T), embed_dim, h, w] tensor (frame-major, as
        the official batched encode draws it) or given as `noise` [B, embed_dim, T, h, w].
        """
        b, _, t, height, width = video.shape
        f = self.cfg.downscale
        if sample and noise is None:
            device = generator.device if generator is not None else self.quant_conv.weight.device
            noise = torch.randn(b * t, self.cfg.embed_dim, height // f, width // f,
                                generator=generator, device=device)
        elif sample:
            noise = rearrange(noise, "b c t h w -> (b t) c h w")
        out = None
        for n0, n1 in _frame_ranges(b * t, self._chunk(frames_per_chunk, height, width)):
            mean, logvar = self.posterior(_gather(video, n0, n1))
            if sample:
                eps = noise[n0:n1].to(device=mean.device, dtype=mean.dtype)
                mean = mean + torch.exp(0.5 * logvar) * eps
            if out is None:
                out = mean.new_empty(b, mean.shape[1], t, *mean.shape[2:])
            _scatter(out, self.cfg.scale_factor * mean, n0)
        return out

    def decode(self, latent, frames_per_chunk=None):
        """Scaled latent [B, embed_dim, T, h, w] -> video [B, out_ch, T, h*f, w*f], not clamped."""
        b, _, t, height, width = latent.shape
        f = self.cfg.downscale
        out = None
        for n0, n1 in _frame_ranges(b * t, self._chunk(frames_per_chunk, height * f, width * f)):
            frames = self.decode_frames(_gather(latent, n0, n1) / self.cfg.scale_factor)
            if out is None:
                out = frames.new_empty(b, frames.shape[1], t, *frames.shape[2:])
            _scatter(out, frames, n0)
        return out
