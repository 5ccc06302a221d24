"""Full generation: text encode, DDIM with classifier-free guidance, VAE decode; random weights.

    python -m benchmarks.bench_generate [--model tiny|vc2|vc1_1024] [--steps 50] [--official /work/official]

CPU default: the tiny model (`vc_model.tiny_config()`, every block type, a few MB) at its native
64x128, 4 frames, 50 steps, cfg 12, eta 1, fp32 and bf16: a check that the whole flow runs and what
the sampler costs around the model calls. CUDA default: VideoCrafter2 at 320x512 and VideoCrafter1
1024 at 576x1024, 16 frames, 50 steps, bf16 and fp16. `--model vc2` on the CPU with a small size
and few steps (e.g. --frames 8 --height 128 --width 128 --steps 5) runs the full-width model. The time is split into text encoder, U-Net,
VAE decode and the rest (sampler arithmetic, noise), timed by wrapping each part's forward.

With --official (tiny model only: the official model is built whole in fp32 with its own init, which
at full size needs about twice the weights in RAM) the official LatentDiffusion runs the official
inference flow (`get_learned_conditioning`, `batch_ddim_sampling`: two U-Net calls per step,
decode frame by frame) with the same weights. It needs omegaconf importable, e.g. installed with
`pip install --target DIR omegaconf==2.1.1` and passed as --official-deps DIR. Run-time deviations,
as in the official fixture harness: the DDIMSampler's buffers stay on the CPU (it forces .to("cuda")),
the tiny open_clip text config is registered under a new name, and `decord` is stubbed (unused).
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

PROMPT = "a corgi running on the beach at sunset"
TINY_ARCH = "vc-bench-tiny-text"


def model_config(name: str):
    from vc_model.config import RELEASES, tiny_config

    return tiny_config() if name == "tiny" else RELEASES[{"vc2": "vc2_t2v_512", "vc1_1024": "vc1_t2v_1024"}[name]]


def official_params(cfg) -> dict:
    """The official `model.params` block (as in configs/inference_t2v_*.yaml) describing `cfg`."""
    u, v, s = cfg.unet, cfg.vae, cfg.schedule
    downscale = v.downscale
    return {
        "linear_start": s.linear_start, "linear_end": s.linear_end, "num_timesteps_cond": 1,
        "timesteps": s.timesteps, "first_stage_key": "video", "cond_stage_key": "caption",
        "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "image_size": [cfg.height // downscale, cfg.width // downscale], "channels": u.in_channels,
        "scale_by_std": False, "scale_factor": v.scale_factor, "use_ema": False, "uncond_type": "empty_seq",
        "use_scale": s.use_scale, "scale_b": s.scale_b, "fix_scale_bug": s.fix_scale_bug,
        "unet_config": {"target": "lvdm.modules.networks.openaimodel3d.UNetModel", "params": {
            "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
            "channel_mult": list(u.channel_mult), "num_head_channels": u.num_head_channels,
            "transformer_depth": u.transformer_depth, "context_dim": u.context_dim, "use_linear": True,
            "use_checkpoint": False, "temporal_conv": u.temporal_conv, "temporal_attention": True,
            "temporal_selfatt_only": True, "use_relative_position": u.relative_position,
            "use_causal_attention": False, "temporal_length": u.temporal_length,
            "addition_attention": u.init_attn, "fps_cond": u.fps_cond}},
        "first_stage_config": {"target": "lvdm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": v.embed_dim, "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {"double_z": v.double_z, "z_channels": v.z_channels, "resolution": v.resolution,
                         "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult),
                         "num_res_blocks": v.num_res_blocks, "attn_resolutions": list(v.attn_resolutions),
                         "dropout": 0.0}}},
        "cond_stage_config": {"target": "lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate", "arch": TINY_ARCH, "device": "cpu"}},
    }


def prepare_official(spec: dict, cfg) -> None:
    """Make the official code importable (see the module docstring for the run-time deviations)."""
    if spec.get("official_deps"):
        sys.path.insert(0, spec["official_deps"])
    common.import_official(spec["official"])
    stubs = Path(tempfile.mkdtemp(prefix="vc_bench_stubs_"))
    (stubs / "decord.py").write_text("VideoReader = cpu = None\n")
    sys.path.insert(0, str(stubs))
    import open_clip

    t = cfg.text_encoder
    open_clip.factory._MODEL_CONFIGS[TINY_ARCH] = {
        "embed_dim": t.embed_dim,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers}}
    from lvdm.models.samplers.ddim import DDIMSampler

    DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)
    import lvdm.models.ddpm3d  # noqa: F401  (imports counted in the baseline)
    import scripts.evaluation.funcs  # noqa: F401


def official_model(cfg):
    """The official LatentDiffusion for `cfg`, with the random weights loaded."""
    from lvdm.models.ddpm3d import LatentDiffusion
    from omegaconf import OmegaConf

    import vc_model

    model = LatentDiffusion(**OmegaConf.create(official_params(cfg)))
    state = vc_model.random_state_dict(cfg, seed=0)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def run_official(spec: dict, cfg):
    from scripts.evaluation.funcs import batch_ddim_sampling

    model = official_model(cfg)
    frames, height, width = spec["frames"], spec["height"], spec["width"]
    downscale = cfg.vae.downscale

    def generate():
        with torch.no_grad():
            text = model.get_learned_conditioning([PROMPT])
            fps = torch.tensor([cfg.fps]).long()
            cond = {"c_crossattn": [text], "fps": fps}
            shape = [1, cfg.unet.in_channels, frames, height // downscale, width // downscale]
            return batch_ddim_sampling(model, cond, shape, 1, spec["steps"], 1.0, spec["cfg"])[:, 0]
    parts = {"text_encoder": model.cond_stage_model, "unet": model.model.diffusion_model,
             "vae_decode": model.first_stage_model.decoder}
    return model, generate, parts


def run_ours(spec: dict, cfg):
    import vc_model

    dtype = DTYPES[spec["dtype"]]
    if spec.get("checkpoint"):  # the cached full-size random checkpoint, loaded lazily
        bundle = vc_model.load(spec["checkpoint"], dtype=dtype, device=spec["device"], config=cfg)
    else:
        bundle = vc_model.build(vc_model.random_state_dict(cfg, seed=0), config=cfg, dtype=dtype, device=spec["device"])

    def generate():
        return vc_model.generate(bundle, PROMPT, height=spec["height"], width=spec["width"], frames=spec["frames"],
                                 steps=spec["steps"], cfg=spec["cfg"], seed=0)
    parts = {"text_encoder": bundle.text_encoder, "unet": bundle.unet, "vae_decode": bundle.vae.decoder}
    return bundle, generate, parts


def worker(spec: dict) -> dict:
    device = spec["device"]
    cfg = model_config(spec["model"])
    if spec["impl"] == "official":
        prepare_official(spec, cfg)
    import vc_model  # noqa: F401  (imports counted in the baseline)

    common.warm_libraries(device, DTYPES[spec["dtype"]])
    base = common.baseline_bytes(device)
    start = time.perf_counter()
    owner, generate, parts = (run_official if spec["impl"] == "official" else run_ours)(spec, cfg)
    build_s = time.perf_counter() - start
    # Every weight held (the VAE encoder included; the official model's schedule buffers too).
    weights = (common.tensor_bytes(owner) if isinstance(owner, torch.nn.Module)
               else sum(common.tensor_bytes(m) for m in owner.modules().values()))

    spent = {name: 0.0 for name in parts}
    calls = {name: 0 for name in parts}

    def timed(name, module):
        forward = module.forward

        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            out = forward(*args, **kwargs)
            common.sync(device)
            spent[name] += time.perf_counter() - begin
            calls[name] += 1
            return out
        module.forward = wrapper
    for name, module in parts.items():
        timed(name, module)

    runs = []
    with common.peak_meter(device) as meter:
        for n in range(spec["warmup"] + spec["runs"]):
            for name in spent:
                spent[name], calls[name] = 0.0, 0
            begin = time.perf_counter()
            video = generate()
            common.sync(device)
            total = time.perf_counter() - begin
            if n >= spec["warmup"]:
                runs.append({"total_s": total, **{f"{k}_s": v for k, v in spent.items()},
                             "other_s": total - sum(spent.values()), "calls": dict(calls)})
    best = min(runs, key=lambda r: r["total_s"])
    torch.save(video.float().cpu(), spec["save"])
    peak = meter.peak - base
    return {**best, "median_total_s": sorted(r["total_s"] for r in runs)[len(runs) // 2], "runs": runs,
            "build_s": build_s, "weights_bytes": weights, "peak_bytes": peak, "peak_over_weights": peak / weights,
            "memory_method": meter.method, "baseline_method": common.BASELINE_METHOD,
            "video_shape": list(video.shape)}


def configurations(args) -> list[dict]:
    cuda = args.device.startswith("cuda")
    models = [args.model] if args.model else (["vc2", "vc1_1024"] if cuda else ["tiny"])
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16", "fp16"] if cuda else ["fp32", "bf16"])
    tmp = Path(tempfile.mkdtemp(prefix="vc_bench_generate_"))
    specs = []
    for name in models:
        cfg = model_config(name)
        base = {"model": name, "device": args.device, "threads": args.threads, "runs": args.runs or 3,
                "warmup": args.warmup, "steps": args.steps, "cfg": 12.0, "frames": args.frames or cfg.frames,
                "height": args.height or cfg.height, "width": args.width or cfg.width}
        if name == "vc2":
            base["checkpoint"] = str(common.random_checkpoint(args.cache)["safetensors"])
        if args.official and name == "tiny":
            specs.append({**base, "impl": "official", "dtype": "fp32", "official": args.official,
                          "official_deps": args.official_deps})
        for dtype in dtypes:
            specs.append({**base, "impl": "ours", "dtype": dtype})
    for n, spec in enumerate(specs):
        spec["save"] = str(tmp / f"video{n}.pt")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--model", choices=["tiny", "vc2", "vc1_1024"], default=None)
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--official-deps", default=None, help="folder holding omegaconf for the official code")
    args = parser.parse_args()

    results = [common.run_worker(__file__, spec) for spec in configurations(args)]
    result = {"benchmark": "generate", "command": " ".join(sys.argv), "machine": common.machine_info(args.device),
              "results": results}
    rows = [{**r, "run": f"{r['impl']} {r['dtype']}", "what": f"{r['model']} {r['frames']}x{r['height']}x{r['width']}",
             "unet_calls": (r.get("calls") or {}).get("unet"), "peak_gib": r.get("peak_bytes", 0) / GiB}
            for r in results]
    text = common.table(rows, [("run", "run"), ("what", "model TxHxW"), ("steps", "steps"),
                               ("total_s", "total s"), ("text_encoder_s", "text s"), ("unet_s", "U-Net s"),
                               ("unet_calls", "U-Net calls"), ("vae_decode_s", "decode s"), ("other_s", "other s"),
                               ("peak_gib", "peak-base GiB"), ("peak_over_weights", "peak/weights")])
    text += common.error_lines(results, lambda r: f"{r['impl']} {r['dtype']}")
    common.emit(result, text, args.json_out)


if __name__ == "__main__":
    common.run(main, worker)
