"""Convolutions that become one matrix product when they have few output positions (CPU).

oneDNN reorders a convolution's weight into its own blocked layout on every call. When a
convolution has few output positions, as in the U-Net's deepest levels (2 videos x 8-16 frames of
4x4 or 2x2 latents), that reorder of a 30-60 MB weight costs more than the arithmetic: measured on
this project's 2-core CPU, a 1280->1280 3x3 conv over 16 frames of 2x2 takes 28 ms (NCHW) or 47 ms
(NHWC) through oneDNN and 8 ms as a GEMM in float32; 11 ms and 2.5 ms in bfloat16.

The GEMM form gathers, for every output position, the input values under the kernel's taps into
one row (im2col: a copy of the input, times the number of taps; small exactly when this path is
taken) and multiplies by the weight viewed as [out, taps * in] without copying it: the gather
order follows the weight's memory order (channels-last weights: taps outer, channels inner;
contiguous ones: channels outer). The result comes out channels-last. `vc_model.ops.Conv2d` /
`Conv3d` take this path when `gemm_applies`; other devices and larger inputs take the usual convolution.

Also here: `upsample_conv`, nearest x2 followed by a 3x3 conv without building the upsampled input.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Output positions (batch x spatial) up to which the GEMM form is used on the CPU. Measured
# crossover: GEMM ~1.5-2.5x faster at 256 positions, oneDNN ~1.5x faster at 1024 (fp32 and bf16).
GEMM_MAX_POSITIONS = 512


def conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              stride: tuple[int, ...], padding: tuple[int, ...]) -> torch.Tensor:
    """Zero-padded, ungrouped, undilated N-d convolution as im2col + one GEMM.

    x [N, C, *spatial], weight [O, C, *kernel] -> [N, O, *out] (channels-last memory order)."""
    out_channels, kernel = weight.shape[0], weight.shape[2:]
    xl = x.movedim(1, -1)  # [N, *spatial, C]; a view when x is channels-last
    if any(padding):
        xl = F.pad(xl, [0, 0] + [p for pad in reversed(padding) for p in (pad, pad)])
    out_size = [(xl.shape[1 + i] - k) // s + 1 for i, (k, s) in enumerate(zip(kernel, stride))]
    taps = [xl[(slice(None),) + tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, stride, out_size))]
            for offset in itertools.product(*(range(k) for k in kernel))]
    wl = weight.movedim(1, -1)  # [O, *kernel, C]
    if wl.is_contiguous():  # channels-last weight: rows are (taps, C)
        cols, matrix = (torch.cat(taps, dim=-1) if len(taps) > 1 else taps[0]), wl.reshape(out_channels, -1)
    else:  # contiguous weight: rows are (C, taps)
        cols, matrix = torch.stack(taps, dim=-1), weight.reshape(out_channels, -1)
    cols = cols.reshape(-1, matrix.shape[1])
    out = torch.addmm(bias, cols, matrix.t()) if bias is not None else cols @ matrix.t()
    return out.view(x.shape[0], *out_size, out_channels).movedim(-1, 1)


def gemm_applies(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> bool:
    """True when `conv` on x should take the GEMM form: CPU, zero padding, no groups or dilation, and
    at most GEMM_MAX_POSITIONS output positions."""
    if x.device.type != "cpu" or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if any(d != 1 for d in conv.dilation):
        return False
    out = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], conv.padding, conv.kernel_size, conv.stride)]
    return x.shape[0] * math.prod(out) <= GEMM_MAX_POSITIONS


def channels_last_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """The channels-last memory format for a conv weight of this rank (4-d, 5-d), else None."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.ndim)


# Nearest x2 followed by a 3x3 conv is, for each of the four output phases (row parity a,
# column parity b), a 2x2 conv of the low-resolution input whose taps are sums of 3x3 taps.
# PHASE_TAPS[a, tap, k]: which of the 3 kernel rows (or columns) feed tap 0 / 1 of phase a.
PHASE_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


def upsample_conv(x, weight, bias):
    """Nearest-neighbour x2 then `conv2d(weight [O, C, 3, 3], bias, padding=1)`. [N, C, H, W] -> [N, O, 2H, 2W]."""
    n, c, height, width = x.shape
    o = weight.shape[0]
    taps = torch.tensor(PHASE_TAPS, dtype=torch.float32, device=weight.device)
    kernel = torch.einsum("aui,ocij,bvj->abocuv", taps, weight.float(), taps)
    kernel = rearrange(kernel, "a b o c u v -> (a b o) c u v").to(weight.dtype)
    bias = bias.repeat(4) if bias is not None else None
    phases = F.conv2d(x, kernel, bias, padding=1)  # window r covers input rows r-1, r
    phases = rearrange(phases, "n (a b o) h w -> n a b o h w", a=2, b=2)
    fmt = torch.channels_last if phases.stride(3) == 1 else torch.contiguous_format
    out = torch.empty(n, o, 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=fmt)
    out_phases = out.view(n, o, height, 2, width, 2)
    for a in range(2):
        for b in range(2):
            out_phases[:, :, :, a, :, b] = phases[:, a, b, :, a:a + height, b:b + width]
    return out
