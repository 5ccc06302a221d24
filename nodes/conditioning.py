"""Conditioning for VideoCrafter: fps, I2V image tokens and the empty 5D latent.

Values ride in the CONDITIONING dicts under our own keys; `VideoCrafterModel.extra_conds` turns
them into the U-Net's `fps` and `clip_tokens` arguments at sampling time.
"""
from __future__ import annotations

import comfy.model_management as mm
import node_helpers

from .clip_vision import grey_tokens, image_tokens
from .logic import conditioning_problem, empty_latent, image_batch_problem
from .model import FPS_KEY, IMAGE_KEY, VideoCrafterModel

NATIVE_FALLBACK = (512, 320)  # native size of three of the four releases


def videocrafter_model(model) -> VideoCrafterModel:
    """The VideoCrafterModel inside a MODEL, or a ValueError naming what was connected instead."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, VideoCrafterModel):
        raise ValueError(f"This MODEL is {type(inner).__name__ if inner is not None else type(model).__name__}, "
                         "not a VideoCrafter model: load it with Load VideoCrafter Checkpoint.")
    return inner


def has_image(conditioning) -> bool:
    return any(IMAGE_KEY in entry[1] for entry in conditioning)


def image_count(conditioning) -> int:
    """How many start images the conditioning carries (the largest image batch of its entries; 0: none)."""
    return max((entry[1][IMAGE_KEY].shape[0] for entry in conditioning if IMAGE_KEY in entry[1]), default=0)


def attach_image(positive, negative, clip_vision, image):
    """positive gets the image's CLIP tokens, negative the official mid-grey image's tokens
    (official preprocessing, through the CLIP_VISION model)."""
    if clip_vision is None:
        raise ValueError("No image encoder: the checkpoint is text-to-video (only the I2V checkpoint has one).")
    tokens = image_tokens(clip_vision, image)
    grey = grey_tokens(clip_vision, 1)
    return (node_helpers.conditioning_set_values(positive, {IMAGE_KEY: tokens}),
            node_helpers.conditioning_set_values(negative, {IMAGE_KEY: grey}))


def video_conditioning(positive, negative, width, height, frames, fps, batch_size, model=None):
    """-> (positive, negative, LATENT). width/height/fps 0 = the model's release values."""
    release = videocrafter_model(model).release if model is not None else None
    if release is not None:
        width, height = width or release.width, height or release.height
        fps = fps or release.fps
        if has_image(positive) and not release.is_i2v:
            raise ValueError(f"{release.name} is text-to-video, but the positive conditioning carries an image "
                             "from VideoCrafter Image Encode.")
    width, height = width or NATIVE_FALLBACK[0], height or NATIVE_FALLBACK[1]
    problem = conditioning_problem(width, height, frames, fps, batch_size)
    if not problem and has_image(positive):
        problem = image_batch_problem(image_count(positive), batch_size)
    if problem:
        raise ValueError(problem)
    if fps:
        positive = node_helpers.conditioning_set_values(positive, {FPS_KEY: int(fps)})
        negative = node_helpers.conditioning_set_values(negative, {FPS_KEY: int(fps)})
    latent = empty_latent(batch_size, frames, width, height, device=mm.intermediate_device())
    return positive, negative, {"samples": latent}
