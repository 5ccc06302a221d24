"""Long-video nodes (V3 API): FreeNoise windows on the MODEL, rescheduled NOISE, prompt travel."""
from __future__ import annotations

from comfy_api.latest import io

from ..vc_model.freenoise import DEFAULT_STRIDE, DEFAULT_WINDOW
from . import long_video
from .logic import MAX_FRAMES
from .long_video_logic import window_problem

CATEGORY = "VideoCrafter"
WINDOW_TOOLTIP = "Frames per temporal-attention window (FreeNoise: 16, what the models were trained on)."
STRIDE_TOOLTIP = "Frames between window starts (FreeNoise: 4); at most the window."


class VideoCrafterLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterLongVideo",
            display_name="VideoCrafter Long Video (FreeNoise)",
            category=CATEGORY,
            description="FreeNoise: the temporal attention runs in overlapping windows fused with triangle weights, "
                        "and the starting noise repeats locally shuffled, so the 16-frame models make longer "
                        "videos. Every sampler uses it (KSampler, SamplerCustom, VideoCrafter Sampler).",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from Load VideoCrafter Checkpoint."),
                io.Int.Input("window", default=DEFAULT_WINDOW, min=1, max=MAX_FRAMES, tooltip=WINDOW_TOOLTIP),
                io.Int.Input("stride", default=DEFAULT_STRIDE, min=1, max=MAX_FRAMES, tooltip=STRIDE_TOOLTIP),
                io.Boolean.Input("reschedule_noise", default=True,
                                 tooltip="Reschedule the starting noise of every sampler from its seed (FreeNoise). "
                                         "Off: plain noise (e.g. with VideoCrafter FreeNoise Noise or the core "
                                         "Context Windows node's freenoise)."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with windowed temporal attention; clips of at most `window` "
                                             "frames are unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, window, stride):
        return window_problem(window, stride) or True

    @classmethod
    def execute(cls, model, window, stride, reschedule_noise) -> io.NodeOutput:
        return io.NodeOutput(long_video.long_video_model(model, window, stride, reschedule_noise))


class VideoCrafterFreeNoiseNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterFreeNoiseNoise",
            display_name="VideoCrafter FreeNoise Noise",
            category=CATEGORY,
            description="NOISE for SamplerCustomAdvanced: the seed's noise with FreeNoise rescheduling (the first "
                        "`window` frames kept, each later block of `stride` frames a shuffle of the block `window` "
                        "frames earlier).",
            inputs=[
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise and of its shuffles."),
                io.Int.Input("window", default=DEFAULT_WINDOW, min=1, max=MAX_FRAMES, tooltip=WINDOW_TOOLTIP),
                io.Int.Input("stride", default=DEFAULT_STRIDE, min=1, max=MAX_FRAMES, tooltip=STRIDE_TOOLTIP),
            ],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def validate_inputs(cls, window, stride):
        return window_problem(window, stride) or True

    @classmethod
    def execute(cls, noise_seed, window, stride) -> io.NodeOutput:
        return io.NodeOutput(long_video.RescheduledNoise(noise_seed, window, stride))


class VideoCrafterPromptTravel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoCrafterPromptTravel",
            display_name="VideoCrafter Prompt Travel",
            category=CATEGORY,
            description="Positive conditioning for one video that travels through several prompts (FreeNoise "
                        "multi-prompt): the frames hold each prompt in turn with linear blends between neighbours. "
                        "Connect it where CLIP Text Encode's positive would go; every sampler honours it.",
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP from Load VideoCrafter Checkpoint."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="One prompt per line, in the order the video shows them (each up to 75 "
                                        "tokens). Two prompts: 3/8 of the frames the first, 1/4 a blend, 3/8 the "
                                        "second."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Positive conditioning carrying every prompt.")],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        return io.NodeOutput(long_video.travel_conditioning(clip, text))


NODES = [VideoCrafterLongVideo, VideoCrafterFreeNoiseNoise, VideoCrafterPromptTravel]
