"""T2V-Turbo against the official sampling: 4 Turbo steps vs 50 DDIM steps with CFG, same model and size.

    python -m benchmarks.bench_turbo [--model tiny|vc2] [--dtypes fp32,bf16] [--frames 8 --height 128 --width 128]

Both run `vc_model.generate` (text encode, sampling, VAE decode) on the same VideoCrafter2-kind model
with random weights: DDIM at the official 50 steps, cfg 12, eta 1 (one batch-2 U-Net call per step), and
T2V-Turbo v1 (a random LoRA of the official rank 64, merged) at its official 4 steps (one batch-1 call per
step). Each configuration runs in a fresh worker. Reported per run: wall time, the process's CPU time
(`time.process_time`: what the machine did for us, less sensitive than wall time to other work on a shared
machine), the U-Net's share, and the Turbo / DDIM ratios of both. CPU default: the tiny model at its
native size; `--model vc2` loads the cached full-size random checkpoint (benchmarks/common.py).
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

PROMPT = "a corgi running on the beach at sunset"
SAMPLERS = {"ddim": {"steps": 50, "cfg": 12.0, "eta": 1.0}, "turbo": {"steps": 4}}


def model_config(name: str):
    from vc_model.config import VC2_T2V_512, tiny_config

    return tiny_config() if name == "tiny" else VC2_T2V_512


def worker(spec: dict) -> dict:
    import vc_model
    from vc_model.turbo import lora_key, random_turbo_lora

    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    cfg = model_config(spec["model"])
    common.warm_libraries(device, dtype)
    base = common.baseline_bytes(device)
    start = time.perf_counter()
    if spec.get("checkpoint"):
        bundle = vc_model.load(spec["checkpoint"], dtype=dtype, device=device, config=cfg)
    else:
        bundle = vc_model.build(vc_model.random_state_dict(cfg, seed=0), config=cfg, dtype=dtype, device=device)
    if spec["sampler"] == "turbo":
        lora = random_turbo_lora(cfg.unet, rank=64, seed=1)
        turbo = {lora_key(i // 2, "up" if i % 2 == 0 else "down"): t for i, t in enumerate(lora)}
        bundle = vc_model.apply_turbo(bundle, turbo)
        del lora, turbo
    build_s = time.perf_counter() - start

    unet_s, calls = [0.0], [0]
    forward = bundle.unet.forward

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        out = forward(*args, **kwargs)
        common.sync(device)
        unet_s[0] += time.perf_counter() - begin
        calls[0] += 1
        return out
    bundle.unet.forward = timed

    def generate():
        return vc_model.generate(bundle, PROMPT, height=spec["height"], width=spec["width"], frames=spec["frames"],
                                 fps=16, seed=0, **SAMPLERS[spec["sampler"]])

    runs = []
    with common.peak_meter(device) as meter:
        for n in range(spec["warmup"] + spec["runs"]):
            unet_s[0], calls[0] = 0.0, 0
            begin, begin_cpu = time.perf_counter(), time.process_time()
            video = generate()
            common.sync(device)
            wall, cpu = time.perf_counter() - begin, time.process_time() - begin_cpu
            if n >= spec["warmup"]:
                runs.append({"total_s": wall, "cpu_s": cpu, "unet_s": unet_s[0], "unet_calls": calls[0]})
    best = min(runs, key=lambda r: r["total_s"])
    return {**best, "min_cpu_s": min(r["cpu_s"] for r in runs), "runs": runs, "build_s": build_s,
            "peak_bytes": meter.peak - base, "memory_method": meter.method, "video_shape": list(video.shape)}


def configurations(args) -> list[dict]:
    cuda = args.device.startswith("cuda")
    name = args.model or ("vc2" if cuda else "tiny")
    cfg = model_config(name)
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if cuda else ["fp32"])
    specs = []
    for dtype in dtypes:
        for sampler in SAMPLERS:
            spec = {"model": name, "dtype": dtype, "sampler": sampler, "device": args.device, "threads": args.threads,
                    "runs": args.runs or 2, "warmup": args.warmup, "frames": args.frames or cfg.frames,
                    "height": args.height or cfg.height, "width": args.width or cfg.width}
            if name == "vc2":
                spec["checkpoint"] = str(common.random_checkpoint(args.cache)["safetensors"])
            specs.append(spec)
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--model", choices=["tiny", "vc2"], default=None)
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per worker (50 full-size DDIM steps on a "
                                                                   "busy CPU take long)")
    args = parser.parse_args()

    results = [common.run_worker(__file__, spec, timeout=args.timeout) for spec in configurations(args)]
    ddim = {r["dtype"]: r for r in results if r["sampler"] == "ddim" and "error" not in r}
    rows = []
    for r in results:
        ref = ddim.get(r["dtype"])
        row = {**r, "run": f"{r['sampler']} {r['dtype']}", "what": f"{r['model']} {r['frames']}x{r['height']}x{r['width']}",
               "steps": SAMPLERS[r["sampler"]]["steps"], "peak_gib": r.get("peak_bytes", 0) / GiB}
        if ref is not None and "error" not in r:
            row["wall_ratio"] = r["total_s"] / ref["total_s"]
            row["cpu_ratio"] = r["min_cpu_s"] / ref["min_cpu_s"]
        rows.append(row)
    result = {"benchmark": "turbo", "command": " ".join(sys.argv), "machine": common.machine_info(args.device),
              "results": results}
    text = common.table(rows, [("run", "run"), ("what", "model TxHxW"), ("steps", "steps"), ("unet_calls", "U-Net calls"),
                               ("total_s", "wall s"), ("min_cpu_s", "CPU s"), ("unet_s", "U-Net s"),
                               ("wall_ratio", "wall / DDIM"), ("cpu_ratio", "CPU / DDIM"), ("peak_gib", "peak-base GiB")])
    text += common.error_lines(results, lambda r: f"{r['sampler']} {r['dtype']}")
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    common.run(main, worker)
