"""Schedule buffers and the DDIM sampler against the official `ddim_scale` fixture (no U-Net needed:
a fake model replays the recorded official eps)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vc_model.config import RELEASES, ScheduleConfig
from vc_model.sampling import ddim_coefficients, ddim_step, ddim_timesteps, sample_ddim
from vc_model.schedule import SCHEDULE_BUFFERS, Schedule, schedule_buffer_shapes, schedule_buffers

FIXTURES = Path(__file__).parent / "fixtures"
VC2_SCHEDULE = ScheduleConfig(use_scale=True, scale_b=0.7)  # the fixture's schedule


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURES / "ddim_scale.safetensors"))


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURES / "ddim_scale.json").read_text())


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------- schedule


def test_schedule_buffers_match_official(ref):
    ours = schedule_buffers(VC2_SCHEDULE)
    assert set(ours) == set(SCHEDULE_BUFFERS) | {"scale_arr"}
    for name, value in ours.items():
        official = ref[name]
        assert value.dtype == torch.float32 and value.shape == official.shape, name
        err = ((value.double() - official.double()).abs() / official.double().abs().clamp(min=1e-30)).max()
        assert err <= 1e-6, (name, err.item())


def test_schedule_buffer_shapes_match_release_manifests():
    files = {
        "vc1_t2v_1024": "t2v_1024_v1.0.json",
        "vc1_t2v_512": "t2v_512_v1.0.json",
        "vc2_t2v_512": "t2v_512_v2.0.json",
        "vc1_i2v_512": "i2v_512_v1.0.json",
    }
    for release, file in files.items():
        manifest = json.loads((FIXTURES / "manifests" / file).read_text())
        top = {k: tuple(v[0]) for k, v in manifest.items() if "." not in k}
        assert schedule_buffer_shapes(RELEASES[release].schedule) == top, release


def test_fixed_scale_arr_is_a_prefix_of_the_buggy_one():
    buggy = schedule_buffers(ScheduleConfig(use_scale=True, scale_b=0.3))["scale_arr"]
    fixed = schedule_buffers(ScheduleConfig(use_scale=True, scale_b=0.3, fix_scale_bug=True))["scale_arr"]
    assert buggy.shape == (1400,) and fixed.shape == (1000,)
    assert torch.equal(buggy[:1000], fixed)
    assert fixed[0] == 1.0 and fixed[399] == pytest.approx(0.3) and fixed[400] == pytest.approx(0.3)
    assert "scale_arr" not in schedule_buffers(ScheduleConfig())


def test_schedule_from_buffers_uses_checkpoint_values(ref):
    buffers = {k: ref[k] for k in (*SCHEDULE_BUFFERS, "scale_arr")}
    sched = Schedule.from_buffers(VC2_SCHEDULE, buffers)
    assert torch.equal(sched.alphas_cumprod, ref["alphas_cumprod"])
    assert torch.equal(sched.scale_arr, ref["scale_arr"])
    # A checkpoint value that differs from the config is kept, not recomputed.
    odd = dict(buffers, scale_arr=torch.full((1400,), 0.5))
    assert torch.equal(Schedule.from_buffers(VC2_SCHEDULE, odd).scale_arr, torch.full((1400,), 0.5))
    # Half-precision buffers that match the config are replaced by the exact float32 values.
    half = {k: v.half() for k, v in buffers.items()}
    exact = Schedule.from_config(VC2_SCHEDULE)
    sched = Schedule.from_buffers(VC2_SCHEDULE, half)
    assert torch.equal(sched.alphas_cumprod, exact.alphas_cumprod)
    assert torch.equal(sched.scale_arr, exact.scale_arr)
    assert Schedule.from_buffers(ScheduleConfig(), buffers).scale_arr is None


def test_schedule_from_buffers_errors(ref):
    buffers = {k: ref[k] for k in SCHEDULE_BUFFERS}
    with pytest.raises(ValueError, match="scale_arr"):
        Schedule.from_buffers(VC2_SCHEDULE, buffers)
    bad = dict(buffers, scale_arr=ref["scale_arr"][:1000])
    with pytest.raises(ValueError, match="shape"):
        Schedule.from_buffers(VC2_SCHEDULE, bad)


# ------------------------------------------------------------------------------------- timesteps


def test_ddim_timesteps():
    assert ddim_timesteps(50) == list(range(1, 1000, 20))
    assert ddim_timesteps(5) == [1, 201, 401, 601, 801]
    assert len(ddim_timesteps(30)) == 31 and len(ddim_timesteps(60)) == 63 and len(ddim_timesteps(7)) == 8
    assert ddim_timesteps(1) == [1] and ddim_timesteps(1000) == [*range(1, 1000), 999]
    # Where the official table would index alphas_cumprod[1000] (IndexError) we stop at 999.
    assert ddim_timesteps(3) == [1, 334, 667, 999] and ddim_timesteps(101)[-1] == 999
    for steps in range(1, 1001):
        ts = ddim_timesteps(steps)
        assert ts[0] == 1 and max(ts) <= 999 and len(ts) >= steps
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            ddim_timesteps(bad)


def test_ddim_coefficients_match_official_aux(ref):
    coeffs = ddim_coefficients(Schedule.from_buffers(VC2_SCHEDULE, ref), ddim_timesteps(5), eta=0.0)
    assert [c.timestep for c in coeffs] == ref["aux.timesteps"].tolist()
    fields = {
        "a_t": "aux.a_t", "a_prev": "aux.a_prev", "sqrt_one_minus_a_t": "aux.sqrt_one_minus_a_t",
        "scale_t": "aux.scale_t", "scale_prev": "aux.scale_t_prev",
    }
    for field, key in fields.items():
        ours = torch.tensor([getattr(c, field) for c in coeffs], dtype=torch.float64)
        rel = ((ours - ref[key]).abs() / ref[key].abs()).max().item()
        assert rel <= 1e-6, (field, rel)
    assert all(c.sigma == 0.0 for c in coeffs) and ref["aux.sigma_t"].abs().max() == 0
    assert coeffs[-1].a_prev == pytest.approx(0.99915, rel=1e-6)  # alphas_cumprod[0], not 1
    assert coeffs[-1].scale_prev == 1.0


def test_sigma_formula_at_eta_one():
    sched = Schedule.from_config(VC2_SCHEDULE)
    for c in ddim_coefficients(sched, ddim_timesteps(10), eta=1.0):
        expected = ((1 - c.a_prev) / (1 - c.a_t) * (1 - c.a_t / c.a_prev)) ** 0.5
        assert c.sigma == pytest.approx(expected) and c.sigma > 0


# ------------------------------------------------------------------------------ official parity


class ReplayModel:
    """Fake U-Net: returns the recorded official eps (cond rows, then uncond rows) and records calls."""

    def __init__(self, eps_cond, eps_uncond):
        self.eps_cond, self.eps_uncond = eps_cond, eps_uncond
        self.calls = []

    def __call__(self, x, t, context, fps=None, image_context=None):
        i = len(self.calls)
        self.calls.append(dict(x=x.clone(), t=t.clone(), context=context.clone(), fps=fps, image=image_context))
        return torch.cat([self.eps_cond[i], self.eps_uncond[i]])


def test_sample_ddim_matches_official_fixture(ref, meta):
    assert meta["sampler"]["S"] == 5 and meta["sampler"]["eta"] == 0.0
    cfg_scale = meta["sampler"]["unconditional_guidance_scale"]
    model = ReplayModel(ref["intermediate.eps_cond"], ref["intermediate.eps_uncond"])
    seen = []
    out = sample_ddim(
        model, Schedule.from_buffers(VC2_SCHEDULE, ref), ref["input.x_T"],
        ref["input.cond_c_crossattn"], ref["input.uncond_c_crossattn"],
        fps=ref["input.fps"], steps=5, cfg=cfg_scale, eta=0.0,
        callback=lambda i, total, x, x0: seen.append((i, total, x.clone(), x0.clone())),
    )
    cond, uncond = ref["input.cond_c_crossattn"], ref["input.uncond_c_crossattn"]
    assert len(model.calls) == 5
    prev = ref["input.x_T"]
    for i, call in enumerate(model.calls):
        assert call["x"].shape == (4, 4, 4, 8, 12)  # one batched call of 2B
        assert torch.equal(call["x"][:2], call["x"][2:])
        assert max_diff(call["x"][:2], prev) <= 2e-3
        assert call["t"].tolist() == [ref["aux.timesteps"][i].item()] * 4
        assert call["fps"].tolist() == [8, 8, 8, 8]
        assert torch.equal(call["context"], torch.cat([cond, uncond]))  # cond first
        assert call["image"] is None
        prev = ref["intermediate.x_inter"][i]

    assert [s[:2] for s in seen] == [(i, 5) for i in range(5)]
    diffs = {}
    for i, (_, _, x, x0) in enumerate(seen):
        diffs[f"pred_x0[{i}]"] = max_diff(x0, ref["intermediate.pred_x0"][i])
        diffs[f"x_inter[{i}]"] = max_diff(x, ref["intermediate.x_inter"][i])
    diffs["x0"] = max_diff(out, ref["output.x0"])
    print("max |diff|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 2e-3, diffs


# --------------------------------------------------------------------------------- behaviour


class ConstModel:
    """eps = 0.1 * x + per-sample context mean; records batch sizes, fps and image contexts."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, fps=None, image_context=None):
        self.calls.append(dict(n=x.shape[0], fps=fps, image=image_context, t=t))
        return 0.1 * x + context.mean((1, 2)).view(-1, 1, 1, 1, 1).to(x)


def _args(b=2):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(b, 4, 3, 4, 6, generator=g)
    return noise, torch.randn(b, 7, 8, generator=g), torch.randn(b, 7, 8, generator=g)


def test_single_call_without_guidance():
    noise, ctx, unc = _args()
    sched = Schedule.from_config(VC2_SCHEDULE)
    for kw in (dict(uncond_context=None, cfg=7.5), dict(uncond_context=unc, cfg=1.0)):
        model = ConstModel()
        sample_ddim(model, sched, noise, ctx, steps=3, eta=0.0, **kw)
        assert [c["n"] for c in model.calls] == [2] * 4  # 1000 // 3 = 333 -> 4 steps
        assert model.calls[0]["fps"].tolist() == [16, 16]  # default fps
        assert [c["t"][0].item() for c in model.calls] == [999, 667, 334, 1]


def test_eta_noise_comes_from_generator():
    noise, ctx, unc = _args()
    sched = Schedule.from_config(VC2_SCHEDULE)
    run = lambda seed: sample_ddim(ConstModel(), sched, noise, ctx, unc, steps=4, cfg=3.0, eta=1.0,
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)

    # Same thing by hand with ddim_step and the documented draw order (one randn per step).
    g = torch.Generator().manual_seed(1)
    x = noise
    for co in ddim_coefficients(sched, ddim_timesteps(4), 1.0):
        e_c = 0.1 * x + ctx.mean((1, 2)).view(-1, 1, 1, 1, 1)
        e_u = 0.1 * x + unc.mean((1, 2)).view(-1, 1, 1, 1, 1)
        e = e_u + 3.0 * (e_c - e_u)
        x, _ = ddim_step(x, e, co, torch.randn(x.shape, generator=g))
    assert max_diff(a, x) <= 1e-5

    # eta = 0 does not consume the generator.
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    sample_ddim(ConstModel(), sched, noise, ctx, unc, steps=4, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)


def test_noise_from_shape_and_generator():
    _, ctx, unc = _args()
    sched = Schedule.from_config(VC2_SCHEDULE)
    shape = (2, 4, 3, 4, 6)
    a = sample_ddim(ConstModel(), sched, None, ctx, unc, shape=shape, steps=2, eta=0.0,
                    generator=torch.Generator().manual_seed(3))
    b = sample_ddim(ConstModel(), sched, torch.randn(shape, generator=torch.Generator().manual_seed(3)),
                    ctx, unc, steps=2, eta=0.0)
    assert a.shape == shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        sample_ddim(ConstModel(), sched, None, ctx, unc, steps=2)


def test_image_context_batched_and_checked():
    noise, ctx, unc = _args()
    img, unc_img = torch.randn(2, 3, 8), torch.zeros(1, 3, 8)
    sched = Schedule.from_config(VC2_SCHEDULE)
    model = ConstModel()
    sample_ddim(model, sched, noise, ctx, unc, image_context=img, uncond_image_context=unc_img,
                fps=torch.tensor([8, 9]), steps=2, eta=0.0)
    call = model.calls[0]
    assert call["n"] == 4 and call["fps"].tolist() == [8, 9, 8, 9]
    assert torch.equal(call["image"][:2], img) and torch.equal(call["image"][2:], unc_img.expand(2, 3, 8))
    with pytest.raises(ValueError, match="uncond_image_context"):
        sample_ddim(ConstModel(), sched, noise, ctx, unc, image_context=img, steps=2)


def test_callback_can_abort():
    noise, ctx, unc = _args()

    class Stop(Exception):
        pass

    def cb(i, total, x, x0):
        if i == 1:
            raise Stop

    model = ConstModel()
    with pytest.raises(Stop):
        sample_ddim(model, Schedule.from_config(VC2_SCHEDULE), noise, ctx, unc, steps=10, callback=cb)
    assert len(model.calls) == 2
