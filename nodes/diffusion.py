"""The diffusion model ComfyUI runs: vc_model's UNet3D plus, for I2V, the image resampler.

No ComfyUI import. The resampler lives inside the diffusion model so ComfyUI's model management
loads, offloads and casts it with the U-Net, and the conditioning only carries the CLIP patch tokens.
State-dict keys are the official ones without `model.diffusion_model.`, plus `image_proj_model.*`.
"""
from __future__ import annotations

import torch

from ..vc_model.config import ResamplerConfig, UNetConfig
from ..vc_model.resampler import Resampler
from ..vc_model.unet import UNet3D
from .guards import explain_out_of_memory, sampling_oom
from .turbo_sampling import turbo_unet_kwargs


class VideoCrafterUNet(UNet3D):
    """UNet3D whose forward takes ComfyUI's keyword arguments; `image_proj_model` for I2V."""

    def __init__(self, cfg: UNetConfig, resampler: ResamplerConfig | None = None):
        super().__init__(cfg)
        self.image_proj_model = Resampler(resampler) if resampler is not None else None

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor = None, fps=None,
                clip_tokens: torch.Tensor | None = None, control=None, transformer_options=None, **kwargs):
        """x [B,4,T,h,w]; timesteps [B]; context [B,L,D] text tokens; fps [B] or None; clip_tokens
        [B,N,width] CLIP patch tokens (I2V) -> eps [B,4,T,h,w]. ControlNet/patches are not supported.
        T2V-Turbo's guidance comes from transformer_options (nodes/turbo_sampling.py).

        Out-of-memory errors (any sampler) come out as torch.OutOfMemoryError saying what to lower."""
        with explain_out_of_memory(lambda: sampling_oom(x.shape, self.dtype)):
            return self._forward(x, timesteps, context, fps, clip_tokens, turbo_unet_kwargs(transformer_options, timesteps))

    def _forward(self, x, timesteps, context, fps, clip_tokens, turbo):
        image_context = None
        if clip_tokens is not None:
            if self.image_proj_model is None:
                raise ValueError("This VideoCrafter model is text-to-video: it cannot use an image conditioning.")
            image_context = self.image_proj_model(clip_tokens.to(x.dtype))
        return super().forward(x, timesteps, context, fps=fps, image_context=image_context, **turbo)
