"""Injectable operations and attention: every weight comes from `ops`, every attention product goes
through the injected function, and the official fixtures hold with other ops (manual cast)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import vc_model
from vc_model import attention as attention_module
from vc_model.attention import sdpa_attention
from vc_model.config import ResamplerConfig
from vc_model.image_encoder import ClipVision
from vc_model.resampler import Resampler
from vc_model.sampling import sample_ddim
from vc_model.schedule import Schedule
from vc_model.unet import UNet3D
from vc_model.vae import VideoVAE

from test_unet import call, close, load_case, unet_config
from test_vae import vae_config

FIXTURES = Path(__file__).parent / "fixtures"
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm)
# Parameters of non-leaf (or non-ops) modules, cast to the input's dtype and device where used.
CAST_AT_USE = ("embeddings_table", "latents", "class_embedding", "positional_embedding", "proj")


def cast_ops(storage: torch.dtype):
    """A stand-in for ComfyUI's manual-cast ops: plain torch layers whose weights are stored in
    `storage` and cast to the input's dtype and device at every call. A weight read anywhere else
    meets a `storage` tensor and fails (dtype mismatch)."""

    def w(layer, x):
        return (None if layer.weight is None else layer.weight.to(x.device, x.dtype),
                None if layer.bias is None else layer.bias.to(x.device, x.dtype))

    class Linear(nn.Linear):
        def forward(self, x):
            return F.linear(x, *w(self, x))

    class Conv1d(nn.Conv1d):
        def forward(self, x):
            return self._conv_forward(x, *w(self, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, *w(self, x))

    class Conv3d(nn.Conv3d):
        def forward(self, x):
            return self._conv_forward(x, *w(self, x))

    class GroupNorm(nn.GroupNorm):
        def forward(self, x):
            return F.group_norm(x, self.num_groups, *w(self, x), self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, *w(self, x), self.eps)

    return type("CastOps", (), dict(Linear=Linear, Conv1d=Conv1d, Conv2d=Conv2d, Conv3d=Conv3d,
                                    GroupNorm=GroupNorm, LayerNorm=LayerNorm, storage=storage))


class SpyOps:
    """Plain torch layers that remember that they came from this namespace."""

    class Linear(nn.Linear):
        spy = True

    class Conv1d(nn.Conv1d):
        spy = True

    class Conv2d(nn.Conv2d):
        spy = True

    class Conv3d(nn.Conv3d):
        spy = True

    class GroupNorm(nn.GroupNorm):
        spy = True

    class LayerNorm(nn.LayerNorm):
        spy = True


def assign(module: nn.Module, weights: dict, dtype=torch.float32) -> nn.Module:
    module.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def fixture_unet(case: str, ops=None, attention=None, dtype=torch.float32):
    tensors, params, weights = load_case(case)
    with torch.device("meta"):
        model = UNet3D(unet_config(params), ops=ops, attention=attention)
    return assign(model, weights, dtype), tensors


def layers_not_from(model: nn.Module, namespace) -> list[str]:
    classes = tuple(getattr(namespace, n) for n in ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"))
    return [name for name, m in model.named_modules() if isinstance(m, LAYER_TYPES) and not isinstance(m, classes)]


def params_outside_ops(model: nn.Module, namespace) -> list[str]:
    """Parameters not held by an ops layer, less the documented cast-at-use ones."""
    classes = tuple(getattr(namespace, n) for n in ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"))
    owned = {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, classes)
             for p, _ in m.named_parameters(recurse=False)}
    return [k for k, _ in model.named_parameters() if k not in owned and k.rsplit(".", 1)[-1] not in CAST_AT_USE]


def tiny_resampler(ops=None, attention=None) -> Resampler:
    torch.manual_seed(0)
    cfg = ResamplerConfig(dim=48, depth=2, dim_head=16, heads=3, num_queries=4, embedding_dim=32, output_dim=24, ff_mult=2)
    return Resampler(cfg, ops, attention).eval().requires_grad_(False)


# ---------------------------------------------------------------------------- every layer from ops

@pytest.mark.parametrize("case", ["t2v_unet_v1", "t2v_unet_v2"])
def test_every_unet_layer_comes_from_ops(case):
    params = load_case(case)[1]
    for cfg in (unet_config(params), unet_config(params, image_attention=True)):
        with torch.device("meta"):
            model = UNet3D(cfg, ops=SpyOps)
        kinds = {type(m).__name__ for m in model.modules() if getattr(m, "spy", False)}
        assert kinds >= {"Linear", "Conv2d", "GroupNorm", "LayerNorm"}
        assert ("Conv1d" in kinds) == cfg.init_attn and ("Conv3d" in kinds) == cfg.temporal_conv
        assert layers_not_from(model, SpyOps) == []
        assert params_outside_ops(model, SpyOps) == []


def test_every_resampler_vae_and_clip_stem_layer_comes_from_ops():
    with torch.device("meta"):
        resampler = tiny_resampler(SpyOps)
        vae = VideoVAE(vc_model.tiny_config().vae, ops=SpyOps)
        clip = ClipVision(vc_model.tiny_config(i2v=True).image_encoder, ops=SpyOps)
    for model in (resampler, vae):
        assert layers_not_from(model, SpyOps) == [] and params_outside_ops(model, SpyOps) == []
    assert any(getattr(m, "spy", False) for m in vae.modules())
    # The stem and norms; the open_clip blocks are open_clip's own layers.
    assert all(getattr(m, "spy", False) for m in (clip.conv1, clip.ln_pre, clip.ln_post))


# ---------------------------------------------------------------------------- other ops, same results

@pytest.mark.parametrize("case", ["t2v_unet_v1", "t2v_unet_v2"])
def test_fixture_parity_with_manual_cast_ops(case):
    """Weights stored in float64 and cast to the float32 input per call: the official fp32 fixture
    still holds, and nothing read a weight around the ops (that would have mixed dtypes)."""
    model, tensors = fixture_unet(case, ops=cast_ops(torch.float64), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    eps = call(model, tensors)
    assert eps.dtype == torch.float32
    ok, err = close(eps, tensors["output.eps"])
    assert ok, f"eps max diff {err}"


@pytest.mark.parametrize("case", ["t2v_unet_v1", "t2v_unet_v2"])
def test_half_weights_with_manual_cast_compute_in_input_dtype(case):
    """bfloat16 storage, float32 compute (ComfyUI's manual cast): as accurate as float32 compute
    with bf16-rounded weights, far better than bf16 compute."""
    model, tensors = fixture_unet(case, ops=cast_ops(torch.bfloat16), dtype=torch.bfloat16)
    eps = call(model, tensors)
    assert eps.dtype == torch.float32
    ref = tensors["output.eps"]
    assert (eps - ref).abs().max() / ref.abs().max() < 4e-2


def test_vae_fixture_with_manual_cast_ops():
    tensors = load_file(FIXTURES / "vae.safetensors")
    cfg = vae_config(json.loads((FIXTURES / "vae.json").read_text()))
    weights = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    with torch.device("meta"):
        model = VideoVAE(cfg, ops=cast_ops(torch.float64))
    model = assign(model, weights, torch.float64)
    with torch.no_grad():  # the modules, in float32 (VideoVAE.decode would hand them float64 frames)
        frames = tensors["input.z"][0].transpose(0, 1) / cfg.scale_factor
        decoded = model.decoder(model.post_quant_conv(frames))
        mean = model.quant_conv(model.encoder(tensors["input.video"][0].transpose(0, 1))).chunk(2, dim=1)[0]
    assert close(decoded, tensors["output.decoded"][0].transpose(0, 1))[0]
    assert close(mean, tensors["intermediate.posterior_mean"][0].transpose(0, 1))[0]


def test_resampler_with_manual_cast_ops_equals_default():
    default = tiny_resampler()
    with torch.device("meta"):
        cast = tiny_resampler(cast_ops(torch.float64))
    cast = assign(cast, default.state_dict(), torch.float64)
    x = torch.randn(2, 257, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cast(x), default(x), rtol=1e-5, atol=1e-6)


def test_default_ops_cast_weights_to_the_input_dtype():
    """`unet(x_float32)` on a bfloat16 U-Net computes in float32 (weights cast per call), and a
    float32 model run on float64 inputs computes in float64."""
    model, tensors = fixture_unet("t2v_unet_v2", dtype=torch.bfloat16)
    eps = call(model, tensors)
    assert eps.dtype == torch.float32
    ref = tensors["output.eps"]
    assert (eps - ref).abs().max() / ref.abs().max() < 4e-2
    model64, _ = fixture_unet("t2v_unet_v2")
    eps64 = call(model64, tensors, torch.float64)
    assert eps64.dtype == torch.float64 and close(eps64, ref)[0]


def test_sample_ddim_hands_the_model_its_own_dtype():
    seen = []

    class Model:
        dtype = torch.bfloat16

        def __call__(self, x, t, context, fps=None, image_context=None):
            seen.append((x.dtype, context.dtype))
            return torch.zeros_like(x)

    schedule = Schedule.from_config(vc_model.tiny_config().schedule)
    context = torch.randn(1, 77, 8)
    out = sample_ddim(Model(), schedule, torch.randn(1, 4, 2, 8, 8), context, context, steps=2, eta=0.0)
    assert out.dtype == torch.float32 and seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    seen.clear()
    sample_ddim(Model(), schedule, torch.randn(1, 4, 2, 8, 8), context, steps=2, eta=0.0, dtype=torch.float16)
    assert set(seen) == {(torch.float16, torch.float16)}


# ---------------------------------------------------------------------------- attention injection

class RecordingAttention:
    """Calls sdpa_attention and records each call's q shape, heads and transformer_options["block"]."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, heads, **kwargs):
        options = kwargs.get("transformer_options")
        self.calls.append((tuple(q.shape), heads, None if options is None else options.get("block")))
        return sdpa_attention(q, k, v, heads, **kwargs)


@pytest.mark.parametrize("case", ["t2v_unet_v1", "t2v_unet_v2"])
def test_every_attention_goes_through_the_injected_function(case):
    recorder = RecordingAttention()
    model, tensors = fixture_unet(case, attention=recorder)
    reference, _ = fixture_unet(case)
    eps = call(model, tensors)
    assert torch.equal(eps, call(reference, tensors))
    layers = [m for m in model.modules() if isinstance(m, attention_module.Attention)]
    assert len(recorder.calls) == len(layers)  # one product per layer (no image branch here)
    blocks = {block for *_, block in recorder.calls}
    assert None not in blocks and ("middle", 0) in blocks  # temporal layers get the options too


def test_image_branch_and_resampler_attention_are_injected():
    params = load_case("t2v_unet_v2")[1]
    recorder = RecordingAttention()
    torch.manual_seed(0)
    model = UNet3D(unet_config(params, image_attention=True), attention=recorder).eval()
    x = torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        model(x, 10, torch.randn(1, 77, 32), image_context=torch.randn(1, 4, 32))
    layers = [m for m in model.modules() if isinstance(m, attention_module.Attention)]
    assert len(recorder.calls) == len(layers) + sum(m.image_attention for m in layers)

    recorder = RecordingAttention()
    resampler = tiny_resampler(attention=recorder)
    x = torch.randn(1, 257, 32)
    with torch.no_grad():
        assert torch.equal(resampler(x), tiny_resampler()(x))
    assert len(recorder.calls) == resampler.cfg.depth
    assert all(shape[0] == 1 for shape, *_ in recorder.calls)


def test_relative_position_attention_scale_with_a_plain_softmax_attention():
    """Another attention function (explicit softmax, default scale): the relative-position layers
    pre-scale q, so VideoCrafter1 still matches its fixture."""

    def softmax_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        b, d = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = ((q @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v
        return out.transpose(1, 2).flatten(2)

    model, tensors = fixture_unet("t2v_unet_v1", attention=softmax_attention)
    ok, err = close(call(model, tensors), tensors["output.eps"])
    assert ok, err


def test_sdpa_attention_slices_large_batches(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 5, 32, generator=gen) for _ in range(3))
    whole = sdpa_attention(q, k, v, 2)
    monkeypatch.setattr(attention_module, "SDPA_BATCH_LIMIT", 3)
    monkeypatch.setattr(attention_module, "SLICED_DEVICES", ("cpu",))
    torch.testing.assert_close(sdpa_attention(q, k, v, 2), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        sdpa_attention(*(t.unflatten(-1, (2, 16)).transpose(1, 2) for t in (q, k, v)), 2, skip_reshape=True,
                       skip_output_reshape=True).transpose(1, 2).flatten(2), whole, rtol=0, atol=1e-6)


# Measured max|eps - ref| / max|ref| with weights stored in fp8 and computed in float32 by manual
# cast (README, "fp8 weights"): v1 0.183 (e4m3fn) / 0.287 (e5m2), v2 0.290 / 0.470.
FP8_ERROR = {("t2v_unet_v1", torch.float8_e4m3fn): 0.183, ("t2v_unet_v1", torch.float8_e5m2): 0.287,
             ("t2v_unet_v2", torch.float8_e4m3fn): 0.290, ("t2v_unet_v2", torch.float8_e5m2): 0.470}


@pytest.mark.parametrize("case,storage", list(FP8_ERROR))
def test_fp8_storage_error_on_the_fixtures(case, storage):
    model, tensors = fixture_unet(case, ops=cast_ops(storage), dtype=storage)
    assert all(p.dtype == storage for p in model.parameters())
    eps = call(model, tensors)
    ref = tensors["output.eps"]
    error = ((eps - ref).abs().max() / ref.abs().max()).item()
    assert torch.isfinite(eps).all() and 0.5 * FP8_ERROR[case, storage] < error < 1.25 * FP8_ERROR[case, storage]
