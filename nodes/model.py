"""VideoCrafter as a native ComfyUI model type: latent format, ModelSampling, model config, BaseModel.

A `VideoCrafterModel` wrapped in a ModelPatcher is an ordinary MODEL: KSampler, SamplerCustom and
every core sampler and scheduler run it, with CFG, previews, interrupts and model management
(ComfyUI's ops, so manual cast, fp8 and partial loading; its attention; transformer_options
patches; DIFFUSION_MODEL wrappers; CheckpointSave in the official layout; a measured memory estimate).
"""
from __future__ import annotations

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models
import comfy.supported_models_base

from ..vc_model.checkpoint import COMPONENT_PREFIXES
from ..vc_model.config import ModelConfig
from ..vc_model.memory import unet_activation_bytes
from ..vc_model.schedule import Schedule, schedule_buffers
from . import sigmas as vs
from .clip_vision import open_clip_state_dict
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


# Core patch nodes whose patches the U-Net would run but whose own code cannot handle video latents.
IMAGE_ONLY_PATCHES = {
    "SelfAttentionGuidance": "Self-Attention Guidance blurs the prediction as an image [B, C, H, W] and fails on "
                             "video latents; use Perturbed Attention Guidance instead",
}


def refuse_image_only_patches(transformer_options: dict) -> None:
    """ValueError for a patch set by a core node listed in IMAGE_ONLY_PATCHES (found by its function's name)."""
    replace = transformer_options.get("patches_replace") or {}
    patches = transformer_options.get("patches") or {}
    functions = [f for table in replace.values() for f in (table or {}).values()]
    functions += [f for items in patches.values() for f in (items or ())]
    for function in functions:
        name = getattr(function, "__qualname__", "")
        for node, reason in IMAGE_ONLY_PATCHES.items():
            if name.startswith(node + "."):
                raise ValueError(f"{reason}: remove the {node} node for VideoCrafter models.")


class ComfyVideoCrafterUNet(VideoCrafterUNet):
    """VideoCrafterUNet run through ComfyUI's DIFFUSION_MODEL wrappers (EasyCache, ...), as core U-Nets are."""

    def forward(self, x, timesteps, context=None, fps=None, clip_tokens=None, control=None, transformer_options={},
                **kwargs):
        refuse_image_only_patches(transformer_options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            super().forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, fps, clip_tokens, control, transformer_options, **kwargs)


class VideoCrafterModelConfig(comfy.supported_models_base.BASE):
    """Model config of one loaded checkpoint; the diffusion model is built by the loader.

    `unet_config["model_channels"]` is there for core patches that read it (FreeU). bf16 first:
    `auto` picks it where the device supports it (fp16 risks overflow with the real weights).
    `memory_usage_factor` is informative: `VideoCrafterModel.memory_required` uses the measured fit
    of vc_model/memory.py (this value gives the same estimate for 320x512x16, cond + uncond, fp16).
    Saving (CheckpointSave) writes the official key layout, which Load VideoCrafter Checkpoint reads.
    """

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = VideoCrafterLatent
    memory_usage_factor = 0.81
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, release: ModelConfig):
        self.sampling_settings = {
            "linear_start": release.schedule.linear_start,
            "linear_end": release.schedule.linear_end,
            "timesteps": release.schedule.timesteps,
        }
        super().__init__({**self.unet_config, "model_channels": release.unet.model_channels})
        self.release = release

    def process_unet_state_dict_for_saving(self, state_dict):
        proj = "image_proj_model."
        return {(COMPONENT_PREFIXES["image_proj"] + k[len(proj):] if k.startswith(proj) else COMPONENT_PREFIXES["unet"] + k): v
                for k, v in state_dict.items()}

    def process_clip_state_dict_for_saving(self, state_dict):
        """ComfyUI's SD2 CLIP-H layout back to the checkpoint's OpenCLIP `cond_stage_model.model.*`."""
        return comfy.supported_models.SD20.process_clip_state_dict_for_saving(self, state_dict)

    def process_clip_vision_state_dict_for_saving(self, state_dict):
        return open_clip_state_dict(state_dict)


class VideoCrafterModel(comfy.model_base.BaseModel):
    """BaseModel around `VideoCrafterUNet`; fps and CLIP image tokens arrive as extra conds.

    `clip_vision` (I2V: the checkpoint's CLIP_VISION, kept outside the module tree) is saved with
    the model by CheckpointSave, which does not pass one itself."""

    def __init__(self, model_config: VideoCrafterModelConfig, diffusion_model: VideoCrafterUNet,
                 schedule: Schedule, device=None, clip_vision=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device)
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingVideoCrafter(model_config, schedule)
        self.release = model_config.release
        self.clip_vision = [clip_vision] if clip_vision is not None else []

    def memory_required(self, input_shape, cond_shapes={}):
        """Activation bytes of one U-Net call on `input_shape` [B,4,T,h,w] (vc_model/memory.py)."""
        dtype = self.manual_cast_dtype or self.get_dtype()
        batch, _, frames, height, width = (list(input_shape) + [1] * 5)[:5]
        return unet_activation_bytes(self.release.unet, batch, frames, height, width,
                                     comfy.model_management.dtype_size(dtype))

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        if clip_vision_state_dict is None and self.clip_vision:
            clip_vision_state_dict = self.clip_vision[0].get_sd()
        out = super().state_dict_for_saving(clip_state_dict, vae_state_dict, clip_vision_state_dict)
        out.update(schedule_buffers(self.release.schedule))
        return out

    @property
    def size_multiple(self) -> int:
        """Latent height/width must divide by this (2 per U-Net downsampling)."""
        return 2 ** (len(self.release.unet.channel_mult) - 1)

    @property
    def is_i2v(self) -> bool:
        return self.diffusion_model.image_proj_model is not None

    def extra_conds(self, **kwargs):
        if not isinstance(self.model_sampling, ModelSamplingVideoCrafter):
            raise ValueError(
                f"A node replaced the VideoCrafter model's sampling with {type(self.model_sampling).__name__} (e.g. "
                "ModelSamplingDiscrete): that drops VideoCrafter's noise schedule (its use_scale rescaling), so the "
                "video would be degraded. Remove that node; the model already samples with its own schedule.")
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
            width = self.diffusion_model.image_proj_model.cfg.embedding_dim
            if tokens.shape[-1] != width:
                raise ValueError(f"The image tokens are {tokens.shape[-1]} wide but {self.release.name} needs {width} "
                                 "(its own CLIP vision model, OpenCLIP ViT-H/14): connect the CLIP_VISION output of "
                                 "Load VideoCrafter Checkpoint to VideoCrafter Image Encode.")
            out["clip_tokens"] = comfy.conds.CONDRegular(tokens.to(device))
        if self.diffusion_model.fps_embedding is not None:
            fps = kwargs.get(FPS_KEY) or self.release.fps
            out["fps"] = comfy.conds.CONDRegular(torch.tensor([int(fps)], dtype=torch.long, device=device))
        return out
