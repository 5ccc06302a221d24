"""Checkpoint load + build, and memory held through one U-Net forward, full-size VideoCrafter2.

    python -m benchmarks.bench_load [--formats safetensors,ckpt] [--dtypes fp32,bf16]
                                    [--readers load,load_state_dict] [--cache DIR] [--threads N]
                                    [--checkpoint FILE ...]

A random full-size VC2 checkpoint (U-Net, VAE, text encoder; about 7 GB in fp32) is written once
into the cache folder (outside the repository) as `.ckpt` and as `.safetensors` (`--checkpoint`
measures given files instead, e.g. an official `model.ckpt`, which needs a U-Net). Each run is a fresh
process that reads one file into one dtype through one reader: `vc_model.load(path)` (lazy), or
`vc_model.load_state_dict(path)` + `vc_model.build(sd)` + `del sd`. RSS, RssAnon and RssFile
(/proc/self/status) are taken at three moments: libraries imported (after the imports and one run of
the tiny model, so thread pools and library state exist: the baseline), after the build, and after one
U-Net forward of x[2,4,8,16,16] (batch 2 = cond + uncond) preceded by one read of every weight (as a
generation reads the text encoder and the VAE too; weights left as views of the file are resident from
then on). Peaks are VmHWM above the baseline, over the load and over the read + forward, divided by the
bytes of the built weights in the target dtype. Last, glibc's malloc_trim(0) shows how much of RssAnon
after the forward is free blocks the allocator keeps rather than data still held. Files are read warm
from the page cache (it is not dropped: other work shares this machine), so times are CPU-bound, not
disk-bound; under memory pressure the kernel may reclaim clean file pages (fp32 RssFile then drops).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.common import DTYPES, GiB

MOMENTS = ("libraries", "built", "forward")


def _memory() -> dict[str, int]:
    return {"rss": common.rss_bytes(), "anon": common._status_kb("RssAnon") * 1024,
            "file": common._status_kb("RssFile") * 1024}


def _trimmed() -> dict[str, int] | None:
    """Memory after glibc's malloc_trim(0), which returns the free blocks it keeps in its heaps: what
    of RssAnon is the allocator's cache rather than data still held (None without glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return _memory()


def _read(spec: dict, dtype: torch.dtype):
    import vc_model

    if spec["reader"] == "load":
        return vc_model.load(spec["path"], dtype=dtype, device=spec["device"])
    state_dict = vc_model.load_state_dict(spec["path"])
    bundle = vc_model.build(state_dict, dtype=dtype, device=spec["device"])
    del state_dict
    return bundle


def worker(spec: dict) -> dict:
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    common.warm_libraries(device, dtype)
    memory = {"libraries": _memory()}
    base = memory["libraries"]["rss"]
    with common.PeakRSS() as loading:
        start = time.perf_counter()
        bundle = _read(spec, dtype)
        common.sync(device)
        load_s = time.perf_counter() - start
    gc.collect()
    memory["built"] = _memory()
    weights = sum(common.tensor_bytes(m) for m in bundle.modules().values())

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, 16, generator=generator).to(device)
    context = torch.randn(2, 77, bundle.config.unet.context_dim, generator=generator).to(device)
    with common.PeakRSS() as inference, torch.inference_mode():
        for module in bundle.modules().values():
            for tensor in list(module.parameters()) + list(module.buffers()):
                tensor.sum()
        start = time.perf_counter()
        bundle.unet(x, torch.tensor([500, 500], device=device), context, fps=torch.tensor([28, 28], device=device))
        common.sync(device)
        forward_s = time.perf_counter() - start
    memory["forward"] = _memory()
    del x, context
    memory["trimmed"] = _trimmed()
    return {"load_s": load_s, "forward_s": forward_s, "weights_bytes": weights, "memory": memory,
            "load_peak_over_weights": (loading.peak - base) / weights,
            "inference_peak_over_weights": (max(inference.peak, loading.peak) - base) / weights,
            "held_over_weights": (memory["forward"]["rss"] - base) / weights,
            "memory_method": inference.method, "baseline_method": common.BASELINE_METHOD,
            "file_bytes": Path(spec["path"]).stat().st_size, "components": sorted(bundle.modules())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--formats", default="safetensors,ckpt")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--readers", default="load,load_state_dict",
                        help="vc_model.load (lazy) and/or vc_model.load_state_dict + build")
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="measure this file instead of the random VC2 checkpoints (repeatable)")
    args = parser.parse_args()
    device = args.device if args.device.startswith("cuda") else "cpu"

    if args.checkpoint:
        files = {Path(path).suffix.lstrip("."): Path(path) for path in args.checkpoint}
    else:
        cached = common.random_checkpoint(args.cache)
        files = {fmt: cached[fmt] for fmt in args.formats.split(",")}
    specs = [{"path": str(path), "format": fmt, "dtype": dtype, "reader": reader, "device": device,
              "threads": args.threads}
             for fmt, path in files.items() for dtype in args.dtypes.split(",")
             for reader in args.readers.split(",")]
    results = [common.run_worker(__file__, spec) for spec in specs]  # one at a time: each holds ~7 GB
    result = {"benchmark": "load", "model": "VideoCrafter2 full checkpoint (random weights)" if not args.checkpoint
              else ", ".join(args.checkpoint),
              "command": " ".join(sys.argv), "machine": common.machine_info(device), "results": results}
    label = lambda r: f".{r['format']} -> {r['dtype']}, {r['reader']}"  # noqa: E731
    rows = [{**r, "run": label(r), "weights_gib": r["weights_bytes"] / GiB,
             **{f"{m}_{k}": r["memory"][m][k] / GiB for m in MOMENTS for k in ("rss", "anon", "file")},
             "trimmed_anon": r["memory"]["trimmed"]["anon"] / GiB if r["memory"].get("trimmed") else None}
            for r in results if "error" not in r]
    text = common.table(rows, [("run", "file -> dtype, reader"), ("load_s", "load+build s"),
                               ("weights_gib", "weights GiB"), ("load_peak_over_weights", "load peak/weights"),
                               ("inference_peak_over_weights", "inference peak/weights"),
                               ("held_over_weights", "held after/weights")])
    text += "\n\nRSS / RssAnon / RssFile GiB at each moment, and RssAnon after malloc_trim:\n"
    text += common.table(rows, [("run", "file -> dtype, reader")] + [
        (f"{m}_{k}", f"{m} {k}") for m in MOMENTS for k in ("rss", "anon", "file")]
        + [("trimmed_anon", "trimmed anon")])
    text += common.error_lines(results, label)
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    common.run(main, worker)
