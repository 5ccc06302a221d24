"""Activation memory of the U-Net: measured on the meta device, and the estimate ComfyUI is given.

`ActivationTracker` counts the bytes of every tensor an op creates while it is alive (storages
shared by views counted once; tensors that existed before, such as weights and inputs, not at
all) and keeps the peak. On the meta device nothing is computed, so a full-size forward costs
seconds; attention counts its output only, which is what the fused kernels (flash /
memory-efficient SDPA, xformers) allocate. FeedForward chunks as on CUDA (meta has no entry in
`FF_CHUNK_BYTES`) and GroupNorm runs natively in half precision as on CUDA.

`unet_activation_bytes` is the estimate: peak = a * (batch * frames * h * w) * dtype size + c,
with a and c fitted through the measured peaks at the two native sizes, times MARGIN. The four
releases share the U-Net widths (model_channels 320, multipliers 1/2/4/4); the relative-position
temporal attention of VideoCrafter1 T2V (augmented q/k/v) has its own fit; the I2V image branch
adds nothing measurable. c is mostly the FeedForward chunk (a byte budget, so not scaled by the
dtype).

Measured peaks (fp16, batch 2 = cond + uncond, `python benchmarks/bench_memory.py`), GiB:

    latent (frames x h x w)   16x40x64 (320x512)   16x72x128 (576x1024)   16x24x32   24x40x64
    VideoCrafter2 / I2V              1.184                2.961              0.483      1.525
    VideoCrafter1 T2V                1.184                3.867              0.483      1.655

The estimate over the peak is MARGIN (1.1) at the native sizes, 1.1-1.35 from 24 frames down to
half a batch, and 1.6 at 16x24x32 (small latents, where the chunk term dominates).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# (bytes per latent element per dtype byte, fixed bytes) of the fitted peak; see the table above.
FIT = {False: (4479.1, 537_451_000), True: (6762.8, 163_293_000)}  # key: cfg.relative_position
MARGIN = 1.1


class ActivationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors created inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.live.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.refs[key] = 0
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(tensor, self._release, key)
        return out


def fused_attention_output(q, k, v, heads, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """An attention function that only allocates its output, as the fused kernels do (their
    workspace is O(tokens)); for measuring on the meta device, where SDPA would take the math
    path and materialise every attention matrix."""
    if skip_reshape:
        b, _, n, _ = q.shape
        out = q.new_empty(b, heads, n, v.shape[-1])
        return out if skip_output_reshape else out.transpose(1, 2).flatten(2)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def unet_activation_peak(cfg, batch: int, frames: int, height: int, width: int,
                         dtype: torch.dtype = torch.float16, context_length: int = 77) -> int:
    """Peak activation bytes of one forward of the U-Net of `cfg` (a UNetConfig), built on the meta
    device with fused-kernel attention, on a latent [batch, in_channels, frames, height, width] in `dtype`."""
    from .unet import UNet3D

    with torch.device("meta"):
        unet = UNet3D(cfg, attention=fused_attention_output).eval()
    x = torch.empty(batch, cfg.in_channels, frames, height, width, device="meta", dtype=dtype)
    context = torch.empty(batch, context_length, cfg.context_dim, device="meta", dtype=dtype)
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    with torch.no_grad(), ActivationTracker() as tracker:
        unet(x, timesteps, context)
    return tracker.peak


def unet_activation_bytes(cfg, batch: int, frames: int, height: int, width: int, dtype_size: int) -> int:
    """The activation memory to plan for one U-Net call (UNetConfig `cfg`) on [batch, 4, frames,
    height, width] latents computed in a dtype of `dtype_size` bytes: the fitted peak times MARGIN."""
    per_element, fixed = FIT[bool(cfg.relative_position)]
    return int(MARGIN * (per_element * batch * frames * height * width * dtype_size + fixed))
