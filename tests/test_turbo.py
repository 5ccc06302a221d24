"""T2V-Turbo: loading, the v1 LoRA layout and merge, the guidance embedding and the sampler.

v1 is checked against golden fixtures made by the official t2v-turbo code (tests/fixtures/turbo/, README
there): the LoRA layout, the merged model's eps, and a 4-step official sampler run with its per-step noise.
Pass marks from that README: eps within 1e-4 + 1e-4 max|ref|, timesteps exact, final latent within 2e-3.

v2 has no official golden: `reference_v2_eps` below is an independent reference written from reading the
official `UNetModel.forward` (lvdm/modules/networks/openaimodel3d.py) and `get_w_embedding`
(pipeline/t2v_turbo_vc2_pipeline.py): the guidance terms are computed here in float64 from the raw weights
and injected in front of a plain (non-Turbo) U-Net's `time_embed`.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vc_model
from vc_model.config import tiny_config
import vc_model.cli
from vc_model.convert import convert_checkpoint
from vc_model.turbo import (TURBO_DEFAULTS, TurboError, default_time_cond_proj, lora_targets, prepare_turbo,
                            random_turbo_lora)
from vc_model.turbo_sampler import boundary_scalings, motion_guidance_at, turbo_timesteps
from vc_model.unet import UNet3D, guidance_embedding

FIXTURES = Path(__file__).parent / "fixtures" / "turbo"


def within(got, ref, abs_tol=1e-4, rel=1e-4):
    err = (got.double() - ref.double()).abs().max().item()
    return err <= abs_tol + rel * ref.abs().max().item(), err


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "turbo_v1.safetensors"), json.loads((FIXTURES / "turbo_v1.json").read_text())


@pytest.fixture(scope="module")
def base():
    return vc_model.load(FIXTURES / "base_unet.safetensors")


@pytest.fixture(scope="module")
def base_tcp():
    return load_file(FIXTURES / "time_cond_proj.safetensors")["time_cond_proj.weight"]


@pytest.fixture(scope="module")
def turbo_v1(base, base_tcp):
    return vc_model.apply_turbo(base, vc_model.load_turbo(FIXTURES / "unet_lora.pt"), time_cond_proj=base_tcp)


# ---------------------------------------------------------------------------------------------------- loading


def test_v1_list_loads_as_keyed_pairs_in_list_order():
    raw = torch.load(FIXTURES / "unet_lora.pt", weights_only=True)
    turbo = vc_model.load_turbo(FIXTURES / "unet_lora.pt")
    assert len(turbo) == len(raw) == 546
    assert list(turbo)[:4] == ["lora.0000.up", "lora.0000.down", "lora.0001.up", "lora.0001.down"]
    for i in range(len(raw) // 2):
        assert torch.equal(turbo[f"lora.{i:04d}.up"], raw[2 * i]) and torch.equal(turbo[f"lora.{i:04d}.down"], raw[2 * i + 1])


def test_layout_follows_the_official_module_order(golden, base):
    layout = golden[1]["lora"]["layout"]
    parts = prepare_turbo(base.config.unet, vc_model.load_turbo(FIXTURES / "unet_lora.pt"))
    with torch.device("meta"):
        targets = lora_targets(UNet3D(parts.config))
    assert [name for name, _ in targets] == [entry["module"] for entry in layout]
    assert [list(shape) for _, shape in targets] == [entry["base_shape"] for entry in layout]
    assert targets[4][0] == "time_cond_proj" and not any(name.startswith("init_attn.0.proj") for name, _ in targets)


@pytest.mark.parametrize("contents,words", [
    ([torch.zeros(2, 2)] * 3, "list of 3 items"),
    ([1, 2], "int"),
    ({"foo.weight": torch.zeros(2)}, "neither a T2V-Turbo v1 LoRA"),
    ({"input_blocks.0.0.weight": torch.zeros(2)}, "without the guidance projection"),
    ({"lora.0000.up": torch.zeros(2), "lora.0001.up": torch.zeros(2), "lora.0001.down": torch.zeros(2)}, "incomplete"),
])
def test_files_that_are_neither_release_are_refused(tmp_path, contents, words):
    path = tmp_path / "unet_lora.pt"
    torch.save(contents, path)
    with pytest.raises(TurboError, match=words):
        vc_model.load_turbo(path)


def test_a_videocrafter_checkpoint_is_not_taken_for_a_turbo_file(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                               "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}, path)
    with pytest.raises(TurboError, match="VideoCrafter checkpoint rather than a T2V-Turbo file"):
        vc_model.load_turbo(path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_runs_code_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "unet_lora.pt"
    with open(path, "wb") as f:
        pickle.dump([_Payload()], f, protocol=2)
    with pytest.raises(vc_model.CheckpointError, match="arbitrary code"):
        vc_model.load_turbo(path)
    assert "must never run" not in capsys.readouterr().out


def test_converted_v1_safetensors_loads_the_same(tmp_path):
    report = convert_checkpoint(FIXTURES / "unet_lora.pt", tmp_path / "lora.safetensors", dtype=None)
    assert report.release == "T2V-Turbo v1" and report.tensors == 546
    a, b = vc_model.load_turbo(FIXTURES / "unet_lora.pt"), vc_model.load_turbo(tmp_path / "lora.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float32 for k in a)


# ---------------------------------------------------------------------------------------------------- v1 model


def test_w_embedding_matches_the_official(golden):
    tensors, _ = golden
    # the sines of arguments up to ~7500: the README's float32-vs-float64 spread is 2e-4
    ok, err = within(guidance_embedding(tensors["input.guidance"], 256), tensors["intermediate.w_embedding"], 5e-4, 0)
    assert ok, err


def test_merged_v1_eps_matches_the_official(golden, turbo_v1):
    tensors, _ = golden
    with torch.no_grad():
        eps = turbo_v1.unet(tensors["input.x"], tensors["input.timesteps"], tensors["input.context"],
                            fps=tensors["input.fps"], guidance=tensors["input.guidance"])
        cond = turbo_v1.unet.guidance_cond(tensors["input.guidance"], None, torch.float32)
    ok, err = within(eps, tensors["output.eps"])
    assert ok, err
    assert within(cond, tensors["intermediate.time_cond_embed"], 1e-3, 0)[0]


def test_guidance_layers_come_from_ops_and_manual_cast_keeps_the_official_eps(golden, turbo_v1):
    from dataclasses import replace

    from test_ops import SpyOps, cast_ops, layers_not_from, params_outside_ops

    with torch.device("meta"):
        spied = UNet3D(replace(turbo_v1.config.unet, motion_cond_proj_dim=256), ops=SpyOps)
    assert spied.time_cond_proj.spy and spied.motion_cond_proj.spy and spied.combine_proj.spy
    assert layers_not_from(spied, SpyOps) == [] and params_outside_ops(spied, SpyOps) == []
    tensors, _ = golden
    with torch.device("meta"):
        model = UNet3D(turbo_v1.config.unet, ops=cast_ops(torch.float64))
    model.load_state_dict({k: v.double() for k, v in turbo_v1.unet.state_dict().items()}, assign=True)
    with torch.no_grad():
        eps = model.eval()(tensors["input.x"], tensors["input.timesteps"], tensors["input.context"],
                           fps=tensors["input.fps"], guidance=tensors["input.guidance"])
    assert eps.dtype == torch.float32 and within(eps, tensors["output.eps"])[0]


def test_apply_turbo_leaves_the_base_bundle_unchanged(base, turbo_v1):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    vc_model.apply_turbo(base, vc_model.load_turbo(FIXTURES / "unet_lora.pt"))
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
    assert base.turbo is None and turbo_v1.turbo == "v1" and turbo_v1.config.fps == 16
    changed = [k for k, v in turbo_v1.unet.state_dict().items() if k in before and not torch.equal(before[k], v)]
    assert "input_blocks.0.0.weight" in changed and "out.2.bias" not in changed


def test_time_cond_proj_default_is_seeded_and_a_given_one_is_used(base, base_tcp, golden):
    tensors, _ = golden
    default = default_time_cond_proj(32)
    assert torch.equal(default, default_time_cond_proj(32)) and default.shape == (32, 256)
    assert default.abs().max() <= 1 / 16 and default.std() > 0.03
    turbo = vc_model.load_turbo(FIXTURES / "unet_lora.pt")
    up, down = turbo["lora.0004.up"], turbo["lora.0004.down"]
    seeded = vc_model.apply_turbo(base, turbo).unet.time_cond_proj.weight
    given = vc_model.apply_turbo(base, turbo, time_cond_proj=base_tcp).unet.time_cond_proj.weight
    assert torch.allclose(seeded, default + up @ down, atol=1e-6)
    assert torch.allclose(given, base_tcp + up @ down, atol=1e-6)
    with pytest.raises(TurboError, match=r"time_cond_proj has shape \[32, 128\]; this model needs \[32, 256\]"):
        vc_model.apply_turbo(base, turbo, time_cond_proj=torch.zeros(32, 128))


def test_a_lora_shape_mismatch_names_the_entry_and_both_shapes_before_merging(base, monkeypatch):
    turbo = dict(vc_model.load_turbo(FIXTURES / "unet_lora.pt"))
    turbo["lora.0013.down"] = torch.zeros(16, 48)  # entry 13 is input_blocks.1.1.proj_in, weight [32, 32]
    merged = []
    monkeypatch.setattr(vc_model.turbo, "merge_lora", lambda *a: merged.append(a))
    with pytest.raises(TurboError) as error:
        vc_model.apply_turbo(base, turbo)
    message = str(error.value)
    assert "entry 13" in message and "'input_blocks.1.1.proj_in'" in message
    assert "[32, 32]" in message and "up [32, 16] and down [16, 48]" in message
    assert merged == []


def test_a_lora_for_another_size_is_refused(base):
    lora = random_turbo_lora(tiny_config().unet, rank=4)
    turbo = {f"lora.{i // 2:04d}.{'up' if i % 2 == 0 else 'down'}": t for i, t in enumerate(lora)}
    # same model_channels, other context width: the first misfit is the first cross-attention key projection
    with pytest.raises(TurboError, match=r"entry 21 .* 'input_blocks.1.1.transformer_blocks.0.attn2.to_k', whose "
                                         r"weight is \[32, 48\], but has up \[32, 4\] and down \[4, 64\]"):
        vc_model.apply_turbo(base, turbo)
    short = {k: v for k, v in vc_model.load_turbo(FIXTURES / "unet_lora.pt").items() if int(k[5:9]) < 200}
    with pytest.raises(TurboError, match="200 entries, but this U-Net has 273"):
        vc_model.apply_turbo(base, short)


@pytest.mark.parametrize("kind", ["v1", "i2v"])
def test_turbo_is_refused_on_models_other_than_videocrafter2(kind):
    config = tiny_config(v1=kind == "v1", i2v=kind == "i2v")
    bundle = vc_model.build(vc_model.random_state_dict(config, seed=0), config)
    lora = random_turbo_lora(tiny_config().unet)
    turbo = {f"lora.{i // 2:04d}.{'up' if i % 2 == 0 else 'down'}": t for i, t in enumerate(lora)}
    with pytest.raises(TurboError, match="distilled from VideoCrafter2 and works only on it"):
        vc_model.apply_turbo(bundle, turbo)


def test_turbo_is_applied_once(turbo_v1):
    with pytest.raises(TurboError, match="already has T2V-Turbo applied"):
        vc_model.apply_turbo(turbo_v1, vc_model.load_turbo(FIXTURES / "unet_lora.pt"))


def test_guidance_is_required_by_a_turbo_unet_and_refused_by_a_plain_one(golden, base, turbo_v1):
    tensors, _ = golden
    x, t, c = tensors["input.x"][:1, :, :2], tensors["input.timesteps"][:1], tensors["input.context"][:1]
    with pytest.raises(ValueError, match="pass guidance=w"):
        turbo_v1.unet(x, t, c, fps=16)
    with pytest.raises(ValueError, match="no T2V-Turbo guidance embedding"):
        base.unet(x, t, c, fps=16, guidance=7.5)
    with pytest.raises(ValueError, match="no motion-guidance layers"):
        turbo_v1.unet(x, t, c, fps=16, guidance=7.5, motion_guidance=0.0)


# ---------------------------------------------------------------------------------------------------- sampler


def test_timesteps_are_the_official_ones():
    assert turbo_timesteps(4) == [999, 749, 499, 249]
    assert turbo_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert turbo_timesteps(16) == [999 - 60 * k for k in range(16)]  # predict.py's 16 steps: skip 12 of 200
    assert turbo_timesteps(1) == [999]
    for bad in (0, 201, 2.0, True):
        with pytest.raises(ValueError, match="from 1 to 200"):
            turbo_timesteps(bad)


def test_sampler_replays_the_official_run(golden, turbo_v1):
    tensors, meta = golden
    seen = []

    def unet(x, t, context, **kw):
        seen.append(t.tolist())
        return turbo_v1.unet(x, t, context, **kw)

    latent = vc_model.sample_turbo(unet, turbo_v1.schedule, tensors["input.sampler_x_T"], tensors["input.sampler_context"],
                                   fps=16, steps=4, guidance=7.5, noises=list(tensors["input.sampler_noises"]))
    assert seen == [[t, t] for t in meta["sampler"]["timesteps"]] == [[t, t] for t in tensors["aux.sampler_timesteps"].tolist()]
    ok, err = within(latent, tensors["output.sampler_latent"], 2e-3, 0)
    assert ok, err


def test_sampler_steps_match_the_official_given_its_model_outputs(golden):
    """The update alone: fed the official per-step U-Net outputs, every x_next and denoised agree."""
    tensors, _ = golden
    preds = iter(tensors["intermediate.sampler_model_pred"])
    xs, ds = [], []
    schedule = vc_model.Schedule(tensors["aux.alphas_cumprod"])
    latent = vc_model.sample_turbo(lambda *a, **k: next(preds), schedule, tensors["input.sampler_x_T"],
                                   tensors["input.sampler_context"], noises=tensors["input.sampler_noises"],
                                   callback=lambda i, n, x, d: (xs.append(x), ds.append(d)))
    for got, ref in ((torch.stack(xs), tensors["intermediate.sampler_x"]), (torch.stack(ds), tensors["intermediate.sampler_denoised"])):
        assert within(got, ref, 1e-4, 1e-5)[0]
    assert torch.equal(latent, ds[-1])


def test_sampler_draws_noise_every_step_from_the_generator(golden):
    tensors, _ = golden
    x_T, context = tensors["input.sampler_x_T"][:1, :, :2], tensors["input.sampler_context"][:1]
    eps = lambda x, *a, **k: torch.zeros_like(x)  # noqa: E731
    schedule = vc_model.Schedule(tensors["aux.alphas_cumprod"])
    drawn = vc_model.sample_turbo(eps, schedule, x_T, context, steps=3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(3)]
    assert torch.equal(drawn, vc_model.sample_turbo(eps, schedule, x_T, context, steps=3, noises=noises))
    assert torch.equal(drawn, vc_model.sample_turbo(eps, schedule, x_T, context, steps=3, noises=noises[:2]))
    c_skip, c_out = boundary_scalings(999)
    single = vc_model.sample_turbo(eps, schedule, x_T, context, steps=1)  # one step: no noise at all
    a = schedule.alphas_cumprod[999].double()
    assert torch.allclose(single.double(), c_out * x_T.double() / a.sqrt() + c_skip * x_T.double(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- v2


def _w_embedding_f64(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Independent float64 version of the official get_w_embedding (sin first, divisor dim/2 - 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    args = w.double()[:, None] * 1000.0 * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def _v2_state_dict(base_bundle, motion: bool, seed: int = 11) -> dict:
    """A v2 file's contents: the base U-Net perturbed, plus the guidance projections (random)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=g) for k, v in base_bundle.unet.state_dict().items()}
    mc = base_bundle.config.unet.model_channels
    sd["time_cond_proj.weight"] = torch.randn(mc, 256, generator=g) / 16
    if motion:
        sd["motion_cond_proj.weight"] = torch.randn(mc, 256, generator=g) / 16
        sd["combine_proj.weight"] = torch.randn(mc, 2 * mc, generator=g) / math.sqrt(2 * mc)
    return sd


def reference_v2_eps(sd, config, x, t, context, fps, w, m):
    """The official forward's guidance path: emb = time_embed(t_emb + cond) (+ fps), with
    cond = time_cond_proj(w_emb), or combine_proj(cat([time_cond_proj(w_emb), motion_cond_proj(m_emb)], 1))."""
    cond = _w_embedding_f64(w) @ sd["time_cond_proj.weight"].double().t()
    if m is not None:
        motion = _w_embedding_f64(m) @ sd["motion_cond_proj.weight"].double().t()
        cond = torch.cat([cond, motion], dim=1) @ sd["combine_proj.weight"].double().t()
    plain = UNet3D(config).eval()
    plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("time_cond", "motion_cond", "combine"))})
    plain.time_embed.register_forward_pre_hook(lambda module, args: (args[0] + cond.float(),))
    with torch.no_grad():
        return plain(x, t, context, fps=fps)


@pytest.mark.parametrize("m", [None, 0.0, 0.05])
def test_v2_motion_guidance_matches_the_independent_reference(tmp_path, golden, base, m):
    tensors, _ = golden
    sd = _v2_state_dict(base, motion=True)
    torch.save(sd, tmp_path / "unet_mg.pt")
    turbo = vc_model.load_turbo(tmp_path / "unet_mg.pt")
    bundle = vc_model.apply_turbo(base, turbo)
    assert bundle.turbo == "v2" and bundle.config.fps == 8 and bundle.unet.combine_proj is not None
    x, t, c, fps = tensors["input.x"], tensors["input.timesteps"], tensors["input.context"], tensors["input.fps"]
    w = tensors["input.guidance"]
    mm = None if m is None else torch.full((2,), m)
    with torch.no_grad():
        eps = bundle.unet(x, t, c, fps=fps, guidance=w, motion_guidance=m)
    ref = reference_v2_eps(sd, base.config.unet, x, t, c, fps, w, mm)
    ok, err = within(eps, ref)
    assert ok, err


def test_v2_without_motion_layers_and_broken_v2_files(tmp_path, golden, base):
    tensors, _ = golden
    sd = _v2_state_dict(base, motion=False)
    bundle = vc_model.apply_turbo(base, sd)
    x, t, c, fps = tensors["input.x"], tensors["input.timesteps"], tensors["input.context"], tensors["input.fps"]
    with torch.no_grad():
        eps = bundle.unet(x, t, c, fps=fps, guidance=7.5)
    assert within(eps, reference_v2_eps(sd, base.config.unet, x, t, c, fps, torch.full((2,), 7.5), None))[0]
    with pytest.raises(ValueError, match="no motion-guidance layers"):
        bundle.unet(x, t, c, fps=fps, guidance=7.5, motion_guidance=0.05)
    broken = dict(_v2_state_dict(base, motion=True))
    del broken["combine_proj.weight"]
    with pytest.raises(TurboError, match="missing combine_proj.weight"):
        vc_model.apply_turbo(base, broken)
    broken = dict(sd, **{"input_blocks.0.0.weight": torch.zeros(32, 4, 1, 1)})
    with pytest.raises(TurboError, match=r"'input_blocks.0.0.weight' has shape \[32, 4, 1, 1\].*\[32, 4, 3, 3\]"):
        vc_model.apply_turbo(base, broken)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "unet_no_mg.safetensors")
    assert vc_model.load_turbo(tmp_path / "unet_no_mg.safetensors").keys() == sd.keys()


def test_v2_sampler_gives_motion_guidance_on_the_first_half(golden):
    tensors, _ = golden
    seen = []

    def unet(x, t, context, fps, guidance, motion_guidance):
        seen.append((int(t[0]), motion_guidance))
        return torch.zeros_like(x)

    d = TURBO_DEFAULTS["v2"]
    vc_model.sample_turbo(unet, vc_model.Schedule(tensors["aux.alphas_cumprod"]), tensors["input.sampler_x_T"][:1, :, :1],
                          tensors["input.sampler_context"][:1], steps=d.steps, motion_guidance=d.motion_guidance,
                          motion_percentage=d.motion_percentage)
    assert seen == [(999 - 60 * k, 0.05 if 999 - 60 * k >= 500 else 0.0) for k in range(16)]
    assert [m for _, m in seen].count(0.05) == 9
    assert motion_guidance_at(500, 0.1, 0.5) == 0.1 and motion_guidance_at(499, 0.1, 0.5) == 0.0


# ---------------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return vc_model.build(vc_model.random_state_dict(config, seed=1), config)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("turbo") / "unet_lora.pt"
    torch.save(random_turbo_lora(tiny.config.unet, seed=2), path)
    return path


def test_generate_with_turbo_is_sample_turbo_on_the_applied_model(tiny, tiny_lora):
    latent = vc_model.generate(tiny, "a corgi", turbo=tiny_lora, steps=2, seed=3, frames=2, return_latent=True)
    turbo = vc_model.apply_turbo(tiny, vc_model.load_turbo(tiny_lora))
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(1, 4, 2, 8, 16, generator=g)
    expected = vc_model.sample_turbo(turbo.unet, turbo.schedule, x_T, turbo.text_encoder(["a corgi"]), fps=16, steps=2,
                                     guidance=7.5, generator=g)
    assert torch.allclose(latent, expected, atol=1e-5)
    video = vc_model.generate(turbo, "a corgi", turbo=True, seed=3, frames=2, steps=1)
    assert video.shape == (1, 3, 2, 64, 128) and video.abs().max() <= 1


def test_generate_with_turbo_and_a_temporal_window_is_freenoise_on_the_turbo_sampler(tiny, tiny_lora):
    latent = vc_model.generate(tiny, "a corgi", turbo=tiny_lora, steps=2, seed=3, frames=6, temporal_window=4,
                               temporal_stride=2, return_latent=True)
    turbo = vc_model.apply_turbo(tiny, vc_model.load_turbo(tiny_lora))
    g = torch.Generator().manual_seed(3)
    x_T = vc_model.reschedule_noise(torch.randn(1, 4, 6, 8, 16, generator=g), 4, 2, generator=g)
    expected = vc_model.sample_turbo(turbo.unet, turbo.schedule, x_T, turbo.text_encoder(["a corgi"]), fps=16, steps=2,
                                     guidance=7.5, generator=g, temporal_window=4, temporal_stride=2)
    assert torch.allclose(latent, expected, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    x_T = vc_model.reschedule_noise(torch.randn(1, 4, 6, 8, 16, generator=g), 4, 2, generator=g)
    plain = vc_model.sample_turbo(turbo.unet, turbo.schedule, x_T, turbo.text_encoder(["a corgi"]), fps=16, steps=2,
                                  guidance=7.5, generator=g)
    assert not torch.allclose(latent, plain, atol=1e-3)  # the window reached the U-Net


def test_generate_turbo_mistakes(tiny, tiny_lora):
    with pytest.raises(ValueError, match="prompt_travel runs with the DDIM sampler"):
        vc_model.generate(tiny, prompt_travel=["a", "b"], turbo=tiny_lora, steps=1, frames=4)
    with pytest.raises(ValueError, match="turbo=True needs a bundle with T2V-Turbo applied"):
        vc_model.generate(tiny, "x", turbo=True, steps=1, frames=1)
    with pytest.raises(ValueError, match="no negative prompt"):
        vc_model.generate(tiny, "x", negative_prompt="blurry", turbo=tiny_lora, steps=1, frames=1)
    with pytest.raises(ValueError, match="T2V-Turbo settings"):
        vc_model.generate(tiny, "x", guidance=7.5, steps=1, frames=1)


# ---------------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vc2.ckpt"
    torch.save({"state_dict": vc_model.random_state_dict(tiny_config(), seed=1)}, path)
    return path


def _cli(capsys, *argv):
    rc = vc_model.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_with_turbo_writes_the_video(tmp_path, capsys, tiny_ckpt, tiny_lora):
    out = tmp_path / "turbo.mp4"
    rc, stdout, stderr = _cli(capsys, "generate", "a corgi", "--ckpt", tiny_ckpt, "--turbo", tiny_lora, "--steps", 2,
                              "--frames", 2, "--height", 64, "--width", 128, "--out", out)
    assert rc == 0, stderr
    assert "T2V-Turbo v1: 2 steps, guidance 7.5, motion guidance None, fps 16" in stderr
    assert out.is_file() and "2 frames, 128x64" in stdout


def test_cli_generate_with_a_v2_file_uses_the_predictor_defaults(tmp_path, capsys, tiny_ckpt, tiny):
    weights = dict(tiny.unet.state_dict())
    g, mc = torch.Generator().manual_seed(6), tiny.config.unet.model_channels
    weights.update({"time_cond_proj.weight": torch.randn(mc, 256, generator=g) / 16,
                    "motion_cond_proj.weight": torch.randn(mc, 256, generator=g) / 16,
                    "combine_proj.weight": torch.randn(mc, 2 * mc, generator=g) / 8})
    torch.save(weights, tmp_path / "unet_mg.pt")
    rc, stdout, stderr = _cli(capsys, "generate", "a corgi", "--ckpt", tiny_ckpt, "--turbo", tmp_path / "unet_mg.pt",
                              "--steps", 2, "--frames", 2, "--height", 64, "--width", 128, "--out", tmp_path / "v2.mp4")
    assert rc == 0, stderr
    assert "T2V-Turbo v2: 2 steps, guidance 7.5, motion guidance 0.05, fps 8" in stderr and "2 frames" in stdout


@pytest.mark.parametrize("extra,words", [
    (["--guidance", "5"], "--guidance is a T2V-Turbo option: add --turbo"),
    (["--turbo", "missing.pt"], "No T2V-Turbo file at 'missing.pt'"),
    (["--turbo", "TURBO", "--travel", "a cat"], "--travel runs with the DDIM sampler"),
])
def test_cli_turbo_mistakes_are_one_sentence(tmp_path, capsys, tiny_ckpt, tiny_lora, extra, words):
    extra = [tiny_lora if a == "TURBO" else a for a in extra]
    rc, _, stderr = _cli(capsys, "generate", "x", "--ckpt", tiny_ckpt, "--out", tmp_path / "x.mp4", *extra)
    assert rc == 2 and words in stderr and "Traceback" not in stderr


def test_cli_turbo_on_videocrafter1_is_refused_before_building(tmp_path, capsys, tiny_lora):
    ckpt = tmp_path / "vc1.ckpt"
    torch.save({"state_dict": vc_model.random_state_dict(tiny_config(v1=True), seed=1)}, ckpt)
    rc, _, stderr = _cli(capsys, "generate", "x", "--ckpt", ckpt, "--turbo", tiny_lora, "--out", tmp_path / "x.mp4")
    assert rc == 2 and "distilled from VideoCrafter2" in stderr and "building" not in stderr


def test_cli_convert_turns_the_v1_list_into_keyed_safetensors(tmp_path, capsys, tiny_lora):
    source = tmp_path / "unet_lora.pt"
    source.write_bytes(tiny_lora.read_bytes())
    rc, stdout, stderr = _cli(capsys, "convert", source)
    assert rc == 0, stderr
    assert "T2V-Turbo v1" in stdout and "as stored" in stdout
    converted = load_file(tmp_path / "unet_lora.safetensors")
    raw = torch.load(source, weights_only=True)
    assert len(converted) == len(raw) and torch.equal(converted["lora.0003.down"], raw[7])
