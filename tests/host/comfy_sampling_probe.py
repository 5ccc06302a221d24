"""Run the pack's shipped sampling classes with ComfyUI's own sampler code; write the numbers as JSON.

Started by tests/host/test_model_sampling.py as `python comfy_sampling_probe.py <out.json> <folder>` in
ComfyUI's Python, with COMFYUI_PATH, the repository root and tests/ on PYTHONPATH (a separate process,
so the pytest process never imports ComfyUI). The pack is imported the way ComfyUI imports it; each
model is built by the pack's loader from a tiny random checkpoint and compared with
`vc_model.sample_ddim`, the official DDIM, run on the same weights and noise. Values are model-space
latents (ComfyUI's LATENT times the latent scale).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import comfy.cli_args

if not torch.cuda.is_available():  # what `main.py --cpu` sets, before model management starts
    comfy.cli_args.args.cpu = True

import comfy.sample  # noqa: E402

import vc_model  # noqa: E402
from pack_import import pack_module  # noqa: E402  (tests/pack_import.py)
from vc_model.config import tiny_config  # noqa: E402

CONFIGS = {"vc2": tiny_config(), "vc1": tiny_config(v1=True), "i2v": tiny_config(i2v=True)}
SHAPE = (1, 4, 4, 8, 16)  # [B, 4, frames, h, w]
PROMPT = "a corgi running on the beach"

model_mod, loader, sampler, sigmas_mod = (pack_module(f"nodes.{n}") for n in ("model", "loader", "sampler", "sigmas"))


def difference(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    return {"max_diff": float((actual.float() - expected.float()).abs().max()), "max_ref": float(expected.abs().max())}


def conditioning(bundle, name):
    """(positive, negative, reference image kwargs) as VideoCrafter Conditioning / Image Encode make them."""
    positive = [[bundle.text_encoder([PROMPT]), {model_mod.FPS_KEY: bundle.config.fps}]]
    negative = [[bundle.text_encoder([""]), {model_mod.FPS_KEY: bundle.config.fps}]]
    extra = {}
    if name == "i2v":
        image = torch.rand(1, 3, 72, 120, generator=torch.Generator().manual_seed(2)) * 2 - 1
        tokens, grey = bundle.image_encoder.clip(image), bundle.image_encoder.clip(torch.zeros(1, 3, 224, 224))
        positive[0][1][model_mod.IMAGE_KEY], negative[0][1][model_mod.IMAGE_KEY] = tokens, grey
        extra = dict(image_context=bundle.image_encoder.resampler(tokens),
                     uncond_image_context=bundle.image_encoder.resampler(grey))
    return positive, negative, extra


def official(bundle, noise, extra, steps, eta, seed=0):
    """(final x, last pred_x0) of the official DDIM in model space."""
    last = {}
    final = vc_model.sample_ddim(bundle.unet, bundle.schedule, noise.clone(), bundle.text_encoder([PROMPT]),
                                 bundle.text_encoder([""]), fps=bundle.config.fps, steps=steps, cfg=7.5, eta=eta,
                                 generator=torch.Generator().manual_seed(seed),
                                 callback=lambda i, n, x, x0: last.update(x0=x0), **extra)
    return final, last["x0"]


def schedule_checks(patcher, bundle) -> dict:
    """The ModelSampling object ComfyUI samples with, against the official schedule."""
    sampling = patcher.get_model_object("model_sampling")
    table, scales = sigmas_mod.sigma_tables(bundle.schedule.alphas_cumprod, bundle.schedule.scale_arr)
    sig = sigmas_mod.official_ddim_sigmas(sampling.log_sigmas.cpu(), 50)
    t = torch.tensor([981, 401, 1])
    g = torch.Generator().manual_seed(3)
    x0, eps, noise = (torch.randn(3, *SHAPE[1:], generator=g) for _ in range(3))
    a = bundle.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    s = (bundle.schedule.scale_arr[t] if bundle.schedule.scale_arr is not None else torch.ones(3)).view(-1, 1, 1, 1, 1)
    x_in = sampling.calculate_input(sampling.sigmas[t], x0 + sampling.sigmas[t].view(-1, 1, 1, 1, 1) * eps)
    start = sampling.noise_scaling(sig[:1], noise.clone(), torch.zeros_like(noise))
    return {
        "class": type(sampling).__name__,
        "is_shipped_class": isinstance(sampling, model_mod.ModelSamplingVideoCrafter),
        "tables_equal": bool(torch.equal(sampling.sigmas.cpu(), table) and torch.equal(sampling.signal_scales.cpu(), scales)),
        "timesteps": sampling.timestep(sig[:-1]).tolist(),
        "official_timesteps": vc_model.ddim_timesteps(50)[::-1],
        "model_input": difference(x_in, a.sqrt() * s * x0 + (1 - a).sqrt() * eps),  # sqrt(a_t) s_t x0 + sqrt(1-a_t) eps
        "pure_noise_start": difference(sampling.calculate_input(sig[:1], start), noise),  # x_T = the noise itself
    }


def main(out_path: str, folder: str) -> None:
    results = {"schedule": {}, "ksampler": {}, "videocrafter_sampler": {}}
    with torch.no_grad():
        for name, config in CONFIGS.items():
            path = Path(folder) / f"{name}.safetensors"
            patcher = loader.load_checkpoint(str(path), "fp32")[0]
            bundle = vc_model.build(vc_model.load_state_dict(str(path)), config)
            scale = bundle.config.vae.scale_factor  # LATENTs are model space / scale factor
            positive, negative, extra = conditioning(bundle, name)
            results["schedule"][name] = schedule_checks(patcher, bundle)
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
            _, x0 = official(bundle, noise, extra, steps=4, eta=0.0)
            for core in ("ddim", "euler"):  # core KSampler + ddim_uniform = official DDIM at eta 0 (last pred_x0)
                latent = comfy.sample.sample(patcher, noise, 4, 7.5, core, "ddim_uniform", positive, negative,
                                             torch.zeros(SHAPE), disable_pbar=True, seed=1)
                results["ksampler"][f"{name}-{core}"] = difference(latent * scale, x0)
            result = sampler.sample(patcher, positive, negative, {"samples": torch.zeros(SHAPE)}, seed=9, steps=3,
                                    cfg=7.5, eta=1.0)
            seeded = comfy.sample.prepare_noise(torch.zeros(SHAPE), 9)  # the noise VideoCrafter Sampler starts from
            final, _ = official(bundle, seeded, extra, steps=3, eta=1.0, seed=9)
            results["videocrafter_sampler"][name] = difference(result["samples"] * scale, final)
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
