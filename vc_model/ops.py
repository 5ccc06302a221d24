"""The default operations namespace: the layers every vc_model module builds its weights from.

Every `vc_model` model takes `ops=` (this module when None) and builds each Linear, Conv1d/2d/3d,
GroupNorm and LayerNorm as `ops.Linear(...)` etc., the way ComfyUI's own models take
`operations=`. Any namespace with these six classes works, with torch.nn's constructor arguments
(plus `device=`, `dtype=`): ComfyUI passes `comfy.ops.pick_operations(...)` (manual cast, fp8
storage, partial loading), tests pass stand-ins. No module reads a weight outside its ops layer.

What these defaults add to plain torch.nn:

* Dtype rule: a layer computes in its input's dtype. Weights stored in another dtype are cast to
  the input's dtype at the call (so `unet(x_float32)` on a bfloat16 model computes in float32,
  at the cost of one cast per layer and call; vc_model's callers therefore hand inputs in the
  model's own dtype). Devices are never changed: a device mismatch is an error.
* CPU fast paths: Conv2d/Conv3d run as one GEMM when they have few output positions
  (`vc_model.conv`); a kernel-1 Conv1d on length-1 inputs is one matrix product; Conv2d has
  `upsample_nearest2x` (nearest x2 then this conv, as four 2x2 convs).
* GroupNorm computes its statistics and affine in float32 and returns the input's dtype (the
  official `GroupNorm32`). Half inputs take PyTorch's native kernels where those accumulate in
  float32 (CPU: the mixed-dtype kernel with float32 affine, bitwise equal to upcasting; CUDA, and
  the meta device like CUDA); other backends upcast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import conv as _conv

HALF = (torch.float16, torch.bfloat16)


def cast(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`tensor` in `like`'s dtype (no copy when it already is). Device unchanged."""
    if tensor is None or tensor.dtype == like.dtype:
        return tensor
    return tensor.to(like.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, cast(self.weight, x), cast(self.bias, x))


class Conv1d(nn.Conv1d):
    """A kernel-1 convolution of length-1 inputs [N, C, 1] is one matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = cast(self.weight, x), cast(self.bias, x)
        if (x.shape[-1] == 1 and self.kernel_size == (1,) and self.stride == (1,) and self.padding == (0,)
                and self.groups == 1):
            return F.linear(x[..., 0], weight[..., 0], bias).unsqueeze(-1)
        return self._conv_forward(x, weight, bias)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` with the CPU GEMM path of `vc_model.conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = cast(self.weight, x), cast(self.bias, x)
        if _conv.gemm_applies(self, x):
            return _conv.conv_gemm(x, weight, bias, self.stride, self.padding)
        return self._conv_forward(x, weight, bias)

    def upsample_nearest2x(self, x: torch.Tensor) -> torch.Tensor:
        """`self(F.interpolate(x, scale_factor=2))` for a 3x3, padding-1 conv, without building the
        upsampled input: each of the four output phases is a 2x2 conv of x (4 taps instead of 9)."""
        if self.kernel_size != (3, 3) or self.padding != (1, 1) or self.stride != (1, 1) or self.groups != 1:
            return self(F.interpolate(x, scale_factor=2, mode="nearest"))
        return _conv.upsample_conv(x, cast(self.weight, x), cast(self.bias, x))


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` with the CPU GEMM path of `vc_model.conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = cast(self.weight, x), cast(self.bias, x)
        if _conv.gemm_applies(self, x):
            return _conv.conv_gemm(x, weight, bias, self.stride, self.padding)
        return self._conv_forward(x, weight, bias)


class GroupNorm(nn.GroupNorm):
    """GroupNorm in float32, result in the input's dtype (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in HALF and x.device.type == "cpu":  # mixed-dtype kernel: float32 maths, one rounding
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        if x.dtype in HALF and x.device.type not in ("cuda", "meta"):  # meta: as CUDA (memory tracking)
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, cast(self.weight, x), cast(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, cast(self.weight, x), cast(self.bias, x), self.eps)
