"""U-Net forward at full VideoCrafter2 width with random weights: time, FLOP/s, peak memory.

    python -m benchmarks.bench_unet [--official /work/official] [--dtypes fp32,bf16] [--runs 3]

CPU default: batch 2 (cond + uncond in one call), 8 frames, 16x16 latent, fp32 and bf16.
CUDA default: batch 2, 16 frames, 40x64 and 72x128 latents, fp32, bf16 and fp16.
With --official the official UNetModel (fp32; it has no half-precision path) runs on the same
inputs with the same weights, loaded strictly through the official key names.
Extra rows: --split-cfg (cond and uncond as two batch-1 calls, the official sampler's way),
--compile (torch.compile of our U-Net).
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
from benchmarks.common import DTYPES, GiB

PREFIX = "model.diffusion_model."


def unet_only_config():
    from vc_model.config import VC2_T2V_512

    return VC2_T2V_512.replace(vae=None, text_encoder=None)


def unet_weights(spec: dict):
    """The U-Net part of the cached random VC2 checkpoint (official key names, read lazily)."""
    return common.component_weights(spec["checkpoint"], PREFIX)


def official_unet(official: str, device: str = "cpu"):
    """The official UNetModel for the VC2 config, built on `device` (use "meta" before assigning)."""
    import yaml

    common.import_official(official)
    from lvdm.modules.networks.openaimodel3d import UNetModel

    path = Path(official) / "configs" / "inference_t2v_512_v2.0.yaml"
    params = dict(yaml.safe_load(path.read_text())["model"]["params"]["unet_config"]["params"])
    # Gradient checkpointing only matters for training; under no_grad it just calls the block.
    params["use_checkpoint"] = False
    with torch.device(device):
        return UNetModel(**params)


def build_model(spec: dict, device: str):
    """(model, forward(x, t, context, fps)) for spec["impl"] on `device` ("meta": shapes only)."""
    impl, dtype = spec["impl"], DTYPES[spec["dtype"]]
    if impl == "official":
        model = official_unet(spec["official"], "meta")
        if device != "meta":
            weights = {k[len(PREFIX):]: v for k, v in unet_weights(spec).items()}
            model.load_state_dict(weights, strict=True, assign=True)
            del weights
            model = model.to(device=device, dtype=dtype)
        model.eval().requires_grad_(False)
        return model, lambda x, t, c, fps: model(x, t, context=c, fps=fps)
    import vc_model
    from vc_model.unet import UNet3D

    if device == "meta":
        with torch.device("meta"):
            model = UNet3D(unet_only_config().unet)
    else:
        model = vc_model.build(unet_weights(spec), config=unet_only_config(), dtype=dtype, device=device).unet
    if spec.get("compile"):
        model = torch.compile(model)
    return model, lambda x, t, c, fps: model(x, t, c, fps=fps)


def make_inputs(spec: dict, device: str):
    """x and context in the benchmarked dtype (the U-Net computes in its input's dtype)."""
    g = torch.Generator().manual_seed(1)
    b, t, h, w = spec["batch"], spec["frames"], spec["height"], spec["width"]
    dtype = DTYPES[spec["dtype"]]
    x = torch.randn(b, 4, t, h, w, generator=g).to(dtype)
    context = torch.randn(b, 77, 1024, generator=g).to(dtype)
    timesteps = torch.full((b,), 500, dtype=torch.long)
    fps = torch.full((b,), 28, dtype=torch.long)
    return [v.to(device) for v in (x, timesteps, context, fps)]


def worker(spec: dict) -> dict:
    if spec.get("ab"):
        return ab_worker(spec)
    device = spec["device"]
    if spec["impl"] == "official":
        common.import_official(spec["official"])

    meta_model, meta_forward = build_model(spec, "meta")
    with torch.no_grad():
        flops = common.count_flops(lambda: meta_forward(*make_inputs(spec, "meta")))
    del meta_model, meta_forward

    x, t, context, fps = make_inputs(spec, device)
    common.warm_libraries(device, DTYPES[spec["dtype"]])
    base = common.baseline_bytes(device)
    start = time.perf_counter()
    model, forward = build_model(spec, device)
    build_s = time.perf_counter() - start
    weights = common.tensor_bytes(model)
    if spec.get("split_cfg"):
        def step():
            with torch.inference_mode():
                halves = [forward(*(v[i:i + 1] for v in (x, t, context, fps))) for i in range(x.shape[0])]
                return torch.cat(halves)
    else:
        def step():
            with torch.inference_mode():
                return forward(x, t, context, fps)

    with common.peak_meter(device) as meter:
        timing = common.time_runs(step, spec["runs"], spec["warmup"], device)
    out = step()
    torch.save(out.float().cpu(), spec["save"])
    peak = meter.peak - base
    return {
        "flops": flops, "tflops_per_s": flops / timing["min_s"] / 1e12, **timing,
        "build_s": build_s, "weights_bytes": weights, "peak_bytes": peak,
        "peak_over_weights": peak / weights, "memory_method": meter.method, "baseline_bytes": base,
            "baseline_method": common.BASELINE_METHOD,
    }


def ab_worker(spec: dict) -> dict:
    """Official fp32, ours fp32 and ours bf16 in ONE process, called in turn for `rounds` rounds, so
    that load from other work on the machine hits all of them alike. Weights kept as views of the
    checkpoint file (all of the official model's, our fp32 Linear weights) share its pages."""
    device = spec["device"]
    common.import_official(spec["official"])
    runs = {}
    for impl, dtype in (("official", "fp32"), ("ours", "fp32"), ("ours", "bf16")):
        model_spec = {**spec, "impl": impl, "dtype": dtype}
        _, forward = build_model(model_spec, device)
        inputs = make_inputs(model_spec, device)
        runs[f"{impl} {dtype}"] = lambda f=forward, a=inputs: f(*a)
    with torch.inference_mode():
        return common.interleave(runs, spec["rounds"], device)


def configurations(args) -> list[dict]:
    cuda = args.device.startswith("cuda")
    sizes = [(16, 40, 64), (16, 72, 128)] if cuda else [(8, 16, 16)]
    if args.size:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.size]
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    runs = args.runs or (10 if cuda else 3)
    tmp = Path(tempfile.mkdtemp(prefix="vc_bench_unet_"))
    checkpoint = str(common.random_checkpoint(args.cache)["safetensors"])
    specs = []
    for frames, height, width in sizes:
        base = {"checkpoint": checkpoint, "device": args.device, "threads": args.threads, "runs": runs, "warmup": args.warmup,
                "batch": 2, "frames": frames, "height": height, "width": width}
        if args.official:
            specs.append({**base, "impl": "official", "dtype": "fp32", "official": args.official})
        for dtype in dtypes:
            specs.append({**base, "impl": "ours", "dtype": dtype})
        if args.split_cfg:
            specs.append({**base, "impl": "ours", "dtype": dtypes[0], "split_cfg": True})
        if args.compile:
            specs.append({**base, "impl": "ours", "dtype": dtypes[-1], "compile": True})
    for n, spec in enumerate(specs):
        spec["save"] = str(tmp / f"out{n}.pt")
    return specs


def label(r: dict) -> str:
    extra = "".join(f" +{k}" for k in ("split_cfg", "compile") if r.get(k))
    return f"{r['impl']} {r['dtype']}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    parser.add_argument("--size", action="append", help="FRAMESxHxW latent size (repeatable)")
    parser.add_argument("--split-cfg", action="store_true", help="add a row with cond/uncond as two calls")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                        help="with --official: also time official fp32 / ours fp32 / ours bf16 in turn in one process")
    args = parser.parse_args()

    specs = configurations(args)
    ab = None
    if args.ab and args.official:
        first = specs[0]
        ab = common.run_worker(__file__, {k: first[k] for k in ("checkpoint", "device", "threads", "batch", "frames",
                                                                "height", "width")}
                               | {"ab": True, "rounds": args.ab, "official": args.official, "impl": "ab", "dtype": "-"})
    results = [common.run_worker(__file__, spec) for spec in specs]
    comps = common.comparisons(results, label)
    result = {"benchmark": "unet", "model": "VideoCrafter2 U-Net (random weights)", "command": " ".join(sys.argv),
              "machine": common.machine_info(args.device), "results": results, "comparisons": comps}
    if ab is not None:
        result["interleaved"] = ab
    rows = [{**r, "run": label(r), "cpu_min_s": min(r.get("cpu_s") or [0]), "size": f"{r['batch']}x{r['frames']}x{r['height']}x{r['width']}",
             "peak_gib": r.get("peak_bytes", 0) / GiB, "weights_gib": r.get("weights_bytes", 0) / GiB} for r in results]
    text = common.table(rows, [("run", "run"), ("size", "BxTxhxw"), ("min_s", "min s"), ("median_s", "median s"),
                               ("cpu_min_s", "min CPU s"), ("tflops_per_s", "TFLOP/s"), ("weights_gib", "weights GiB"),
                               ("peak_gib", "peak-base GiB"), ("peak_over_weights", "peak/weights")])
    if comps:
        text += "\n\n" + common.table(comps, common.COMPARISON_COLUMNS)
    if ab is not None and "ab" in ab:
        text += "\n\n" + common.interleaved_table(ab, args.ab)
    elif ab is not None:
        results.append(ab)
    text += common.error_lines(results, label)
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    common.run(main, worker)
