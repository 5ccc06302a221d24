"""Long videos: one U-Net step (cond + uncond) at 64 frames against 16, time and peak memory.

    python benchmarks/bench_long_video.py [--device cpu] [--dtype bf16] [--size 8x8] [--runs 2]

Full-width VideoCrafter2 U-Net with random weights (the cached random checkpoint of the other
benchmarks), batch 2, one forward per step. Rows:

* plain 16: the model as trained (16 frames).
* FreeNoise 64: 64 frames, temporal attention in windows of 16 every 4 (VideoCrafter Long Video).
* plain 64: 64 frames, full temporal attention (what the model does without help; blurry videos).
* context windows 64: the core Context Windows (Manual) node's way with its standard_static schedule,
  length 16, overlap 4, pyramid fusion: the U-Net on 5 windows of 16 frames, fused per frame.

CPU default: latent 8x8 (64x64 pixels), bf16; CUDA default: 40x64 (320x512), fp16.
Each row runs in a fresh worker process, so peak memory is per row (RSS on CPU, allocated on CUDA).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.bench_unet import build_model, make_inputs
from benchmarks.common import DTYPES

MODES = {  # name -> (frames, temporal window, context windows)
    "plain 16": (16, None, False),
    "FreeNoise 64": (64, 16, False),
    "plain 64": (64, None, False),
    "context windows 64": (64, None, True),
}


def static_windows(frames: int, length: int = 16, overlap: int = 4) -> list[list[int]]:
    """The core handler's standard_static windows (comfy/context_windows.py, read for the numbers)."""
    windows, start = [], 0
    while start + length < frames:
        windows.append(list(range(start, start + length)))
        start += length - overlap
    return windows + [list(range(frames - length, frames))]


def context_window_step(model, x, t, context, fps):
    """The U-Net on each window, predictions fused with the pyramid weights."""
    frames, length = x.shape[2], 16
    out = torch.zeros_like(x)
    count = torch.zeros(frames, 1, 1, dtype=x.dtype, device=x.device)
    weight = torch.tensor([min(j + 1, length - j) for j in range(length)], dtype=x.dtype, device=x.device)[:, None, None]
    for index in static_windows(frames, length):
        out[:, :, index] += model(x[:, :, index], t, context, fps=fps) * weight
        count[index] += weight
    return out / count


def worker(spec: dict) -> dict:
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    frames, window, windows = MODES[spec["mode"]]
    x, t, context, fps = make_inputs({**spec, "frames": frames}, device)
    x, context = x.to(dtype), context.to(dtype)
    common.warm_libraries(device, dtype)
    base = common.baseline_bytes(device)
    model, _ = build_model({**spec, "impl": "ours"}, device)
    weights = common.tensor_bytes(model)

    def step():
        with torch.inference_mode():
            if windows:
                return context_window_step(model, x, t, context, fps)
            return model(x, t, context, fps=fps, temporal_window=window)

    with common.peak_meter(device) as meter:
        timing = common.time_runs(step, spec["runs"], spec["warmup"], device)
    peak = meter.peak - base
    return {**timing, "frames": frames, "weights_bytes": weights, "peak_bytes": peak,
            "activation_bytes": peak - weights, "memory_method": meter.method, "baseline_bytes": base,
            "per_frame_s": timing["min_s"] / frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--dtype", default=None, choices=list(DTYPES))
    parser.add_argument("--size", default=None, help="HxW latent size (CPU default 8x8, CUDA 40x64)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    height, width = (int(v) for v in (args.size or ("40x64" if cuda else "8x8")).split("x"))
    dtype = args.dtype or ("fp16" if cuda else "bf16")
    checkpoint = str(common.random_checkpoint(args.cache)["safetensors"])
    tmp = Path(tempfile.mkdtemp(prefix="vc_bench_long_"))
    specs = [{"checkpoint": checkpoint, "device": args.device, "threads": args.threads, "dtype": dtype,
              "runs": args.runs or (5 if cuda else 2), "warmup": args.warmup, "batch": 2, "height": height,
              "width": width, "mode": mode, "save": str(tmp / f"{n}.pt")}
             for n, mode in enumerate(args.modes.split(","))]
    start = time.perf_counter()
    results = [common.run_worker(__file__, spec) for spec in specs]
    base = next((r for r in results if r.get("mode") == "plain 16" and "error" not in r), None)
    for r in results:
        if base is not None and "error" not in r:
            r["time_vs_16"] = r["min_s"] / base["min_s"]
            r["activations_vs_16"] = r["activation_bytes"] / base["activation_bytes"]
    result = {"benchmark": "long_video", "model": "VideoCrafter2 U-Net (random weights), batch 2 (cond + uncond)",
              "command": " ".join(sys.argv), "machine": common.machine_info(args.device), "latent": [height, width],
              "dtype": dtype, "results": results, "total_s": time.perf_counter() - start}
    rows = [{**r, "peak_gib": r.get("peak_bytes", 0) / common.GiB, "act_gib": r.get("activation_bytes", 0) / common.GiB}
            for r in results]
    text = common.table(rows, [("mode", "mode"), ("frames", "frames"), ("min_s", "step s"), ("time_vs_16", "x 16"),
                               ("peak_gib", "peak GiB"), ("act_gib", "activations GiB"),
                               ("activations_vs_16", "x 16"), ("error", "error")])
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    common.run(main, worker)
