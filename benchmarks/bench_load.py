"""Checkpoint load + build time and peak RSS through `vc_model.load`, full-size VideoCrafter2.

    python -m benchmarks.bench_load [--formats safetensors,ckpt] [--dtypes fp32,bf16] [--cache DIR]

A random full-size VC2 checkpoint (U-Net, VAE, text encoder; about 7 GB in fp32) is written once
into the cache folder (outside the repository) as `.ckpt` and as `.safetensors`. Each load runs in
a fresh process; the peak is RSS above the process's RSS before loading, compared with the bytes
of the built weights in the target dtype. Files are read warm from the page cache (the page cache
is not dropped: other work shares this machine), so times are CPU-bound, not disk-bound.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.common import DTYPES, GiB


def _status(field: str) -> int:
    return common._status_kb(field) * 1024


def worker(spec: dict) -> dict:
    import vc_model

    dtype = DTYPES[spec["dtype"]]
    base = common.rss_bytes()
    with common.PeakRSS() as meter:
        start = time.perf_counter()
        bundle = vc_model.load(spec["path"], dtype=dtype, device=spec["device"])
        load_s = time.perf_counter() - start
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()
    weights = sum(common.tensor_bytes(m) for m in bundle.modules().values())
    after = common.rss_bytes()
    # Touch every weight once, so weights left memory-mapped (not yet read) show up as resident.
    with common.PeakRSS() as touched:
        for module in bundle.modules().values():
            for p in module.parameters():
                p.float().sum() if p.dtype != torch.float32 else p.sum()
    peak = meter.peak - base
    return {"load_s": load_s, "weights_bytes": weights, "peak_bytes": peak, "peak_over_weights": peak / weights,
            "resident_after_bytes": after - base, "resident_after_touch_bytes": max(touched.peak, after) - base,
            "rss_anon_after_bytes": _status("RssAnon"), "rss_file_after_bytes": _status("RssFile"),
            "memory_method": meter.method, "file_bytes": Path(spec["path"]).stat().st_size,
            "components": sorted(bundle.modules())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--formats", default="safetensors,ckpt")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    device = args.device if args.device.startswith("cuda") else "cpu"

    files = common.random_checkpoint(args.cache)
    specs = [{"path": str(files[fmt]), "format": fmt, "dtype": dtype, "device": device, "threads": args.threads}
             for fmt in args.formats.split(",") for dtype in args.dtypes.split(",")]
    results = [common.run_worker(__file__, spec) for spec in specs]
    result = {"benchmark": "load", "model": "VideoCrafter2 full checkpoint (random weights)",
              "command": " ".join(sys.argv), "machine": common.machine_info(device), "results": results}
    rows = [{**r, "run": f"{r['format']} -> {r['dtype']}", "file_gib": r.get("file_bytes", 0) / GiB,
             "weights_gib": r.get("weights_bytes", 0) / GiB, "peak_gib": r.get("peak_bytes", 0) / GiB,
             "after_gib": r.get("resident_after_touch_bytes", 0) / GiB} for r in results]
    text = common.table(rows, [("run", "file -> dtype"), ("file_gib", "file GiB"), ("load_s", "load+build s"),
                               ("weights_gib", "weights GiB"), ("peak_gib", "peak RSS GiB"),
                               ("peak_over_weights", "peak/weights"), ("after_gib", "resident after GiB")])
    text += common.error_lines(results, lambda r: f"{r['format']} {r['dtype']}")
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    if common.is_worker():
        common.worker_main(worker)
    else:
        main()
