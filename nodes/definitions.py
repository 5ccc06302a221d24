"""The pack's ComfyUI nodes (V3 API). Each class only declares its inputs and calls a helper module.

Validation attaches each message to the input it is about: ComfyUI files a `validate_inputs` result
under every input that function takes, and checks the min/max/options of every input it does not take
itself. So plain ranges are declared on the inputs, and `validate_inputs` takes only the inputs whose
check a range cannot express (a checkpoint file, sizes that must be multiples of 64, eta's meaning).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import conditioning, loader, long_video_nodes, lora, sampler, turbo_nodes, vae_io
from .ckpt_check import inspect_checkpoint, inspect_unet
from .logic import (MAX_BATCH, MAX_CFG, MAX_FPS, MAX_FRAMES, MAX_SIZE, MAX_STEPS, SIZE_MULTIPLE, conditioning_problem,
                    eta_problem, file_problem)

CATEGORY = "VideoCrafter"


class VideoCrafterCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterCheckpointLoader",
            display_name="Load VideoCrafter Checkpoint",
            category=CATEGORY,
            description="Loads an official VideoCrafter model.ckpt/.safetensors (VideoCrafter1 T2V 512/1024, "
                        "VideoCrafter2, VideoCrafter1 I2V); the release is detected from the weights.",
            inputs=[
                io.Combo.Input("ckpt_name", options=loader.checkpoint_names(),
                               tooltip="Checkpoint from models/videocrafter/ (or models/checkpoints/)."),
                io.Combo.Input("weight_dtype", options=list(loader.WEIGHT_DTYPES), default="auto",
                               tooltip="Storage precision of the U-Net weights. auto: ComfyUI's choice for the device "
                                       "(bf16 where supported, else fp16 on GPUs; fp32 on CPUs). fp8 formats halve "
                                       "fp16's memory and compute in bf16/fp16 by casting (_fast: fp8 matrix "
                                       "multiplication on GPUs that have it)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The video U-Net (with the image resampler for I2V)."),
                io.Clip.Output(tooltip="The OpenCLIP-H text encoder (penultimate layer); use CLIP Text Encode."),
                io.Vae.Output(tooltip="The per-frame KL VAE; use VideoCrafter Decode/Encode."),
                io.ClipVision.Output(tooltip="The CLIP image encoder of the I2V model, a core CLIP_VISION (None for "
                                             "text-to-video)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name):
        return file_problem(ckpt_name, loader.checkpoint_path, inspect_checkpoint) or True

    @classmethod
    def execute(cls, ckpt_name, weight_dtype) -> io.NodeOutput:
        model, clip, vae, image_encoder, _ = loader.load_checkpoint(loader.checkpoint_path(ckpt_name), weight_dtype)
        return io.NodeOutput(model, clip, vae, image_encoder)


class VideoCrafterImageEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterImageEncode",
            display_name="VideoCrafter Image Encode",
            category=CATEGORY,
            description="I2V: attaches the image's CLIP tokens to positive (squashed to 224x224, no crop, as "
                        "officially) and the official mid-grey image's tokens to negative.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Text conditioning of the prompt (CLIP Text Encode; long prompts "
                                                         "and the empty prompt work, image tokens are kept apart)."),
                io.Conditioning.Input("negative", tooltip="Text conditioning of the negative (officially the empty prompt)."),
                io.ClipVision.Input("image_encoder", tooltip="CLIP_VISION output of Load VideoCrafter Checkpoint (I2V "
                                                             "model), or ComfyUI's clip_vision_h (the same network)."),
                io.Image.Input("image", tooltip="The image to animate, any size (squashed to 224x224); alpha is ignored, "
                                             "greyscale is used as grey RGB. One image for every video, or a batch "
                                             "with one image per video (as many as batch_size)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, negative, image_encoder, image) -> io.NodeOutput:
        return io.NodeOutput(*conditioning.attach_image(positive, negative, image_encoder, image))


class VideoCrafterConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterConditioning",
            display_name="VideoCrafter Conditioning",
            category=CATEGORY,
            description="Adds the fps conditioning and makes the empty video latent [batch, 4, frames, h/8, w/8].",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning (CLIP Text Encode, optionally via Image Encode)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (officially the empty prompt)."),
                io.Int.Input("width", default=0, min=0, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Video width in pixels, a multiple of 64. 0: the model's native width "
                                     "(1024 for VideoCrafter1 T2V 1024, else 512)."),
                io.Int.Input("height", default=0, min=0, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Video height in pixels, a multiple of 64. 0: the model's native height "
                                     "(576 for VideoCrafter1 T2V 1024, else 320)."),
                io.Int.Input("frames", default=16, min=1, max=MAX_FRAMES,
                             tooltip="Frames per video, 1 to 256; the models were trained on 16, and more frames need "
                                     "more memory."),
                io.Int.Input("fps", default=0, min=0, max=MAX_FPS,
                             tooltip="Conditioning fps (motion speed, not the saved video's frame rate). 0: the "
                                     "release's official value (28 for text-to-video, 8 for image-to-video)."),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="Videos generated at once."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the VideoCrafter MODEL, to resolve the 0 (native) values from "
                                       "its release; without it 0 means 512x320."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def validate_inputs(cls, width, height):  # frames, fps, batch_size: ComfyUI checks their min/max
        return conditioning_problem(width, height, None, None, None) or True

    @classmethod
    def execute(cls, positive, negative, width, height, frames, fps, batch_size, model=None) -> io.NodeOutput:
        return io.NodeOutput(*conditioning.video_conditioning(positive, negative, width, height, frames, fps,
                                                              batch_size, model))


class VideoCrafterSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterSampler",
            display_name="VideoCrafter Sampler",
            category=CATEGORY,
            description="The official VideoCrafter DDIM sampler (uniform timesteps, use_scale, eta), with "
                        "ComfyUI's CFG, previews and interrupt.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from Load VideoCrafter Checkpoint."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning from VideoCrafter Conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning from VideoCrafter Conditioning."),
                io.Latent.Input("latent_image", tooltip="Video latent from VideoCrafter Conditioning (or Encode); image "
                                                     "latents and other models' latents are refused."),
                io.Int.Input("seed", default=123, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise and of the per-step noise (eta > 0)."),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS,
                             tooltip="DDIM steps (official 50); timesteps 1, 1+1000//steps, ... as officially."),
                io.Float.Input("cfg", default=12.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (official 12)."),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="DDIM stochasticity: 1 = official default, 0 = deterministic. Not the duration."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, eta):  # steps, cfg: ComfyUI checks their min/max
        return eta_problem(eta) or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, eta) -> io.NodeOutput:
        return io.NodeOutput(sampler.sample(model, positive, negative, latent_image, seed, steps, cfg, eta))


class VideoCrafterDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterDDIMSampler",
            display_name="VideoCrafter DDIM (SAMPLER)",
            category=CATEGORY,
            description="The official VideoCrafter DDIM update as a SAMPLER for SamplerCustom (use the ddim_uniform "
                        "scheduler for the official timesteps).",
            inputs=[io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="DDIM stochasticity: 1 = official default, 0 = deterministic.")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def validate_inputs(cls, eta):
        return eta_problem(eta) or True

    @classmethod
    def execute(cls, eta) -> io.NodeOutput:
        return io.NodeOutput(sampler.ddim_sampler(eta))


class VideoCrafterDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterDecode",
            display_name="VideoCrafter Decode",
            category=CATEGORY,
            description="Decodes a video latent frame by frame into an IMAGE batch [batch*frames, H, W, 3] "
                        "(for Create Video / Save Video / Save Animated WEBP).",
            inputs=[
                io.Latent.Input("samples", tooltip="Video latent [batch, 4, frames, h, w]; image latents and other "
                                                "models' latents are refused."),
                io.Vae.Input("vae", tooltip="VAE from Load VideoCrafter Checkpoint."),
                io.Int.Input("frames_per_chunk", default=8, min=1, max=MAX_FRAMES,
                             tooltip="Frames decoded per step (each step can be interrupted); lower it if decoding runs "
                                     "out of memory."),
            ],
            outputs=[io.Image.Output(tooltip="All frames, video after video.")],
        )

    @classmethod
    def execute(cls, samples, vae, frames_per_chunk) -> io.NodeOutput:
        return io.NodeOutput(vae_io.decode(vae, samples["samples"], frames_per_chunk))


class VideoCrafterEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterEncode",
            display_name="VideoCrafter Encode",
            category=CATEGORY,
            description="Encodes an IMAGE batch of frames into a video latent [batch, 4, frames, h/8, w/8].",
            inputs=[
                io.Image.Input("pixels", tooltip="Frames, video after video; alpha is ignored, greyscale used as grey RGB. "
                                              "Width and height are cropped to multiples of 8; sampling needs "
                                              "multiples of 64."),
                io.Vae.Input("vae", tooltip="VAE from Load VideoCrafter Checkpoint."),
                io.Int.Input("frames", default=0, min=0, max=MAX_FRAMES,
                             tooltip="Frames per video; 0 makes one video of all images."),
                io.Int.Input("frames_per_chunk", default=8, min=1, max=MAX_FRAMES,
                             tooltip="Frames encoded per step; lower it if encoding runs out of memory."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, pixels, vae, frames, frames_per_chunk) -> io.NodeOutput:
        return io.NodeOutput({"samples": vae_io.encode(vae, pixels, frames, frames_per_chunk)})


class VideoCrafterUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterUNetLoader",
            display_name="Load VideoCrafter U-Net",
            category=CATEGORY,
            description="Loads a VideoCrafter text-to-video U-Net saved on its own (keys with or without "
                        "model.diffusion_model., fp32/fp16/bf16), or the U-Net of a full checkpoint. CLIP and VAE "
                        "come from another loader (see the README).",
            inputs=[
                io.Combo.Input("unet_name", options=loader.unet_names(),
                               tooltip="U-Net file from models/diffusion_models/ (or models/videocrafter/)."),
                io.Combo.Input("weight_dtype", options=list(loader.WEIGHT_DTYPES), default="auto",
                               tooltip="Precision of the U-Net weights. auto: ComfyUI's choice for the device "
                                       "(fp16/bf16 on GPUs, fp32 on CPUs)."),
            ],
            outputs=[io.Model.Output(tooltip="The video U-Net, with the schedule of the release it is.")],
        )

    @classmethod
    def validate_inputs(cls, unet_name):
        return file_problem(unet_name, loader.unet_path, inspect_unet) or True

    @classmethod
    def execute(cls, unet_name, weight_dtype) -> io.NodeOutput:
        model, _ = loader.load_unet(loader.unet_path(unet_name), weight_dtype)
        return io.NodeOutput(model)


class VideoCrafterLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterLoraLoader",
            display_name="Load VideoCrafter LoRA",
            category=CATEGORY,
            description="Applies a U-Net LoRA: ComfyUI/kohya keys (as the core LoraLoader) and PEFT keys "
                        "(base_model.model.*, e.g. the VADER VideoCrafter2 LoRAs).",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from Load VideoCrafter Checkpoint."),
                io.Combo.Input("lora_name", options=loader.lora_names(), tooltip="LoRA file from models/loras/."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength; for a PEFT file whose lora_alpha differs from its rank, "
                                       "multiply by lora_alpha / r (the file does not hold it)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model) -> io.NodeOutput:
        return io.NodeOutput(lora.apply_lora(model, loader.load_lora_file(lora_name), strength_model))


NODES = [VideoCrafterCheckpointLoader, VideoCrafterUNetLoader, VideoCrafterImageEncode, VideoCrafterConditioning,
         VideoCrafterSampler, VideoCrafterDDIMSampler, VideoCrafterDecode, VideoCrafterEncode, VideoCrafterLoraLoader]

# long videos (FreeNoise windows, rescheduled noise, prompt travel): nodes/long_video_nodes.py
NODES += long_video_nodes.NODES
# T2V-Turbo (nodes/turbo_nodes.py)
NODES += turbo_nodes.NODES


class VideoCrafterExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


def extension() -> VideoCrafterExtension:
    loader.register_folder()
    return VideoCrafterExtension()
