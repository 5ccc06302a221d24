"""UNet3D against the official golden fixtures and the released checkpoints' key manifests."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vc_model.attention import Attention, SpatialTransformer, TemporalTransformer, relative_position_attention
import vc_model
from vc_model.config import RELEASES, UNetConfig
from vc_model.unet import UNet3D

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."
INTERMEDIATES = ["time_embed", "fps_embedding", "input_blocks.0", "init_attn", "middle_block"]
TEXT_CONTEXT_LEN = 77  # official CrossAttention.text_context_len: I2V context = 77 text + image tokens


def unet_config(params: dict, **changes) -> UNetConfig:
    """UNetConfig from an official `unet_config.params` dict, with optional field changes."""
    return replace(vc_model.config_from_official({"unet_config": {"params": params}}).unet, **changes)


def load_case(case: str):
    tensors = load_file(FIXTURES / f"{case}.safetensors")
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    weights = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return tensors, meta["unet_config"]["params"], weights


def fixture_model(case: str, dtype=torch.float32):
    """The fixture's U-Net, built the way the loader does: on the meta device, then weights assigned."""
    tensors, params, weights = load_case(case)
    with torch.device("meta"):
        model = UNet3D(unet_config(params)).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    return model, tensors


def call(model, tensors, dtype=torch.float32, **kw):
    """The official call, x and context in `dtype` (the U-Net computes in x's dtype); an I2V context
    [B, 77 + n, D] is split into our text and image contexts."""
    context = tensors["input.context"].to(dtype)
    if context.shape[1] > TEXT_CONTEXT_LEN:
        kw.setdefault("image_context", context[:, TEXT_CONTEXT_LEN:])
        context = context[:, :TEXT_CONTEXT_LEN]
    with torch.no_grad():
        return model(tensors["input.x"].to(dtype), tensors["input.timesteps"], context, fps=tensors["input.fps"], **kw)


def close(a, b, rel=1e-4):
    ref_max = b.abs().max().item()
    err = (a.float() - b.float()).abs().max().item()
    return err <= 1e-4 + rel * ref_max, err


# ---------------------------------------------------------------------------- key layout

@pytest.mark.parametrize("manifest,release", [
    ("t2v_512_v1.0", "vc1_t2v_512"), ("t2v_1024_v1.0", "vc1_t2v_1024"),
    ("t2v_512_v2.0", "vc2_t2v_512"), ("i2v_512_v1.0", "vc1_i2v_512"),
])
def test_release_keys_and_shapes_match_manifest(manifest, release):
    entries = json.loads((FIXTURES / "manifests" / f"{manifest}.json").read_text())
    expected = {k[len(PREFIX):]: list(v[0]) for k, v in entries.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = UNet3D(RELEASES[release].unet)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: s for k, s in got.items() if expected[k] != s} == {}


def test_image_keys_only_in_spatial_cross_attention():
    """The official I2V U-Net (i2v_unet fixture) = the official VC2 one (same dims) + image k/v in spatial attn2."""
    t2v_params, t2v_weights = load_case("t2v_unet_v2")[1:]
    i2v_params, i2v_weights = load_case("i2v_unet")[1:]
    assert unet_config(i2v_params) == unet_config(t2v_params, image_attention=True)
    with torch.device("meta"):
        i2v = UNet3D(unet_config(i2v_params))
    t2v_keys, i2v_keys = set(t2v_weights), set(i2v_weights)
    assert not any("_ip" in k for k in t2v_keys) and t2v_keys <= i2v_keys
    spatial = [n for n, m in i2v.named_modules() if isinstance(m, SpatialTransformer)]
    expected = {f"{n}.transformer_blocks.0.attn2.{p}.weight" for n in spatial for p in ("to_k_ip", "to_v_ip")}
    assert len(spatial) == 7 and i2v_keys - t2v_keys == expected  # 2 + 1 + 4 at these sizes
    assert all(not m.transformer_blocks[0].attn2.image_attention
               for m in i2v.modules() if isinstance(m, TemporalTransformer))


# ---------------------------------------------------------------------------- fp32 parity

@pytest.mark.parametrize("case", ["t2v_unet_v1", "t2v_unet_v2", "i2v_unet"])
def test_fixture_parity(case):
    model, tensors = fixture_model(case)
    got = {}
    for name in INTERMEDIATES:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o))
    eps = call(model, tensors)
    assert eps.shape == tensors["output.eps"].shape and eps.dtype == torch.float32
    ok, err = close(eps, tensors["output.eps"])
    assert ok, f"eps max diff {err}"
    for name in INTERMEDIATES:
        ok, err = close(got[name], tensors[f"intermediate.{name}"])
        assert ok, f"{name} max diff {err}"


def test_cond_uncond_batch_equals_separate_calls():
    model, tensors = fixture_model("t2v_unet_v2")
    x, t, c, fps = (tensors[k] for k in ["input.x", "input.timesteps", "input.context", "input.fps"])
    uncond = torch.randn(c.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, uncond]), fps=torch.cat([fps, fps]))
        cond = model(x, t, c, fps=fps)
        unc = model(x, t, uncond, fps=fps)
    assert close(both, torch.cat([cond, unc]), rel=1e-5)[0]


def test_scalar_timesteps_and_default_fps():
    model, tensors = fixture_model("t2v_unet_v2")
    x, c = tensors["input.x"][:1], tensors["input.context"][:1]
    with torch.no_grad():
        ref = model(x, torch.tensor([500]), c, fps=torch.tensor([16]))
        assert torch.equal(model(x, 500, c), ref)
        assert torch.equal(model(x, torch.tensor(500.0), c, fps=16), ref)
        assert not torch.equal(model(x, 500, c, fps=8), ref)


# ---------------------------------------------------------------------------- attention pieces

def test_relative_position_attention_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    n, d, max_dist = 7, 16, 3  # n > max_dist + 1, so the offsets are clipped
    q, k, v = (torch.randn(5, 2, n, d, generator=gen) for _ in range(3))
    table_k, table_v = (torch.randn(2 * max_dist + 1, d, generator=gen) for _ in range(2))
    idx = (torch.arange(n)[None] - torch.arange(n)[:, None]).clamp(-max_dist, max_dist) + max_dist
    emb_k, emb_v = table_k[idx], table_v[idx]
    logits = (q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, emb_k)) * d ** -0.5
    p = logits.softmax(-1)
    ref = p @ v + torch.einsum("bhij,ijd->bhid", p, emb_v)
    merged = [t.transpose(1, 2).flatten(2) for t in (q, k, v, ref)]  # [B, n, heads*d]
    out = relative_position_attention(*merged[:3], emb_k, emb_v, heads=2)
    torch.testing.assert_close(out, merged[3], atol=1e-5, rtol=1e-5)


def test_image_attention_is_decoupled_and_scaled():
    torch.manual_seed(0)
    attn = Attention(32, 24, heads=2, dim_head=16, image_attention=True).eval()
    x, text, image = torch.randn(3, 40, 32), torch.randn(3, 77, 24), torch.randn(3, 5, 24)

    def manual(scale):
        def sdpa(ctx, to_k, to_v):
            q, k, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in (attn.to_q(x), to_k(ctx), to_v(ctx)))
            return ((q @ k.transpose(-1, -2)) / 4).softmax(-1) @ v
        out = sdpa(text, attn.to_k, attn.to_v) + scale * sdpa(image, attn.to_k_ip, attn.to_v_ip)
        return attn.to_out(out.transpose(1, 2).flatten(2))

    with torch.no_grad():
        for scale in (1.0, 0.5):
            attn.image_scale = scale
            torch.testing.assert_close(attn(x, text, image), manual(scale), atol=1e-5, rtol=1e-5)
        attn.image_scale = 0.0
        assert torch.equal(attn(x, text, image), attn(x, text))


# ---------------------------------------------------------------------------- I2V U-Net

@pytest.fixture(scope="module")
def i2v_pair():
    """The official I2V U-Net and inputs (i2v_unet fixture), and a T2V U-Net with the same weights minus the
    image branch."""
    i2v, tensors = fixture_model("i2v_unet")
    params, weights = load_case("i2v_unet")[1:]
    t2v = UNet3D(unet_config(params, image_attention=False)).eval()
    t2v.load_state_dict({k: v for k, v in weights.items() if "_ip." not in k}, strict=True)
    context = tensors["input.context"]
    return i2v, t2v, tensors["input.x"], context[:, :TEXT_CONTEXT_LEN], context[:, TEXT_CONTEXT_LEN:]


def run(model, x, text, image=None, scale=1.0):
    model.image_scale = scale
    try:
        with torch.no_grad():
            return model(x, torch.tensor([900, 10]), text, fps=8, image_context=image)
    finally:
        model.image_scale = 1.0


def test_i2v_image_scale_zero_equals_text_only_model(i2v_pair):
    i2v, t2v, x, text, image = i2v_pair
    assert torch.equal(run(i2v, x, text, image, scale=0.0), run(t2v, x, text))


def test_i2v_no_image_context_equals_scale_zero(i2v_pair):
    i2v, _, x, text, image = i2v_pair
    assert torch.equal(run(i2v, x, text, None, scale=1.0), run(i2v, x, text, image, scale=0.0))


def test_i2v_image_branch_changes_output(i2v_pair):
    i2v, _, x, text, image = i2v_pair
    out = run(i2v, x, text, image)
    assert out.shape == x.shape
    assert (out - run(i2v, x, text, None)).abs().max() > 1e-3
    assert (out - run(i2v, x, text, image, scale=0.5)).abs().max() > 1e-4


def test_i2v_image_scale_reaches_every_image_attention(i2v_pair):
    i2v = i2v_pair[0]
    i2v.image_scale = 0.25
    layers = [m for m in i2v.modules() if isinstance(m, Attention) and m.image_attention]
    assert len(layers) == 7 and all(m.image_scale == 0.25 for m in layers)
    assert i2v.image_scale == 0.25
    i2v.image_scale = 1.0


def test_i2v_any_text_length_and_shapes(i2v_pair):
    i2v, _, x, text, image = i2v_pair
    out = run(i2v, x, text[:, :10], image[:, :3])
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_image_context_on_text_model_is_an_error(i2v_pair):
    _, t2v, x, text, image = i2v_pair
    with pytest.raises(ValueError):
        run(t2v, x, text, image)


def test_sdpa_context_layout_does_not_change_spatial_result():
    """The spatial cross-attention treats all frames of a video as one query sequence; check it
    against per-frame attention to the repeated context (the official layout)."""
    torch.manual_seed(0)
    attn = Attention(32, 24, heads=2, dim_head=16).eval()
    b, t, n = 2, 3, 10
    x, ctx = torch.randn(b, t * n, 32), torch.randn(b, 7, 24)
    with torch.no_grad():
        folded = attn(x, ctx)
        per_frame = attn(x.reshape(b * t, n, 32), ctx.repeat_interleave(t, dim=0)).reshape(b, t * n, 32)
    torch.testing.assert_close(folded, per_frame, atol=1e-6, rtol=1e-6)
