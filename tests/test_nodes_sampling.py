"""Host-free checks of the nodes' sampling maths (nodes/sigmas.py, nodes/diffusion.py).

The sigma-space schedule and the DDIM sampler function are what ComfyUI runs; here they drive the
tiny random U-Net through a stand-in for ComfyUI's denoiser wrapper and are compared with
`vc_model.sample_ddim`, the official DDIM (itself checked against golden fixtures in test_sampling.py).
"""
from __future__ import annotations


import pytest
import torch

from pack_import import pack_module  # noqa: E402


vs = pack_module("nodes.sigmas")
diffusion = pack_module("nodes.diffusion")
vcm = pack_module("vc_model")
config_mod = pack_module("vc_model.config")


class ScaledSampling:
    """What ModelSamplingVideoCrafter computes, without ComfyUI."""

    def __init__(self, schedule):
        self.sigmas, self.signal_scales = vs.sigma_tables(schedule.alphas_cumprod, schedule.scale_arr)
        self.log_sigmas = self.sigmas.log()

    def signal_scale(self, sigma):
        return vs.interpolate_scale(sigma, self.log_sigmas, self.signal_scales)

    def timestep(self, sigma):
        return (sigma.log()[:, None] - self.log_sigmas[None]).abs().argmin(dim=1)


class Denoiser:
    """ComfyUI's wrapper in miniature: y-space x and sigma in, CFG'd denoised x0 out."""

    def __init__(self, unet, sampling, context, uncond, cfg, fps, clip_tokens=None, uncond_tokens=None):
        self.model_sampling = sampling
        self.unet, self.context, self.uncond, self.cfg, self.fps = unet, context, uncond, cfg, fps
        self.clip_tokens, self.uncond_tokens = clip_tokens, uncond_tokens

    def __call__(self, y, sigma):
        s = self.model_sampling.signal_scale(sigma).view(-1, 1, 1, 1, 1)
        sig = sigma.view(-1, 1, 1, 1, 1)
        x_in = y * vs.input_scale(sig, s)
        t = self.model_sampling.timestep(sigma)
        kwargs = {}
        if self.clip_tokens is not None:
            kwargs["clip_tokens"] = torch.cat([self.clip_tokens, self.uncond_tokens])
        eps = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([self.context, self.uncond]),
                        fps=torch.full((2 * y.shape[0],), self.fps), **kwargs)
        e_c, e_u = eps.chunk(2)
        eps = e_u + self.cfg * (e_c - e_u)
        return y - sig * eps


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


def test_signal_scale_exact_on_the_table_and_clamped_outside():
    sched = vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.7))
    sampling = ScaledSampling(sched)
    assert torch.equal(sampling.signal_scale(sampling.sigmas), sampling.signal_scales)
    mid = (sampling.sigmas[100] * sampling.sigmas[101]).sqrt()
    s = float(sampling.signal_scale(mid.view(1)))
    assert float(sampling.signal_scales[101]) < s < float(sampling.signal_scales[100])
    ends = sampling.signal_scale(torch.tensor([0.0, 1e-6, 1e6]))
    assert ends.tolist() == pytest.approx([1.0, 1.0, 0.7], abs=1e-6)


def test_ddim_sigmas_follow_the_official_timesteps():
    sched = vcm.Schedule.from_config(config_mod.ScheduleConfig(use_scale=True, scale_b=0.7))
    sampling = ScaledSampling(sched)
    timesteps = vcm.ddim_timesteps(50)
    sig = vs.ddim_sigmas(sampling.log_sigmas, timesteps, final_level=True)
    assert sig.shape == (51,)
    assert torch.equal(sampling.timestep(sig[:-1]), torch.tensor(timesteps[::-1]))
    assert sampling.timestep(sig[-1:]).item() == 0
    assert vs.ddim_sigmas(sampling.log_sigmas, timesteps, final_level=False)[-1] == 0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_matches_official_ddim(tiny, eta):
    cfg, bundle, unet = tiny
    noise, text, uncond, tokens, uncond_tokens = _inputs(cfg, bundle)
    sampling = ScaledSampling(bundle.schedule)
    denoiser = Denoiser(unet, sampling, text, uncond, 7.5, 28, tokens, uncond_tokens)
    steps, seed = 5, 11
    sig = vs.ddim_sigmas(sampling.log_sigmas, vcm.ddim_timesteps(steps), final_level=True)
    s0 = sampling.signal_scale(sig[:1])
    y = noise * vs.pure_noise_scale(sig[0], s0)  # what the ModelSampling does from an empty latent
    gen = torch.Generator().manual_seed(seed)
    out = vs.sample_videocrafter_ddim(denoiser, y, sig, eta=eta,
                                      noise_sampler=lambda a, b: torch.randn(y.shape, generator=gen))
    ours = out * vs.input_scale(sig[-1], sampling.signal_scale(sig[-1:]))
    final, _ = _reference(cfg, bundle, noise, text, uncond, tokens, uncond_tokens, steps, eta, seed)
    torch.testing.assert_close(ours, final, rtol=1e-4, atol=1e-4 * float(final.abs().max()))


def test_euler_on_ddim_uniform_sigmas_is_official_eta0_x0(tiny):
    """Core KSampler `ddim`/`euler` + `ddim_uniform` = official DDIM at eta 0 (its last pred_x0)."""
    cfg, bundle, unet = tiny
    noise, text, uncond, tokens, uncond_tokens = _inputs(cfg, bundle, seed=1)
    sampling = ScaledSampling(bundle.schedule)
    denoiser = Denoiser(unet, sampling, text, uncond, 7.5, 28, tokens, uncond_tokens)
    steps = 4
    sig = vs.ddim_sigmas(sampling.log_sigmas, vcm.ddim_timesteps(steps), final_level=False)
    y = noise * vs.pure_noise_scale(sig[0], sampling.signal_scale(sig[:1]))
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
