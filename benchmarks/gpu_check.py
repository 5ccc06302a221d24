"""Every GPU figure of the pack in one run, inside ComfyUI's Python (run it through gpu_check.sh).

    COMFYUI_PATH=/path/to/ComfyUI benchmarks/gpu_check.sh [--dry-run] [--out gpu_check.json] [--steps 50]

Rows (random full-size weights unless --ckpt-vc2 / --ckpt-1024 name real checkpoints):
  e2e      VideoCrafter2 320x512x16, 50 DDIM steps, cfg 12, eta 1 (VideoCrafter Sampler's path:
           text encode + ComfyUI sampling + VAE decode), weight_dtype fp16, bf16, fp8_e4m3fn,
           fp8_e4m3fn_fast: seconds and peak GPU memory (torch.cuda.max_memory_allocated), and the
           same for VideoCrafter1 576x1024x16 in bf16 (targets: 5 s, 12 s and 10 GB on an H100).
  partial  VideoCrafter2 U-Net with fp32 weights loaded by ModelPatcher.load with a 4 GiB budget:
           seconds per cond+uncond step at 320x512x16 against a full load, peak memory, and the
           largest difference of the outputs.
  long     VideoCrafter2 320x512x64 in bf16 with VideoCrafter Long Video (FreeNoise, window 16, stride 4),
           50 DDIM steps: seconds and peak against the 16-frame bf16 e2e row (issue 10).
  turbo    VideoCrafter2 320x512x16 in bf16 with a random T2V-Turbo v1 LoRA (official layout, rank 64)
           through Apply VideoCrafter T2V-Turbo and the Turbo Sampler at 4 steps: seconds and peak
           against the 50-step e2e row (issue 11).
  sdpa     attention with a batch above 2**15 rows (the temporal attention of two 576x1024 videos
           with cond + uncond: 4*72*128 = 36,864 rows): vc_model's sdpa_attention and ComfyUI's
           optimized_attention against a sliced reference; seconds.
--dry-run: the same rows on the CPU with the tiny random models, tiny sizes, 2 steps and a 30%
budget, in seconds; it checks the script, not the numbers. Writes one JSON (--out) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {("vc2_t2v_512", "fp16"): (5.0, None), ("vc2_t2v_512", "bf16"): (5.0, None),
           ("vc1_t2v_1024", "bf16"): (12.0, 10.0)}  # (seconds, GiB) on an H100-class GPU
GiB = 2 ** 30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; dry run 2)")
    parser.add_argument("--ckpt-vc2", default=None, help="a real VideoCrafter2 checkpoint instead of random weights")
    parser.add_argument("--ckpt-1024", default=None, help="a real VideoCrafter1 T2V 1024 checkpoint")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="partial-load budget (GPU run)")
    args = parser.parse_args()
    sys.argv = [sys.argv[0]] + (["--cpu"] if args.dry_run else [])  # ComfyUI's own argument parser
    return args


ARGS = parse_args()
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.ldm.modules.attention  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402

from pack_import import pack_module  # noqa: E402

vcm = pack_module("vc_model")
loader = pack_module("nodes.loader")
conditioning = pack_module("nodes.conditioning")
sampler = pack_module("nodes.sampler")
vae_io = pack_module("nodes.vae_io")
long_video = pack_module("nodes.long_video")
turbo = pack_module("nodes.turbo")
vc_turbo = pack_module("vc_model.turbo")
attention = pack_module("vc_model.attention")
RELEASES = pack_module("vc_model.config").RELEASES
DEVICE = mm.get_torch_device()
CUDA = DEVICE.type == "cuda"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / GiB if CUDA else None


def state_dict(release: str, path: str | None):
    if path:
        weights = vcm.load_state_dict(path)
        return weights, vcm.detect_config(weights)
    config = vcm.tiny_config(v1=release.startswith("vc1")) if ARGS.dry_run else RELEASES[release]
    return vcm.random_state_dict(config, seed=0), config


def free():
    mm.unload_all_models()
    mm.soft_empty_cache()


def end_to_end(release: str, weights, config, weight_dtype: str, size, steps: int, row_name: str = "e2e",
               patch=None, sample=None) -> dict:
    """Text encode + VideoCrafter Sampler + VideoCrafter Decode, timed after a 1-step warm-up.
    patch(MODEL) -> MODEL: a node's patch (Long Video, Apply T2V-Turbo); sample(MODEL, positive, negative,
    latent, steps) -> LATENT: another sampler (default VideoCrafter Sampler, cfg 12, eta 1)."""
    width, height, frames = size
    patcher, clip, vae, _, _ = loader.build_models(weights, config, weight_dtype)
    model = patch(patcher) if patch else patcher
    sample = sample or (lambda m, pos, neg, latent, n: sampler.sample(m, pos, neg, latent, seed=123, steps=n,
                                                                       cfg=12.0, eta=1.0))

    def run(n_steps: int):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a corgi running on the beach"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        positive, negative, latent = conditioning.video_conditioning(positive, negative, width, height, frames, 0, 1,
                                                                     model)
        out = sample(model, positive, negative, latent, n_steps)
        return vae_io.decode(vae, out["samples"], frames)

    run(1)
    sync()
    reset_peak()
    start = time.perf_counter()
    images = run(steps)
    sync()
    seconds = time.perf_counter() - start
    row = {"row": row_name, "model": release, "weight_dtype": weight_dtype, "size": f"{width}x{height}x{frames}",
           "steps": steps, "seconds": seconds, "peak_gib": peak_gib(), "frames_out": int(images.shape[0]),
           "finite": bool(torch.isfinite(images).all()),
           "compute_dtype": str(patcher.model.manual_cast_dtype or patcher.model.get_dtype()).removeprefix("torch.")}
    target = TARGETS.get((release, weight_dtype)) if row_name == "e2e" else None
    if target and CUDA:
        row["target_s"], row["target_gib"] = target
    del patcher, clip, vae, model
    free()
    return row


def long_video_row(weights, config, size, steps: int) -> dict:
    """The e2e row at 4x the frames with VideoCrafter Long Video (FreeNoise 16 / 4) on the MODEL."""
    width, height, frames = size
    window, stride = (16, 4) if not ARGS.dry_run else (2, 1)
    return end_to_end("vc2_t2v_512", weights, config, "bf16", (width, height, 4 * frames), steps, "long",
                      patch=lambda m: long_video.long_video_model(m, window, stride, True))


def turbo_row(weights, config, size) -> dict:
    """The e2e row with a random T2V-Turbo v1 LoRA in the official layout, Turbo Sampler at 4 steps."""
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_turbo_"))
    rank = 4 if ARGS.dry_run else 64
    torch.save(vc_turbo.random_turbo_lora(config.unet, rank=rank, seed=0), folder / "unet_lora.pt")
    folder_paths.add_model_folder_path("loras", str(folder))
    return end_to_end("vc2_t2v_512", weights, config, "bf16", size, 4, "turbo",
                      patch=lambda m: turbo.apply(m, "unet_lora.pt", 7.5, 0.0, 0.5),
                      sample=lambda m, pos, neg, latent, n: turbo.sample(m, pos, latent, 123, n))


def partial_load(weights, config, size, budget: int | None) -> dict:
    """U-Net steps (cond + uncond batch) fully loaded, then partially loaded with `budget` bytes."""
    width, height, frames = size
    patcher, _, _, _, _ = loader.build_models(weights, config, "fp32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, frames, height // 8, width // 8, generator=g).to(DEVICE)
    context = torch.randn(2, 77, config.unet.context_dim, generator=g).to(DEVICE)
    sigma = torch.tensor([2.5, 2.5], device=DEVICE)
    budget = budget or int(0.3 * patcher.model_size())
    n = 3 if ARGS.dry_run else 5

    def steps():
        with torch.no_grad():
            out = patcher.model.apply_model(x, sigma, c_crossattn=context)  # warm-up, then timed
            sync()
            start = time.perf_counter()
            for _ in range(n):
                out = patcher.model.apply_model(x, sigma, c_crossattn=context)
            sync()
            return out.float().cpu(), (time.perf_counter() - start) / n

    patcher.load(DEVICE, lowvram_model_memory=0, full_load=True)
    full, full_s = steps()
    patcher.unpatch_model(patcher.offload_device)
    reset_peak()
    patcher.load(DEVICE, lowvram_model_memory=budget)
    part, part_s = steps()
    row = {"row": "partial", "model": config.name, "weight_dtype": "fp32", "size": f"{width}x{height}x{frames}",
           "budget_gib": budget / GiB, "weights_gib": patcher.model_size() / GiB,
           "loaded_gib": patcher.model.model_loaded_weight_memory / GiB, "lowvram": bool(patcher.model.model_lowvram),
           "seconds": part_s, "full_load_seconds": full_s, "peak_gib": peak_gib(),
           "max_diff": float((part - full).abs().max()), "max_ref": float(full.abs().max())}
    patcher.unpatch_model(patcher.offload_device)
    del patcher
    free()
    return row


def big_batch_attention() -> dict:
    """Attention over more than 2**15 batch rows: ours and ComfyUI's against a sliced reference."""
    dtype = torch.float16 if CUDA else torch.float32
    batch, tokens, heads, dim = (4 * 72 * 128, 16, 5, 64) if CUDA else (40, 16, 2, 8)  # 2 videos, cond + uncond
    limit = attention.SDPA_BATCH_LIMIT if CUDA else 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads * dim, generator=g).to(DEVICE, dtype) for _ in range(3))
    ref = torch.cat([attention.sdpa_attention(q[i:i + limit], k[i:i + limit], v[i:i + limit], heads)
                     for i in range(0, batch, limit)])
    row = {"row": "sdpa", "batch": batch, "limit": limit, "dtype": str(dtype).removeprefix("torch.")}
    saved = attention.SDPA_BATCH_LIMIT, attention.SLICED_DEVICES
    attention.SDPA_BATCH_LIMIT, attention.SLICED_DEVICES = limit, (DEVICE.type,)
    try:
        for name, fn in (("vc_model", attention.sdpa_attention),
                         ("comfy", comfy.ldm.modules.attention.optimized_attention)):
            sync()
            start = time.perf_counter()
            out = fn(q, k, v, heads, transformer_options={})
            sync()
            row[f"{name}_seconds"] = time.perf_counter() - start
            row[f"{name}_max_diff"] = float((out.float() - ref.float()).abs().max())
    finally:
        attention.SDPA_BATCH_LIMIT, attention.SLICED_DEVICES = saved
    return row


def table(rows: list[dict]) -> str:
    columns = ["row", "model", "weight_dtype", "size", "steps", "seconds", "peak_gib", "target_s", "target_gib",
               "budget_gib", "loaded_gib", "full_load_seconds", "max_diff", "batch", "vc_model_seconds",
               "comfy_seconds", "vc_model_max_diff", "comfy_max_diff"]
    columns = [c for c in columns if any(c in r for r in rows)]
    cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    started = time.perf_counter()
    steps = ARGS.steps or (2 if ARGS.dry_run else 50)
    small, large = ((128, 64, 4), (128, 64, 4)) if ARGS.dry_run else ((512, 320, 16), (1024, 576, 16))
    rows = []
    weights, config = state_dict("vc2_t2v_512", ARGS.ckpt_vc2)
    for weight_dtype in ("fp16", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast"):
        rows.append(end_to_end("vc2_t2v_512", weights, config, weight_dtype, small, steps))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(partial_load(weights, config, small, None if ARGS.dry_run else int(ARGS.budget_gib * GiB)))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(long_video_row(weights, config, small, steps))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(turbo_row(weights, config, small))
    print(json.dumps(rows[-1]), flush=True)
    del weights
    weights, config = state_dict("vc1_t2v_1024", ARGS.ckpt_1024)
    rows.append(end_to_end("vc1_t2v_1024", weights, config, "bf16", large, steps))
    print(json.dumps(rows[-1]), flush=True)
    del weights
    rows.append(big_batch_attention())
    result = {"check": "gpu", "dry_run": ARGS.dry_run, "device": str(DEVICE),
              "device_name": torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
              "torch": torch.__version__, "seconds_total": time.perf_counter() - started, "rows": rows}
    with open(ARGS.out, "w") as file:
        json.dump(result, file, indent=1)
    text = table(rows)
    with open(ARGS.out.removesuffix(".json") + ".txt", "w") as file:
        file.write(text + "\n")
    print(text)
    print(f"\n{result['device_name']}, {result['seconds_total']:.0f} s; JSON: {ARGS.out}")


if __name__ == "__main__":
    main()
