"""Host-free checks of the T2V-Turbo node maths (nodes/turbo_sampling.py, the guidance in nodes/diffusion.py).

ComfyUI runs the Turbo MODEL in sigma space: the Turbo sampler and ComfyUI's `lcm` update drive the tiny U-Net
through a stand-in for ComfyUI's denoiser wrapper (plain sigma table: Turbo has no use_scale), with the guidance
carried in transformer_options, and are compared with `vc_model.sample_turbo` (itself checked against the
official golden run in test_turbo.py).
"""
from __future__ import annotations

import pytest
import torch

from pack_import import pack_module

ts = pack_module("nodes.turbo_sampling")
vs = pack_module("nodes.sigmas")
diffusion = pack_module("nodes.diffusion")
vcm = pack_module("vc_model")
config_mod = pack_module("vc_model.config")
turbo_mod = pack_module("vc_model.turbo")


class PlainSampling:
    """The Turbo MODEL's ModelSamplingVideoCrafter (the plain schedule: no use_scale), through the same
    nodes/sigmas.py functions the shipped class calls."""

    def __init__(self, schedule):
        self.sigmas, self.scales = vs.sigma_tables(schedule.alphas_cumprod, None)
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        return (sigma.log()[:, None] - self.log_sigmas[None]).abs().argmin(dim=1).float()

    def calculate_input(self, sigma, y):
        return vs.model_input(sigma, y, self.log_sigmas, self.scales)

    def noise_scaling(self, sigma, noise, latent):
        return vs.noised_latent(sigma, noise, latent, self.log_sigmas, self.scales)


class Denoiser:
    """ComfyUI's wrapper in miniature (cfg 1): y and sigma in, the U-Net's x0 out; options as ComfyUI passes them."""

    def __init__(self, unet, sampling, context, fps, options):
        self.model_sampling, self.unet, self.context, self.fps, self.options = sampling, unet, context, fps, options

    def __call__(self, y, sigma):
        t = self.model_sampling.timestep(sigma)
        eps = self.unet(self.model_sampling.calculate_input(sigma, y), t, self.context,
                        fps=torch.full((y.shape[0],), self.fps), transformer_options=self.options)
        return y - sigma.view(-1, 1, 1, 1, 1) * eps


@pytest.fixture(scope="module", params=["v1", "v2"])
def turbo(request):
    """(version, vc_model Turbo bundle, the same model as the nodes' VideoCrafterUNet)."""
    cfg = config_mod.tiny_config()
    bundle = vcm.build(vcm.random_state_dict(cfg, seed=3), cfg)
    if request.param == "v1":
        lora = turbo_mod.random_turbo_lora(cfg.unet, seed=4)
        weights = {turbo_mod.lora_key(i // 2, "up" if i % 2 == 0 else "down"): t for i, t in enumerate(lora)}
    else:
        g = torch.Generator().manual_seed(4)
        weights = dict(bundle.unet.state_dict())
        mc = cfg.unet.model_channels
        for key, shape in (("time_cond_proj.weight", (mc, 256)), ("motion_cond_proj.weight", (mc, 256)),
                           ("combine_proj.weight", (mc, 2 * mc))):
            weights[key] = torch.randn(shape, generator=g) / 16
    applied = vcm.apply_turbo(bundle, weights)
    with torch.device("meta"):
        unet = diffusion.VideoCrafterUNet(applied.config.unet)
    unet.load_state_dict(applied.unet.state_dict(), strict=True, assign=True)
    return request.param, applied, unet.eval()


def _inputs(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(1, 4, 3, 8, 16, generator=g)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(16)]
    return x_T, bundle.text_encoder(["a corgi running on the beach"]), noises


def _options(version, guidance=7.5):
    motion = 0.05 if version == "v2" else None
    return {ts.TURBO_KEY: ts.turbo_options(version, guidance, motion, 0.5)}


def test_guidance_rides_in_transformer_options(turbo):
    version, bundle, unet = turbo
    x_T, context, _ = _inputs(bundle)
    t = torch.tensor([999.0])
    with torch.no_grad():
        got = unet(x_T, t, context, fps=torch.tensor([16]), transformer_options=_options(version, 6.0))
        motion = 0.05 if version == "v2" else None
        want = bundle.unet(x_T, t, context, fps=16, guidance=6.0, motion_guidance=motion)
        late = unet(x_T, torch.tensor([249.0]), context, fps=torch.tensor([16]), transformer_options=_options(version, 6.0))
        want_late = bundle.unet(x_T, 249, context, fps=16, guidance=6.0, motion_guidance=0.0 if version == "v2" else None)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(late, want_late, atol=1e-6)
    with pytest.raises(ValueError, match="pass guidance=w"):
        unet(x_T, t, context, fps=torch.tensor([16]), transformer_options={})


def test_motion_guidance_per_sample_from_its_timestep():
    kwargs = ts.turbo_unet_kwargs(_options("v2"), torch.tensor([999.0, 500.0, 499.0]))
    assert kwargs["guidance"].tolist() == [7.5] * 3
    assert kwargs["motion_guidance"].tolist() == pytest.approx([0.05, 0.05, 0.0])
    assert ts.turbo_unet_kwargs(_options("v1"), torch.tensor([999.0]))["motion_guidance"] is None
    assert ts.turbo_unet_kwargs({}, torch.tensor([999.0])) == {} == ts.turbo_unet_kwargs(None, torch.tensor([1.0]))


def test_turbo_sigmas_are_the_official_timesteps(turbo):
    _, bundle, _ = turbo
    sampling = PlainSampling(bundle.schedule)
    for steps in (4, 8, 16):
        sigmas = ts.turbo_sigmas(sampling.sigmas, steps)
        assert sampling.timestep(sigmas[:-1]).long().tolist() == vcm.turbo_timesteps(steps) and sigmas[-1] == 0


@pytest.mark.parametrize("steps", [4, 8])
def test_node_sampler_matches_vc_model_sample_turbo(turbo, steps):
    version, bundle, unet = turbo
    x_T, context, noises = _inputs(bundle)
    sampling = PlainSampling(bundle.schedule)
    model = Denoiser(unet, sampling, context, 16, _options(version))
    sigmas = ts.turbo_sigmas(sampling.sigmas, steps)
    queue = iter(noises)
    y = sampling.noise_scaling(sigmas[:1], x_T, torch.zeros_like(x_T))  # from an empty latent: x_T = pure noise
    got = ts.sample_turbo_consistency(model, y, sigmas, noise_sampler=lambda s, sn: next(queue))
    motion = 0.05 if version == "v2" else None
    want = vcm.sample_turbo(bundle.unet, bundle.schedule, x_T, context, fps=16, steps=steps, guidance=7.5,
                            noises=noises[:steps], motion_guidance=motion, motion_percentage=0.5)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_core_lcm_update_is_the_turbo_sampler_to_rounding(turbo):
    """ComfyUI's lcm (x = denoised; x = noise_scaling(sigma_next, z, x)) drops c_skip / c_out, which are 1e-8 away."""
    version, bundle, unet = turbo
    x_T, context, noises = _inputs(bundle)
    sampling = PlainSampling(bundle.schedule)
    model = Denoiser(unet, sampling, context, 16, _options(version))
    sigmas = ts.turbo_sigmas(sampling.sigmas, 4)
    y = sampling.noise_scaling(sigmas[:1], x_T, torch.zeros_like(x_T))
    x = y
    for i in range(4):
        x = model(x, sigmas[i:i + 1])
        if sigmas[i + 1] > 0:
            x = sampling.noise_scaling(sigmas[i + 1:i + 2], noises[i], x)
    queue = iter(noises)
    turbo_out = ts.sample_turbo_consistency(model, y, sigmas, noise_sampler=lambda s, sn: next(queue))
    assert torch.allclose(x, turbo_out, atol=1e-5, rtol=1e-5)


def test_node_input_checks():
    assert ts.apply_problem(7.5, 0.05, 0.5) is None and ts.apply_problem(None, None, None) is None
    assert "guidance must be" in ts.apply_problem(-1.0, 0.05, 0.5)
    assert "motion_guidance must be" in ts.apply_problem(7.5, 2.0, 0.5)
    assert "motion_percentage must be" in ts.apply_problem(7.5, 0.05, float("nan"))
    assert ts.steps_problem(4) is None and "from 1 to 200" in ts.steps_problem(201) and ts.steps_problem(True)
