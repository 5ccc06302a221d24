"""The shipped ComfyUI sampling classes run by ComfyUI's own sampler code, in this process (no server).

`ModelSamplingVideoCrafter` (nodes/model.py) and VideoCrafter Sampler (nodes/sampler.py) are loaded
from this repository inside ComfyUI (COMFYUI_PATH on the import path for the module's duration), the
model is built by the pack's own loader from a tiny random checkpoint, and ComfyUI's KSampler /
sample_custom results are compared with `vc_model.sample_ddim`, the official DDIM (itself checked
against golden fixtures). The host-free tests (tests/test_nodes_sampling.py) check the pure maths.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
from harness import COMFYUI_PATH, ROOT, require_comfyui, write_checkpoint

require_comfyui()

import torch  # noqa: E402

import vc_model  # noqa: E402
from vc_model.config import tiny_config  # noqa: E402

PACK = "comfyui_videocrafter_in_comfy"
CONFIGS = {"vc2": tiny_config(), "vc1": tiny_config(v1=True), "i2v": tiny_config(i2v=True)}
SHAPE = (1, 4, 4, 8, 16)  # [B, 4, frames, h, w]
PROMPT = "a corgi running on the beach"


@pytest.fixture(scope="module")
def pack():
    """The pack's node modules imported the way ComfyUI imports them, with ComfyUI importable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(COMFYUI_PATH)
        if not torch.cuda.is_available():  # what `main.py --cpu` sets, before model management starts
            importlib.import_module("comfy.cli_args").args.cpu = True
        if PACK not in sys.modules:
            spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                          submodule_search_locations=[str(ROOT)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[PACK] = module
            spec.loader.exec_module(module)
        names = ("model", "loader", "sampler", "sigmas")
        modules = {n: importlib.import_module(f"{PACK}.nodes.{n}") for n in names}
        modules["comfy_sample"] = importlib.import_module("comfy.sample")
        yield modules


@pytest.fixture(scope="module")
def loaded(pack, tmp_path_factory):
    """{name: (ModelPatcher, vc_model Bundle)} from the same tiny random checkpoint, fp32."""
    folder = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, config in CONFIGS.items():
        path = folder / f"{name}.safetensors"
        write_checkpoint(path, config, seed=5)
        patcher = pack["loader"].load_checkpoint(str(path), "fp32")[0]
        out[name] = patcher, vc_model.build(vc_model.load_state_dict(str(path)), config)
    return out


def conditioning(pack, bundle, name):
    """(positive, negative, reference image kwargs) as VideoCrafter Conditioning / Image Encode make them."""
    fps_key, image_key = pack["model"].FPS_KEY, pack["model"].IMAGE_KEY
    positive = [[bundle.text_encoder([PROMPT]), {fps_key: bundle.config.fps}]]
    negative = [[bundle.text_encoder([""]), {fps_key: bundle.config.fps}]]
    extra = {}
    if name == "i2v":
        image = torch.rand(1, 3, 72, 120, generator=torch.Generator().manual_seed(2)) * 2 - 1
        tokens, grey = bundle.image_encoder.clip(image), bundle.image_encoder.clip(torch.zeros(1, 3, 224, 224))
        positive[0][1][image_key], negative[0][1][image_key] = tokens, grey
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


def assert_close(actual, expected, rel=5e-5):
    scale, diff = float(expected.abs().max()), float((actual - expected).abs().max())
    print(f"max |diff| {diff:.3g} (max |ref| {scale:.3g}, relative {diff / scale:.3g})")
    assert diff <= rel * scale


@torch.no_grad()
@pytest.mark.parametrize("name", ["vc2", "vc1"])
def test_model_sampling_class_holds_the_official_schedule(pack, loaded, name):
    patcher, bundle = loaded[name]
    sampling = patcher.get_model_object("model_sampling")
    assert isinstance(sampling, pack["model"].ModelSamplingVideoCrafter)
    sigmas, scales = pack["sigmas"].sigma_tables(bundle.schedule.alphas_cumprod, bundle.schedule.scale_arr)
    assert torch.equal(sampling.sigmas.cpu(), sigmas) and torch.equal(sampling.signal_scales.cpu(), scales)
    # ComfyUI's timestep lookup on our table gives the official DDIM timesteps
    sig = pack["sigmas"].official_ddim_sigmas(sampling.log_sigmas.cpu(), 50)
    assert sampling.timestep(sig[:-1]).tolist() == vc_model.ddim_timesteps(50)[::-1]
    # calculate_input: y = x0 + sigma' eps -> sqrt(a_t) s_t x0 + sqrt(1 - a_t) eps
    t = torch.tensor([981, 401, 1])
    x0, eps = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    a = bundle.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    s = (bundle.schedule.scale_arr[t] if bundle.schedule.scale_arr is not None else torch.ones(3)).view(-1, 1, 1, 1, 1)
    x_in = sampling.calculate_input(sampling.sigmas[t], x0 + sampling.sigmas[t].view(-1, 1, 1, 1, 1) * eps)
    torch.testing.assert_close(x_in, a.sqrt() * s * x0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)
    # an empty latent starts from the official x_T = noise in model space
    noise = torch.randn(SHAPE)
    start = sampling.noise_scaling(sig[:1], noise.clone(), torch.zeros(SHAPE))
    torch.testing.assert_close(sampling.calculate_input(sig[:1], start), noise, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name,sampler", [("vc2", "ddim"), ("vc1", "euler"), ("i2v", "ddim")])
def test_core_ksampler_ddim_uniform_is_official_ddim_eta0(pack, loaded, name, sampler):
    patcher, bundle = loaded[name]
    positive, negative, extra = conditioning(pack, bundle, name)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    latent = pack["comfy_sample"].sample(patcher, noise, 4, 7.5, sampler, "ddim_uniform", positive, negative,
                                         torch.zeros(SHAPE), disable_pbar=True, seed=1)
    _, x0 = official(bundle, noise, extra, steps=4, eta=0.0)
    assert_close(latent * bundle.config.vae.scale_factor, x0)  # LATENTs are model space / scale factor


@torch.no_grad()
@pytest.mark.parametrize("name", ["vc2", "i2v"])
def test_videocrafter_sampler_is_official_ddim_eta1(pack, loaded, name):
    patcher, bundle = loaded[name]
    positive, negative, extra = conditioning(pack, bundle, name)
    result = pack["sampler"].sample(patcher, positive, negative, {"samples": torch.zeros(SHAPE)}, seed=9, steps=3,
                                    cfg=7.5, eta=1.0)
    noise = pack["comfy_sample"].prepare_noise(torch.zeros(SHAPE), 9)  # the seeded noise VideoCrafter Sampler draws
    final, _ = official(bundle, noise, extra, steps=3, eta=1.0, seed=9)
    assert_close(result["samples"] * bundle.config.vae.scale_factor, final)
