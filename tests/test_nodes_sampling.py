"""Host-free checks of the nodes' sampling maths (nodes/sigmas.py, nodes/diffusion.py).

`ModelSamplingVideoCrafter` (nodes/model.py) and VideoCrafter Sampler (nodes/sampler.py) are one-line
calls of the nodes/sigmas.py functions tested here, so these tests run the shipped maths; the ComfyUI
classes themselves are run by tests/host/test_model_sampling.py. What ComfyUI itself contributes
(its timestep lookup, `calculate_denoised` and CFG) is stood in by `comfy_denoiser` below, and the
result is compared with `vc_model.sample_ddim`, the official DDIM (checked against golden fixtures
in test_sampling.py).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from pack_import import pack_module  # noqa: E402


vs = pack_module("nodes.sigmas")
diffusion = pack_module("nodes.diffusion")
vcm = pack_module("vc_model")
config_mod = pack_module("vc_model.config")


def tables(schedule):
    """(sigmas, log_sigmas, scales) as ModelSamplingVideoCrafter registers them."""
    sigmas, scales = vs.sigma_tables(schedule.alphas_cumprod, schedule.scale_arr)
    return sigmas, sigmas.log(), scales


def comfy_timestep(sigma, log_sigmas):
    """ComfyUI's ModelSamplingDiscrete.timestep: the nearest table entry in log sigma."""
    return (sigma.log()[None] - log_sigmas[:, None]).abs().argmin(dim=0)


def comfy_denoiser(unet, log_sigmas, scales, context, uncond, cfg, fps, clip_tokens=None, uncond_tokens=None):
    """ComfyUI's BaseModel.apply_model + CFG around our maths: y-space x and sigma in, CFG'd denoised out.

    The model input is `vs.model_input` (our calculate_input); the denoised value is EPS's
    y - sigma * eps; `model_sampling.signal_scale` is what sample_videocrafter_ddim looks up."""
    def denoise(y, sigma):
        x_in = vs.model_input(sigma, y, log_sigmas, scales)
        t = comfy_timestep(sigma, log_sigmas)
        kwargs = {}
        if clip_tokens is not None:
            kwargs["clip_tokens"] = torch.cat([clip_tokens, uncond_tokens])
        eps = unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([context, uncond]),
                   fps=torch.full((2 * y.shape[0],), fps), **kwargs)
        e_c, e_u = eps.chunk(2)
        return y - vs.per_sample(sigma, y.ndim) * (e_u + cfg * (e_c - e_u))

    denoise.model_sampling = SimpleNamespace(
        signal_scale=functools.partial(vs.interpolate_scale, log_sigmas=log_sigmas, scales=scales))
    return denoise


@pytest.fixture(scope="module", params=["t2v", "v1", "i2v"])
def tiny(request):
    cfg = config_mod.tiny_config(i2v=request.param == "i2v", v1=request.param == "v1")
    sd = vcm.random_state_dict(cfg, seed=3)
    bundle = vcm.build(sd, cfg)
    resampler = cfg.image_encoder.resampler if cfg.image_encoder is not None else None
    with torch.device("meta"):
        unet = diffusion.VideoCrafterUNet(cfg.unet, resampler)
    weights = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    weights.update({k: v for k, v in sd.items() if k.startswith("image_proj_model.")})
    unet.load_state_dict(weights, strict=True, assign=True)
    return cfg, bundle, unet.eval()


def _inputs(cfg, bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 4, 8, 16, generator=g)
    text = bundle.text_encoder(["a corgi running on the beach"])
    uncond = bundle.text_encoder([""])
    tokens = uncond_tokens = None
    if cfg.image_encoder is not None:
        image = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1
        tokens = bundle.image_encoder.clip(image)
        uncond_tokens = bundle.image_encoder.clip(torch.zeros(1, 3, 224, 224))
    return noise, text, uncond, tokens, uncond_tokens


def _reference(cfg, bundle, noise, text, uncond, tokens, uncond_tokens, steps, eta, seed):
    last = {}
    image = dict(image_context=bundle.image_encoder.resampler(tokens),
                 uncond_image_context=bundle.image_encoder.resampler(uncond_tokens)) if tokens is not None else {}
    final = vcm.sample_ddim(bundle.unet, bundle.schedule, noise.clone(), text, uncond, fps=28, steps=steps, cfg=7.5,
                            eta=eta, generator=torch.Generator().manual_seed(seed),
                            callback=lambda i, n, x, x0: last.update(x0=x0), **image)
    return final, last["x0"]


# ---- the schedule in sigma space ------------------------------------------------------------------------


def test_sigma_table_is_increasing_and_exact_without_scale():
    sched = vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=False))
    sigmas, scales = vs.sigma_tables(sched.alphas_cumprod, None)
    ac = sched.alphas_cumprod.double()
    torch.testing.assert_close(sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=1e-6, atol=0)
    assert torch.all(scales == 1)
    scaled = vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.3, fix_scale_bug=False))
    sigmas_s, scales_s = vs.sigma_tables(scaled.alphas_cumprod, scaled.scale_arr)  # 1400-long scale_arr
    assert sigmas_s.shape == (1000,) and torch.all(sigmas_s[1:] > sigmas_s[:-1])
    assert scales_s[0] == 1 and abs(float(scales_s[999]) - 0.3) < 1e-6
    with pytest.raises(ValueError, match="scale_arr has 10 entries"):
        vs.sigma_tables(sched.alphas_cumprod, torch.ones(10))


def test_signal_scale_exact_on_the_table_and_clamped_outside():
    sigmas, log_sigmas, scales = tables(vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.7)))
    assert torch.equal(vs.interpolate_scale(sigmas, log_sigmas, scales), scales)
    mid = (sigmas[100] * sigmas[101]).sqrt()
    s = float(vs.interpolate_scale(mid.view(1), log_sigmas, scales))
    assert float(scales[101]) < s < float(scales[100])
    ends = vs.interpolate_scale(torch.tensor([0.0, 1e-6, 1e6]), log_sigmas, scales)
    assert ends.tolist() == pytest.approx([1.0, 1.0, 0.7], abs=1e-6)


@pytest.mark.parametrize("scale_b", [None, 0.7, 0.3])
def test_model_input_is_the_official_noised_latent(scale_b):
    """calculate_input: y = x0 + sigma'_t eps -> sqrt(a_t) s_t x0 + sqrt(1 - a_t) eps, per sample."""
    cfg = config_mod.ScheduleConfig(use_scale=scale_b is not None, scale_b=scale_b or 0.3)
    sched = vcm.Schedule.from_config(cfg)
    sigmas, log_sigmas, scales = tables(sched)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 3, 5, generator=g), torch.randn(3, 4, 2, 3, 5, generator=g)
    t = torch.tensor([999, 401, 7])
    y = x0 + sigmas[t].view(-1, 1, 1, 1, 1) * eps
    a = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1, 1)
    s = (sched.scale_arr[t].double() if sched.scale_arr is not None else torch.ones(3, dtype=torch.float64))
    official = a.sqrt() * s.view(-1, 1, 1, 1, 1) * x0.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(vs.model_input(sigmas[t], y, log_sigmas, scales).double(), official,
                               rtol=1e-5, atol=1e-5)
    one = vs.model_input(sigmas[t[:1]], y[:1], log_sigmas, scales)  # a single sigma broadcasts too
    torch.testing.assert_close(one.double(), official[:1], rtol=1e-5, atol=1e-5)


def test_noised_latent_starts_from_official_pure_noise():
    sigmas, log_sigmas, scales = tables(vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.7)))
    g = torch.Generator().manual_seed(1)
    noise, latent = torch.randn(2, 4, 2, 3, 5, generator=g), torch.randn(2, 4, 2, 3, 5, generator=g)
    top = sigmas[-1:].expand(2)
    for empty in (None, torch.zeros_like(noise)):  # from an empty latent: the official x_T = noise
        y = vs.noised_latent(top, noise.clone(), empty, log_sigmas, scales)
        torch.testing.assert_close(vs.model_input(top, y, log_sigmas, scales), noise, rtol=1e-5, atol=1e-5)
    # from an encoded video: ComfyUI's EPS start y = latent + sigma' noise (img2img), unless max_denoise
    sigma = sigmas[500:501].expand(2)
    torch.testing.assert_close(vs.noised_latent(sigma, noise.clone(), latent, log_sigmas, scales),
                               latent + sigmas[500] * noise)
    pure = vs.noised_latent(sigma, noise.clone(), latent, log_sigmas, scales, max_denoise=True) - latent
    torch.testing.assert_close(vs.model_input(sigma, pure, log_sigmas, scales), noise, rtol=1e-5, atol=1e-5)


def test_official_latent_is_the_t0_level():
    sched = vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.7))
    sigmas, log_sigmas, scales = tables(sched)
    y = torch.randn(1, 4, 2, 3, 5)
    want = y * float(sched.alphas_cumprod[0].double().sqrt() * sched.scale_arr[0].double())
    torch.testing.assert_close(vs.official_latent(y, sigmas[:1], log_sigmas, scales), want)


def test_ddim_sigmas_follow_the_official_timesteps():
    sigmas, log_sigmas, _ = tables(vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.7)))
    timesteps = vcm.ddim_timesteps(50)
    sig = vs.official_ddim_sigmas(log_sigmas, 50)
    assert sig.shape == (51,) and timesteps[-1] == 981
    assert torch.equal(comfy_timestep(sig[:-1], log_sigmas), torch.tensor(timesteps[::-1]))
    assert comfy_timestep(sig[-1:], log_sigmas).item() == 0
    assert vs.official_ddim_sigmas(log_sigmas, 30).shape == (32,)  # 31 official steps for 30
    assert vs.ddim_sigmas(log_sigmas, timesteps, final_level=False)[-1] == 0


# ---- whole samplers against the official DDIM ----------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_videocrafter_sampler_chain_matches_official_ddim(tiny, eta):
    """What VideoCrafter Sampler runs: official sigmas, pure-noise start, our DDIM, the t=0 latent."""
    cfg, bundle, unet = tiny
    noise, text, uncond, tokens, uncond_tokens = _inputs(cfg, bundle)
    _, log_sigmas, scales = tables(bundle.schedule)
    denoiser = comfy_denoiser(unet, log_sigmas, scales, text, uncond, 7.5, 28, tokens, uncond_tokens)
    steps, seed = 5, 11
    sig = vs.official_ddim_sigmas(log_sigmas, steps)
    y = vs.noised_latent(sig[:1], noise.clone(), torch.zeros_like(noise), log_sigmas, scales)
    gen = torch.Generator().manual_seed(seed)
    out = vs.sample_videocrafter_ddim(denoiser, y, sig, eta=eta,
                                      noise_sampler=lambda a, b: torch.randn(y.shape, generator=gen))
    ours = vs.official_latent(out, sig[-1:], log_sigmas, scales)
    final, _ = _reference(cfg, bundle, noise, text, uncond, tokens, uncond_tokens, steps, eta, seed)
    torch.testing.assert_close(ours, final, rtol=1e-4, atol=1e-4 * float(final.abs().max()))


def test_euler_on_ddim_uniform_sigmas_is_official_eta0_x0(tiny):
    """Core KSampler `ddim`/`euler` + `ddim_uniform` = official DDIM at eta 0 (its last pred_x0)."""
    cfg, bundle, unet = tiny
    noise, text, uncond, tokens, uncond_tokens = _inputs(cfg, bundle, seed=1)
    _, log_sigmas, scales = tables(bundle.schedule)
    denoiser = comfy_denoiser(unet, log_sigmas, scales, text, uncond, 7.5, 28, tokens, uncond_tokens)
    steps = 4
    sig = vs.ddim_sigmas(log_sigmas, vcm.ddim_timesteps(steps), final_level=False)
    y = vs.noised_latent(sig[:1], noise.clone(), None, log_sigmas, scales)
    for i in range(steps):  # k-diffusion's sample_euler
        denoised = denoiser(y, sig[i].view(1))
        y = y + (y - denoised) / sig[i] * (sig[i + 1] - sig[i])
    _, x0 = _reference(cfg, bundle, noise, text, uncond, tokens, uncond_tokens, steps, 0.0, 0)
    torch.testing.assert_close(y, x0, rtol=1e-4, atol=1e-4 * float(x0.abs().max()))


def test_unet_forward_runs_the_resampler_inside(tiny):
    cfg, bundle, unet = tiny
    x = torch.randn(2, 4, 3, 8, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([999, 10])
    context = torch.randn(2, 77, cfg.unet.context_dim)
    if cfg.image_encoder is None:
        torch.testing.assert_close(unet(x, t, context=context, fps=torch.tensor([8, 28])),
                                   bundle.unet(x, t, context, fps=torch.tensor([8, 28])))
        with pytest.raises(ValueError, match="text-to-video"):
            unet(x, t, context=context, clip_tokens=torch.randn(2, 5, 8))
        return
    tokens = torch.randn(2, 50, cfg.image_encoder.width)
    want = bundle.unet(x, t, context, fps=8, image_context=bundle.image_encoder.resampler(tokens))
    torch.testing.assert_close(unet(x, t, context=context, fps=8, clip_tokens=tokens, transformer_options={}), want)
