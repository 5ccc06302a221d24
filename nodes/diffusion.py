"""The diffusion model ComfyUI runs: vc_model's UNet3D plus, for I2V, the image resampler.

No ComfyUI import. The resampler lives inside the diffusion model so ComfyUI's model management
loads, offloads and casts it with the U-Net, and the conditioning only carries the CLIP patch tokens.
State-dict keys are the official ones without `model.diffusion_model.`, plus `image_proj_model.*`.
`ops` and `attention` are ComfyUI's (`comfy.ops.pick_operations(...)`, `optimized_attention`),
passed in by the loader.
"""
from __future__ import annotations

import torch

from ..vc_model.config import ResamplerConfig, UNetConfig
from ..vc_model.resampler import Resampler
from ..vc_model.unet import UNet3D
from .guards import explain_out_of_memory, sampling_oom
from .long_video_logic import unet_text_arguments
from .turbo_sampling import turbo_unet_kwargs


class VideoCrafterUNet(UNet3D):
    """UNet3D whose forward takes ComfyUI's keyword arguments; `image_proj_model` for I2V."""

    def __init__(self, cfg: UNetConfig, resampler: ResamplerConfig | None = None, ops=None, attention=None):
        super().__init__(cfg, ops, attention)
        self.image_proj_model = Resampler(resampler, ops, attention) if resampler is not None else None

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor = None, fps=None,
                clip_tokens: torch.Tensor | None = None, control=None, transformer_options=None,
                frame_context: torch.Tensor | None = None, **kwargs):
        """x [B,4,T,h,w] in the compute dtype; timesteps [B]; context [B,L,D] text tokens; fps [B] or None;
        clip_tokens [B,N,width] CLIP patch tokens (I2V); transformer_options: ComfyUI's patches and
        attention options (vc_model/patches.py), the FreeNoise window of VideoCrafter Long Video
        (temporal_window, temporal_stride) and T2V-Turbo's guidance (nodes/turbo_sampling.py);
        frame_context [B,L,T,D]: prompt travel's per-frame tokens (nodes/long_video_logic.py)
        -> eps [B,4,T,h,w]. ControlNet is refused.

        Out-of-memory errors (any sampler) come out as torch.OutOfMemoryError saying what to lower."""
        if control is not None:
            raise ValueError("ControlNet cannot be applied to the VideoCrafter U-Net; remove the Apply ControlNet node.")
        texts = unet_text_arguments(context, frame_context, transformer_options or {})
        with explain_out_of_memory(lambda: sampling_oom(x.shape, self.dtype)):
            return self._forward(x, timesteps, fps=fps, clip_tokens=clip_tokens,
                                 transformer_options=transformer_options, **texts)

    def _forward(self, x, timesteps, context, fps, clip_tokens, transformer_options=None, down_context=None):
        image_context = None
        if clip_tokens is not None:
            if self.image_proj_model is None:
                raise ValueError("This VideoCrafter model is text-to-video: it cannot use an image conditioning.")
            image_context = self.image_proj_model(clip_tokens.to(x.dtype))
        return super().forward(x, timesteps, context, fps=fps, image_context=image_context,
                               transformer_options=transformer_options, down_context=down_context,
                               **turbo_unet_kwargs(transformer_options, timesteps))
