"""The T2V-Turbo nodes (V3 API): apply a T2V-Turbo file to a VideoCrafter2 MODEL, its sampler, its SIGMAS."""
from __future__ import annotations

from comfy_api.latest import io

from ..vc_model.turbo import TURBO_DEFAULTS
from . import turbo
from .turbo_sampling import MAX_GUIDANCE, MAX_TURBO_STEPS, apply_problem, steps_problem

CATEGORY = "VideoCrafter"
V2 = TURBO_DEFAULTS["v2"]


class VideoCrafterApplyTurbo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterApplyTurbo",
            display_name="Apply VideoCrafter T2V-Turbo",
            category=CATEGORY,
            description="Makes a VideoCrafter2 MODEL a T2V-Turbo model (few steps, no CFG): the v1 LoRA "
                        "(unet_lora.pt) through ComfyUI's weight patches, or the v2 weights (unet_mg.pt, "
                        "unet_no_mg.pt). Sample with VideoCrafter Turbo Sampler, or KSampler (lcm, cfg 1, simple).",
            inputs=[
                io.Model.Input("model", tooltip="The VideoCrafter2 MODEL from Load VideoCrafter Checkpoint."),
                io.Combo.Input("turbo_name", options=turbo.turbo_names(),
                               tooltip="The T2V-Turbo file, from models/loras/ or models/videocrafter/: unet_lora.pt "
                                       "(v1), unet_mg.pt / unet_no_mg.pt (v2), or their converted .safetensors."),
                io.Float.Input("guidance", default=7.5, min=0.0, max=MAX_GUIDANCE, step=0.1, round=0.01,
                               tooltip="Guidance scale w: an input of the distilled model, not CFG (official 7.5)."),
                io.Float.Input("motion_guidance", default=V2.motion_guidance, min=0.0, max=1.0, step=0.01,
                               tooltip="v2 files with motion guidance only (unet_mg.pt): its strength (official 0.05). "
                                       "Ignored for v1."),
                io.Float.Input("motion_percentage", default=V2.motion_percentage, min=0.0, max=1.0, step=0.05,
                               tooltip="v2 motion guidance: the share of the steps (the first ones) that get it; "
                                       "official 0.5. Ignored for v1."),
            ],
            outputs=[io.Model.Output(tooltip="The T2V-Turbo MODEL (the input MODEL is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, turbo_name, guidance, motion_guidance, motion_percentage):
        problem = apply_problem(guidance, motion_guidance, motion_percentage)
        if problem:
            return problem
        if turbo_name is not None:
            try:
                turbo.turbo_path(turbo_name)
            except FileNotFoundError as error:
                return str(error)
        return True

    @classmethod
    def execute(cls, model, turbo_name, guidance, motion_guidance, motion_percentage) -> io.NodeOutput:
        return io.NodeOutput(turbo.apply(model, turbo_name, guidance, motion_guidance, motion_percentage))


class VideoCrafterTurboSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterTurboSampler",
            display_name="VideoCrafter Turbo Sampler",
            category=CATEGORY,
            description="The official T2V-Turbo sampler: consistency steps at its timesteps (4 steps: 999, 749, 499, "
                        "249), fresh noise every step, no CFG and no negative prompt.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from Apply VideoCrafter T2V-Turbo."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning from VideoCrafter Conditioning (its "
                                                         "fps: official 16 for v1, 8 for v2)."),
                io.Latent.Input("latent_image", tooltip="Video latent from VideoCrafter Conditioning."),
                io.Int.Input("seed", default=123, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise and of the per-step noise."),
                io.Int.Input("steps", default=TURBO_DEFAULTS["v1"].steps, min=1, max=MAX_TURBO_STEPS,
                             tooltip="Sampling steps: official 4 for v1 (8 also works), 16 for v2."),
            ],
            outputs=[io.Latent.Output(tooltip="The last step's denoised latent, as officially.")],
        )

    @classmethod
    def validate_inputs(cls, steps):
        return steps_problem(steps) or True

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps) -> io.NodeOutput:
        return io.NodeOutput(turbo.sample(model, positive, latent_image, seed, steps))


class VideoCrafterTurboScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterTurboScheduler",
            display_name="VideoCrafter Turbo Scheduler",
            category=CATEGORY,
            description="SIGMAS of the official T2V-Turbo timesteps for SamplerCustom (with the lcm sampler and "
                        "cfg 1); KSampler's simple scheduler gives the same for 4 or 8 steps.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from Apply VideoCrafter T2V-Turbo."),
                io.Int.Input("steps", default=TURBO_DEFAULTS["v1"].steps, min=1, max=MAX_TURBO_STEPS,
                             tooltip="Sampling steps: official 4 for v1, 16 for v2."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, steps):
        return steps_problem(steps) or True

    @classmethod
    def execute(cls, model, steps) -> io.NodeOutput:
        return io.NodeOutput(turbo.turbo_model_sigmas(model, steps))


NODES = [VideoCrafterApplyTurbo, VideoCrafterTurboSampler, VideoCrafterTurboScheduler]
