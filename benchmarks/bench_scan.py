"""Cost of the NaN/inf scan `build` makes while it copies weights (`vc_model.integrity.FiniteScan`).

    python -m benchmarks.bench_scan [--width 160] [--repeats 5] [--device cpu]

The VideoCrafter2 U-Net's tensors (at `--width` model channels; 320 is the release, 160 a quarter of its
weights) are made in float32 in memory, then timed: the cast to bf16 that loading does anyway, the same cast
with the scan (one float32 sum per tensor, read once at the end), and the scan alone over float32 tensors
(what an fp32 load on the CPU adds, where the weights are not copied). Best of `--repeats`, interleaved.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import vc_model
from vc_model.config import VC2_T2V_512
from vc_model.integrity import FiniteScan


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = VC2_T2V_512.replace(unet=dataclasses.replace(VC2_T2V_512.unet, model_channels=args.width),
                                 vae=None, text_encoder=None)
    shapes = {k: s for k, s in vc_model.expected_shapes(config).items() if k.startswith("model.diffusion_model.")}
    weights = {k: torch.randn(s) for k, s in shapes.items()}
    gib = sum(t.numel() for t in weights.values()) * 4 / 2**30

    def cast(scan: FiniteScan | None):
        for key, tensor in weights.items():
            copy = tensor.to(device=args.device, dtype=torch.bfloat16)
            if scan is not None:
                scan.add(key, copy, tensor)
        if scan is not None:
            scan.warn(weights)

    def scan_only():
        scan = FiniteScan()
        for key, tensor in weights.items():
            scan.add(key, tensor, tensor)
        scan.warn(weights)

    runs = {"plain": [], "scanned": [], "alone": []}
    for _ in range(args.repeats):  # interleaved, so load from other work on the machine hits all three alike
        runs["plain"].append(timed(lambda: cast(None), args.device))
        runs["scanned"].append(timed(lambda: cast(FiniteScan()), args.device))
        runs["alone"].append(timed(scan_only, args.device))
    plain, scanned, alone = (min(runs[k]) for k in ("plain", "scanned", "alone"))
    print(f"{len(weights)} tensors, {gib:.2f} GiB in float32, device {args.device}, {torch.get_num_threads()} threads")
    print(f"cast to bf16          {plain:7.3f} s")
    print(f"cast to bf16 + scan   {scanned:7.3f} s  (+{100 * (scanned - plain) / plain:.0f}%)")
    print(f"scan of fp32 alone    {alone:7.3f} s  ({gib / alone:.1f} GiB/s)")


if __name__ == "__main__":
    main()
