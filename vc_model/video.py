"""Writing frames to an mp4 file with PyAV.

H.264 (libx264) when the installed FFmpeg build has it, MPEG-4 Part 2 otherwise; always yuv420p so
every player opens the file. The file is written under a temporary name in the destination folder
and renamed only once it is complete, so an interrupted write never leaves a broken file behind.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import torch

from .files import atomic_output


def _as_uint8(frames) -> torch.Tensor:
    """Frames [T,H,W,3] as uint8: uint8 is kept, floats are read as [0,1] (ComfyUI IMAGE layout)."""
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [T,H,W,3], got {list(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("cannot write a video with no frames")
    if frames.dtype != torch.uint8:
        frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.cpu()


def pick_codec() -> str:
    """'libx264' when PyAV's FFmpeg can encode H.264 with it, else 'mpeg4'."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # codec absent from this FFmpeg build
        return "mpeg4"


def write_mp4(path, frames, fps: float = 8, crf: int = 10, codec: str | None = None) -> Path:
    """Write frames [T,H,W,3] (uint8, or float in [0,1]) to `path` as an mp4; returns the path.

    Odd widths/heights are padded by repeating the last row/column (yuv420p needs even sizes).
    `crf` is the H.264 quality (lower is better; 10 is what the official scripts use).
    """
    import av

    frames = _as_uint8(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = torch.nn.functional.pad(
            frames.permute(0, 3, 1, 2).float(), (0, pad_w, 0, pad_h), mode="replicate"
        ).to(torch.uint8).permute(0, 2, 3, 1)
    _, height, width, _ = frames.shape
    codec = codec or pick_codec()

    path = Path(path)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            else:
                stream.bit_rate = max(2_000_000, int(width * height * float(fps) * 0.5))
            for frame in frames.numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder
    return path


def read_mp4_info(path) -> dict:
    """Frame count, width, height, fps and codec of an mp4 file (decodes every frame to count them)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return {
            "frames": count,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "codec": stream.codec_context.name,
        }
