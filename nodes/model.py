"""VideoCrafter as a native ComfyUI model type: latent format, ModelSampling, model config, BaseModel.

A `VideoCrafterModel` wrapped in a ModelPatcher is an ordinary MODEL: KSampler, SamplerCustom and
every core sampler and scheduler run it, with CFG, previews, interrupts and model management.
"""
from __future__ import annotations

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_sampling
import comfy.supported_models_base

from ..vc_model.config import ModelConfig
from ..vc_model.schedule import Schedule
from . import sigmas as vs
from .diffusion import VideoCrafterUNet
from .logic import image_batch_problem, latent_problem, latent_size_problem

# Conditioning keys our nodes set (namespaced so other models' conditionings never collide).
FPS_KEY = "videocrafter_fps"
IMAGE_KEY = "videocrafter_image_tokens"


class VideoCrafterLatent(comfy.latent_formats.SD15):
    """SD KL-f8 latents (scale 0.18215) with a frame axis: [B, 4, T, H/8, W/8]."""

    latent_dimensions = 3

    def __init__(self, scale_factor=0.18215):
        super().__init__(scale_factor)
        self.taesd_decoder_name = None  # the SD TAESD previewer decodes 4D latents only


class ModelSamplingVideoCrafter(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """EPS sampling on the sigma' = sigma / s table of `use_scale`; the maths is nodes/sigmas.py's.

    The sigma table, timestep lookup and schedulers are ModelSamplingDiscrete's own, on sigma'.
    Only the model input (x * s / sqrt(1 + (sigma' s)^2)) and a start from pure noise differ.
    """

    def __init__(self, model_config=None, schedule: Schedule | None = None):
        super().__init__(model_config)
        if schedule is not None:
            table, scales = vs.sigma_tables(schedule.alphas_cumprod, schedule.scale_arr)
            self.set_sigmas(table)
            self.register_buffer("signal_scales", scales)
        else:
            self.register_buffer("signal_scales", torch.ones_like(self.sigmas))

    def signal_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s(sigma') for sigma of any shape."""
        return vs.interpolate_scale(sigma, self.log_sigmas, self.signal_scales)

    def calculate_input(self, sigma, noise):
        return vs.model_input(sigma, noise, self.log_sigmas, self.signal_scales)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return vs.noised_latent(sigma, noise, latent_image, self.log_sigmas, self.signal_scales, max_denoise)


class VideoCrafterModelConfig(comfy.supported_models_base.BASE):
    """Model config of one loaded checkpoint; the diffusion model is built by the loader."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = VideoCrafterLatent
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def __init__(self, release: ModelConfig):
        self.sampling_settings = {
            "linear_start": release.schedule.linear_start,
            "linear_end": release.schedule.linear_end,
            "timesteps": release.schedule.timesteps,
        }
        super().__init__(dict(self.unet_config))
        self.release = release


class VideoCrafterModel(comfy.model_base.BaseModel):
    """BaseModel around `VideoCrafterUNet`; fps and CLIP image tokens arrive as extra conds."""

    def __init__(self, model_config: VideoCrafterModelConfig, diffusion_model: VideoCrafterUNet,
                 schedule: Schedule, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device)
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingVideoCrafter(model_config, schedule)
        self.release = model_config.release

    @property
    def size_multiple(self) -> int:
        """Latent height/width must divide by this (2 per U-Net downsampling)."""
        return 2 ** (len(self.release.unet.channel_mult) - 1)

    @property
    def is_i2v(self) -> bool:
        return self.diffusion_model.image_proj_model is not None

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        problem = latent_problem(kwargs.get("noise")) or latent_size_problem(kwargs["noise"], self.size_multiple)
        if problem:
            raise ValueError(problem)
        device = kwargs["device"]
        tokens = kwargs.get(IMAGE_KEY)
        if tokens is not None and not self.is_i2v:
            raise ValueError(f"{self.release.name} is text-to-video, but this conditioning carries an image from "
                             "VideoCrafter Image Encode; remove that node or load the I2V checkpoint.")
        if tokens is None and self.is_i2v:
            raise ValueError(f"{self.release.name} is image-to-video: pass positive and negative through "
                             "VideoCrafter Image Encode so both carry image tokens.")
        if tokens is not None:
            problem = image_batch_problem(tokens.shape[0], kwargs["noise"].shape[0])
            if problem:
                raise ValueError(problem)
            out["clip_tokens"] = comfy.conds.CONDRegular(tokens.to(device))
        if self.diffusion_model.fps_embedding is not None:
            fps = kwargs.get(FPS_KEY) or self.release.fps
            out["fps"] = comfy.conds.CONDRegular(torch.tensor([int(fps)], dtype=torch.long, device=device))
        return out
