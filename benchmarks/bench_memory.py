"""U-Net activation peak on the meta device (no compute, any size), against the estimate ComfyUI gets.

    python benchmarks/bench_memory.py [--dtype fp16] [--size FRAMESxHxW ...] [--batch 2]

For every release and latent size: the tracked peak of the tensors one forward creates (weights
and inputs excluded; attention as fused kernels allocate it), `vc_model.memory.unet_activation_bytes`
and their ratio. The fit in vc_model/memory.py comes from these numbers at the native sizes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.common import DTYPES, GiB

SIZES = ["16x40x64", "16x72x128", "16x24x32", "24x40x64"]
RELEASES = ["vc2_t2v_512", "vc1_t2v_1024", "vc1_i2v_512"]


def main() -> None:
    from vc_model.config import RELEASES as CONFIGS
    from vc_model.memory import unet_activation_bytes, unet_activation_peak

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--size", action="append", help="FRAMESxHxW latent size (repeatable)")
    parser.add_argument("--batch", type=int, default=2, help="batch of one U-Net call (2 = cond + uncond)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    rows = []
    for release in RELEASES:
        cfg = CONFIGS[release].unet
        for size in args.size or SIZES:
            frames, height, width = (int(v) for v in size.split("x"))
            start = time.perf_counter()
            peak = unet_activation_peak(cfg, args.batch, frames, height, width, dtype)
            estimate = unet_activation_bytes(cfg, args.batch, frames, height, width, dtype.itemsize)
            rows.append({"release": release, "size": f"{args.batch}x{size}", "peak_gib": peak / GiB,
                         "estimate_gib": estimate / GiB, "ratio": estimate / peak,
                         "seconds": time.perf_counter() - start})
    result = {"benchmark": "memory", "dtype": args.dtype, "command": " ".join(sys.argv),
              "machine": common.machine_info("cpu"), "results": rows}
    text = common.table(rows, [("release", "release"), ("size", "BxTxhxw"), ("peak_gib", "peak GiB"),
                               ("estimate_gib", "estimate GiB"), ("ratio", "estimate/peak"), ("seconds", "s")])
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    main()
