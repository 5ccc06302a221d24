"""VAE decode of a latent video with random VideoCrafter2 weights: time, FLOP/s, peak memory.

    python -m benchmarks.bench_vae [--official /work/official] [--dtypes fp32,bf16] [--chunk 0 --chunk 1]

CPU default: 8 frames of a 16x16 latent (128x128 pixels). CUDA default: 16 frames at 40x64 and
72x128 latents (320x512 and 576x1024 pixels). `--chunk N` adds rows decoding N frames at a time
(0: our default chunking). With --official the official AutoencoderKL decodes the same latent with
the same weights the way its `decode_first_stage` does (all frames of the video in one batch).
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

PREFIX = "first_stage_model."


def vae_only_config():
    from vc_model.config import VC2_T2V_512

    return VC2_T2V_512.replace(unet=None, text_encoder=None)


def official_vae(official: str, device: str = "cpu"):
    """The official AutoencoderKL for the VC2 config."""
    import yaml

    common.import_official(official)
    from lvdm.models.autoencoder import AutoencoderKL

    path = Path(official) / "configs" / "inference_t2v_512_v2.0.yaml"
    params = yaml.safe_load(path.read_text())["model"]["params"]["first_stage_config"]["params"]
    with torch.device(device):
        return AutoencoderKL(**params)


def build_model(spec: dict, device: str):
    """(model, decode(latent [B,4,T,h,w] scaled) -> video [B,3,T,H,W]) on `device` ("meta": shapes only)."""
    from einops import rearrange

    dtype = DTYPES[spec["dtype"]]
    scale = vae_only_config().vae.scale_factor
    if spec["impl"] == "official":
        model = official_vae(spec["official"], "meta")
        if device != "meta":
            weights = {k[len(PREFIX):]: v for k, v in common.component_weights(spec["checkpoint"], PREFIX).items()}
            model.load_state_dict(weights, strict=True, assign=True)
            del weights
            model = model.to(device=device, dtype=dtype)
        model.eval().requires_grad_(False)

        def decode(z):  # what the official decode_first_stage does for a 2D autoencoder
            b = z.shape[0]
            frames = model.decode(rearrange(z, "b c t h w -> (b t) c h w") / scale)
            return rearrange(frames, "(b t) c h w -> b c t h w", b=b)
        return model, decode
    import vc_model
    from vc_model.vae import VideoVAE

    if device == "meta":
        with torch.device("meta"):
            model = VideoVAE(vae_only_config().vae)
    else:
        weights = common.component_weights(spec["checkpoint"], PREFIX)
        model = vc_model.build(weights, config=vae_only_config(), dtype=dtype, device=device).vae
    chunk = spec.get("chunk") or None
    return model, lambda z: model.decode(z, frames_per_chunk=chunk)


def make_latent(spec: dict, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, spec["frames"], spec["height"], spec["width"], generator=g).to(device)


def ab_worker(spec: dict) -> dict:
    """Official fp32, ours fp32 and ours bf16 decoding in turn in ONE process (see common.interleave)."""
    device = spec["device"]
    common.import_official(spec["official"])
    z = make_latent(spec, device)
    decoders = {f"{impl} {dtype}": build_model({**spec, "impl": impl, "dtype": dtype}, device)[1]
                for impl, dtype in (("official", "fp32"), ("ours", "fp32"), ("ours", "bf16"))}
    with torch.inference_mode():
        return common.interleave({name: (lambda d=decode: d(z)) for name, decode in decoders.items()},
                                 spec["rounds"], device)


def worker(spec: dict) -> dict:
    if spec.get("ab"):
        return ab_worker(spec)
    device = spec["device"]
    if spec["impl"] == "official":
        common.import_official(spec["official"])
    meta_model, meta_decode = build_model(spec, "meta")
    with torch.no_grad():
        flops = common.count_flops(lambda: meta_decode(make_latent(spec, "meta")))
    del meta_model, meta_decode

    z = make_latent(spec, device)
    common.warm_libraries(device, DTYPES[spec["dtype"]])
    base = common.baseline_bytes(device)
    start = time.perf_counter()
    model, decode = build_model(spec, device)
    build_s = time.perf_counter() - start
    weights = common.tensor_bytes(model)
    decoder_weights = common.tensor_bytes(list(model.decoder.parameters()) + list(model.post_quant_conv.parameters()))

    def step():
        with torch.inference_mode():
            return decode(z)

    with common.peak_meter(device) as meter:
        timing = common.time_runs(step, spec["runs"], spec["warmup"], device)
    torch.save(step().float().cpu(), spec["save"])
    peak = meter.peak - base
    return {"flops": flops, "tflops_per_s": flops / timing["min_s"] / 1e12, **timing, "build_s": build_s,
            "weights_bytes": weights, "decoder_weights_bytes": decoder_weights, "peak_bytes": peak,
            "peak_over_weights": peak / weights, "memory_method": meter.method, "baseline_bytes": base,
            "baseline_method": common.BASELINE_METHOD}


def label(r: dict) -> str:
    chunk = r.get("chunk")
    return f"{r['impl']} {r['dtype']}" + (f" chunk={chunk}" if chunk else "")


def configurations(args) -> list[dict]:
    cuda = args.device.startswith("cuda")
    sizes = [(16, 40, 64), (16, 72, 128)] if cuda else [(8, 16, 16)]
    if args.size:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.size]
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    chunks = [int(c) for c in args.chunk] if args.chunk else [0]
    runs = args.runs or (10 if cuda else 3)
    checkpoint = str(common.random_checkpoint(args.cache)["safetensors"])
    tmp = Path(tempfile.mkdtemp(prefix="vc_bench_vae_"))
    specs = []
    for frames, height, width in sizes:
        base = {"checkpoint": checkpoint, "device": args.device, "threads": args.threads, "runs": runs,
                "warmup": args.warmup, "frames": frames, "height": height, "width": width}
        if args.official:
            specs.append({**base, "impl": "official", "dtype": "fp32", "official": args.official})
        for dtype in dtypes:
            for chunk in chunks:
                specs.append({**base, "impl": "ours", "dtype": dtype, "chunk": chunk})
    for n, spec in enumerate(specs):
        spec["save"] = str(tmp / f"out{n}.pt")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    parser.add_argument("--size", action="append", help="FRAMESxHxW latent size (repeatable)")
    parser.add_argument("--chunk", action="append", help="frames per decode chunk, 0 = default (repeatable)")
    parser.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                        help="with --official: also time official fp32 / ours fp32 / ours bf16 in turn in one process")
    args = parser.parse_args()

    specs = configurations(args)
    ab = None
    if args.ab and args.official:
        first = specs[0]
        ab = common.run_worker(__file__, {k: first[k] for k in ("checkpoint", "device", "threads", "frames", "height",
                                                                "width")}
                               | {"ab": True, "rounds": args.ab, "official": args.official, "impl": "ab", "dtype": "-"})
    results = [common.run_worker(__file__, spec) for spec in specs]
    comps = common.comparisons(results, label)
    result = {"benchmark": "vae_decode", "model": "VideoCrafter2 VAE (random weights)", "command": " ".join(sys.argv),
              "machine": common.machine_info(args.device), "results": results, "comparisons": comps}
    if ab is not None:
        result["interleaved"] = ab
    rows = [{**r, "run": label(r), "cpu_min_s": min(r.get("cpu_s") or [0]), "size": f"{r['frames']}x{r['height']}x{r['width']}",
             "peak_gib": r.get("peak_bytes", 0) / GiB, "weights_gib": r.get("weights_bytes", 0) / GiB} for r in results]
    text = common.table(rows, [("run", "run"), ("size", "Txhxw"), ("min_s", "min s"), ("median_s", "median s"),
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
