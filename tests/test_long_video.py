"""Long videos end to end on tiny models: the U-Net's FreeNoise windows against an independent einsum
reference, per-frame (prompt-travel) conditioning, and the sampler, pipeline and command-line plumbing.

The reference below is written from the FreeNoise method (official code AILab-CVC/FreeNoise), with plain
einsums and its own window list and weights; it shares no code with vc_model's attention or freenoise.
"""
from __future__ import annotations

import copy

import av
import pytest
import torch
from einops import rearrange
from torch import nn

import vc_model
from vc_model import cli
from vc_model.attention import Attention, SpatialTransformer
from vc_model.config import tiny_config
from vc_model.freenoise import travel_embeddings

H = W_LAT = 8  # latent size of the tiny U-Nets (two downsamplings)


# ---- the independent reference ---------------------------------------------------------------------


def reference_windows(frames: int, window: int, stride: int) -> list[int]:
    """Window starts: every `stride` frames up to frames - window, then one ending at the last frame."""
    if frames <= window:
        return [0]
    starts = []
    s = 0
    while s + window <= frames:
        starts.append(s)
        s += stride
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


class ReferenceTemporalAttention(nn.Module):
    """FreeNoise's windowed temporal self-attention with einsums, on an `Attention`'s weights."""

    def __init__(self, attn: Attention, window: int, stride: int):
        super().__init__()
        self.attn, self.window, self.stride = attn, window, stride

    def forward(self, x, context=None, image_context=None, **ignored):
        a = self.attn
        heads, frames = a.heads, x.shape[1]
        q, k, v = (rearrange(layer(x), "b n (h d) -> (b h) n d", h=heads) for layer in (a.to_q, a.to_k, a.to_v))
        scale = q.shape[-1] ** -0.5
        length = min(self.window, frames)
        value = torch.zeros_like(q)
        count = torch.zeros(frames, 1, dtype=q.dtype)
        triangle = torch.tensor([min(j + 1, length - j) for j in range(length)], dtype=q.dtype)[:, None]
        for s in reference_windows(frames, self.window, self.stride):
            qw, kw, vw = q[:, s:s + length], k[:, s:s + length], v[:, s:s + length]
            sim = torch.einsum("bid,bjd->bij", qw, kw) * scale
            if a.relative_position_k is not None:
                m = a.relative_position_k.max_distance
                offset = (torch.arange(length)[None, :] - torch.arange(length)[:, None]).clamp(-m, m) + m
                sim = sim + torch.einsum("bid,ijd->bij", qw, a.relative_position_k.embeddings_table[offset]) * scale
            p = sim.softmax(dim=-1)
            out = torch.einsum("bij,bjd->bid", p, vw)
            if a.relative_position_v is not None:
                out = out + torch.einsum("bij,ijd->bid", p, a.relative_position_v.embeddings_table[offset])
            value[:, s:s + length] += out * triangle
            count[s:s + length] += triangle
        out = rearrange(value / count, "(b h) n d -> b n (h d)", h=heads)
        return a.to_out(out)


def with_reference_attention(unet: nn.Module, window: int, stride: int) -> nn.Module:
    """A copy of the U-Net whose temporal attentions are the reference (always windowed)."""
    ref = copy.deepcopy(unet)
    temporal = [(name, m) for name, m in ref.named_modules() if isinstance(m, Attention) and m.temporal]
    assert len(temporal) >= 8  # two per temporal transformer, init_attn included
    for name, module in temporal:
        parent_name, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent_name), child, ReferenceTemporalAttention(module, window, stride))
    return ref


# ---- fixtures ------------------------------------------------------------------------------------------


def tiny_bundle(v1: bool = False, seed: int = 0):
    config = tiny_config(v1=v1)
    return vc_model.build(vc_model.random_state_dict(config, seed=seed), config)


@pytest.fixture(scope="module")
def vc2():
    return tiny_bundle()


@pytest.fixture(scope="module")
def vc1():
    return tiny_bundle(v1=True)


def unet_inputs(frames: int, batch: int = 2, seed: int = 0, dim: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, H, W_LAT, generator=g)
    context = torch.randn(batch, 7, dim, generator=g)
    return x, torch.tensor([500, 20][:batch]), context


# ---- windowed attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("v1", [False, True], ids=["vc2", "vc1-relpos"])
@pytest.mark.parametrize("frames,window,stride", [(11, 4, 3), (12, 4, 2), (9, 5, 2)])
def test_windowed_unet_equals_the_einsum_reference(vc1, vc2, v1, frames, window, stride):
    unet = (vc1 if v1 else vc2).unet
    x, t, context = unet_inputs(frames)
    with torch.no_grad():
        ours = unet(x, t, context, fps=8, temporal_window=window, temporal_stride=stride)
        ref = with_reference_attention(unet, window, stride)(x, t, context, fps=8)
        plain = unet(x, t, context, fps=8)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the windows really change the result


@pytest.mark.parametrize("v1", [False, True], ids=["vc2", "vc1-relpos"])
def test_window_as_long_as_the_clip_is_the_plain_model(vc1, vc2, v1):
    unet = (vc1 if v1 else vc2).unet
    for frames, window in [(8, 8), (6, 8)]:
        x, t, context = unet_inputs(frames)
        with torch.no_grad():
            assert torch.equal(unet(x, t, context, fps=8, temporal_window=window), unet(x, t, context, fps=8))


def test_attention_module_windows_match_the_reference_at_several_lengths(vc1):
    attn = next(m for m in vc1.unet.modules() if isinstance(m, Attention) and m.temporal)
    for frames, window, stride in [(16, 16, 4), (20, 16, 4), (23, 16, 4), (64, 16, 4), (10, 3, 3)]:
        x = torch.randn(3, frames, attn.to_q.in_features)
        with torch.no_grad():
            options = {"temporal_window": window, "temporal_stride": stride}
            torch.testing.assert_close(attn(x, transformer_options=options),
                                       ReferenceTemporalAttention(attn, window, stride)(x), rtol=1e-4, atol=1e-5)


def test_comfyui_transformer_options_carry_the_window(vc1):
    x, t, context = unet_inputs(10)
    with torch.no_grad():
        direct = vc1.unet(x, t, context, fps=8, temporal_window=4, temporal_stride=3)
        options = vc1.unet(x, t, context, fps=8, transformer_options={"temporal_window": 4, "temporal_stride": 3})
    assert torch.equal(direct, options)


@pytest.mark.parametrize("v1", [False, True], ids=["vc2", "vc1-relpos"])
def test_windows_go_through_the_injected_attention_function(v1):
    from vc_model.attention import sdpa_attention
    from vc_model.unet import UNet3D

    config = tiny_config(v1=v1)
    lengths = []

    def recording(q, k, v, heads, **kwargs):
        lengths.append((q.shape[0], q.shape[1]))
        return sdpa_attention(q, k, v, heads, **kwargs)

    weights = {k.removeprefix("model.diffusion_model."): v for k, v in vc_model.random_state_dict(config).items()
               if k.startswith("model.diffusion_model.")}
    unet = UNet3D(config.unet, attention=recording).eval()
    unet.load_state_dict(weights)
    x, t, context = unet_inputs(10)
    with torch.no_grad():
        unet(x, t, context, fps=8, temporal_window=4, temporal_stride=3)
    # spatial calls batch the 2 x 10 frames (self-attention) or the 2 videos (cross-attention);
    # temporal calls batch the 2 x h x w positions, with one query per frame
    temporal = [n for rows, n in lengths if rows not in (2 * 10, 2)]
    assert len(lengths) > len(temporal)
    assert set(temporal) == {4}  # every temporal call is one window (with relative positions: same length)
    assert len(temporal) == 3 * 2 * 8  # windows 0, 3, 6 x 2 self-attentions x 8 temporal transformers


def test_spatial_attention_ignores_the_window(vc2):
    attn = next(m for m in vc2.unet.modules() if isinstance(m, Attention) and not m.temporal)
    x = torch.randn(2, 12, attn.to_q.in_features)
    with torch.no_grad():
        assert torch.equal(attn(x, transformer_options={"temporal_window": 4, "temporal_stride": 2}), attn(x))


def test_bad_windows_are_refused_by_the_unet(vc2):
    x, t, context = unet_inputs(6)
    with pytest.raises(ValueError, match="stride"):
        vc2.unet(x, t, context, temporal_window=4, temporal_stride=5)


# ---- per-frame conditioning ------------------------------------------------------------------------------


def test_per_frame_context_reaches_only_its_frame():
    torch.manual_seed(0)
    layer = SpatialTransformer(32, 2, 16, context_dim=24).eval()
    nn.init.normal_(layer.proj_out.weight)  # not zero-initialised
    b, frames = 2, 5
    x = torch.randn(b * frames, 32, 4, 4)
    base = torch.randn(b, 7, 24)
    per_frame = base[:, None].repeat(1, frames, 1, 1)
    with torch.no_grad():
        shared = layer(x, base, frames)
        torch.testing.assert_close(layer(x, per_frame, frames), shared, rtol=1e-5, atol=1e-6)
        changed = per_frame.clone()
        changed[1, 3] = torch.randn(7, 24)  # video 1, frame 3
        out = layer(x, changed, frames)
    diff = (out - shared).abs().flatten(1).amax(1).view(b, frames)
    assert diff[1, 3] > 1e-3
    diff[1, 3] = 0
    assert diff.max() < 1e-6


def test_unet_per_frame_context_and_down_context(vc2):
    x, t, context = unet_inputs(6)
    per_frame = context[:, None].expand(-1, 6, -1, -1)
    other = torch.randn_like(context)
    with torch.no_grad():
        plain = vc2.unet(x, t, context, fps=8)
        torch.testing.assert_close(vc2.unet(x, t, per_frame, fps=8), plain, rtol=1e-4, atol=1e-5)
        # down_context replaces the context of the input and middle blocks only
        mixed = vc2.unet(x, t, other, fps=8, down_context=context)
        assert (mixed - plain).abs().max() > 1e-3 and (mixed - vc2.unet(x, t, other, fps=8)).abs().max() > 1e-3
        torch.testing.assert_close(vc2.unet(x, t, context, fps=8, down_context=context), plain)
    with pytest.raises(ValueError, match="per-frame rows"):
        vc2.unet(x, t, per_frame[:, :4], fps=8)


def test_per_frame_context_under_comfyui_attention_patches(vc2):
    x, t, context = unet_inputs(6)
    per_frame = torch.randn(2, 6, 7, 64)
    seen = []

    def attn2_patch(n, context_, value, extra):
        seen.append(context_.shape)
        return n, context_, value

    with torch.no_grad():
        plain = vc2.unet(x, t, per_frame, fps=8)
        patched = vc2.unet(x, t, per_frame, fps=8, transformer_options={"patches": {"attn2_patch": [attn2_patch]}})
    torch.testing.assert_close(patched, plain, rtol=1e-4, atol=1e-5)
    assert seen and all(shape[0] == 2 * 6 for shape in seen)  # one context row per frame


# ---- sampler, pipeline, command line ------------------------------------------------------------------------


class RecordingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, fps=None, image_context=None, **kwargs):
        self.calls.append(dict(context=context, **kwargs))
        return 0.1 * x


def test_sample_ddim_passes_windows_and_the_prompt_travel_schedule():
    schedule = vc_model.Schedule.from_config(tiny_config().schedule)
    model = RecordingModel()
    frames = 8
    last, uncond = torch.randn(1, 7, 4), torch.zeros(1, 7, 4)
    travel = torch.randn(1, frames, 7, 4)
    vc_model.sample_ddim(model, schedule, torch.randn(1, 4, frames, 2, 2), last, uncond, steps=50, eta=0.0,
                         temporal_window=4, temporal_stride=2, travel_context=travel)
    assert len(model.calls) == 50
    assert all(c["temporal_window"] == 4 and c["temporal_stride"] == 2 for c in model.calls)
    per_frame_steps = [i for i, c in enumerate(model.calls) if c["down_context"] is None]
    assert per_frame_steps == list(range(5, 16))
    call = model.calls[0]
    assert torch.equal(call["context"][0], travel[0])  # cond rows: the per-frame tokens
    assert torch.equal(call["context"][1], uncond[0].expand(frames, 7, 4))  # uncond rows: unchanged per frame
    assert torch.equal(call["down_context"], torch.cat([last, uncond]))  # input/middle blocks: the last prompt


def test_sample_ddim_without_long_video_options_calls_the_model_as_before():
    schedule = vc_model.Schedule.from_config(tiny_config().schedule)
    model = RecordingModel()
    vc_model.sample_ddim(model, schedule, torch.randn(1, 4, 3, 2, 2), torch.randn(1, 7, 4), steps=2, eta=0.0)
    assert all(set(c) == {"context"} for c in model.calls)


def test_generate_reschedules_the_seeds_noise_and_windows_the_unet(vc2):
    kwargs = dict(height=64, width=64, frames=10, steps=2, eta=0.0, seed=11, return_latent=True)
    latent = vc_model.generate(vc2, "a cat", temporal_window=4, temporal_stride=3, **kwargs)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, 10, 8, 8, generator=g)
    noise = vc_model.reschedule_noise(noise, 4, 3, generator=g)
    expected = vc_model.sample_ddim(vc2.unet, vc2.schedule, noise, vc2.text_encoder(["a cat"]), vc2.text_encoder([""]),
                                    fps=vc2.config.fps, steps=2, eta=0.0, temporal_window=4, temporal_stride=3)
    torch.testing.assert_close(latent, expected)
    assert torch.equal(latent, vc_model.generate(vc2, "a cat", temporal_window=4, temporal_stride=3, **kwargs))
    other = vc_model.generate(vc2, "a cat", temporal_window=4, temporal_stride=3, **{**kwargs, "seed": 12})
    assert not torch.allclose(latent, other)


def test_generate_prompt_travel(vc2):
    kwargs = dict(height=64, width=64, frames=8, steps=2, eta=0.0, seed=3, return_latent=True)
    latent = vc_model.generate(vc2, prompt_travel=["a cat", "a dog"], **kwargs)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 8, 8, 8, generator=g)
    travel = travel_embeddings(vc2.text_encoder(["a cat", "a dog"]), 8)[None]
    expected = vc_model.sample_ddim(vc2.unet, vc2.schedule, noise, vc2.text_encoder(["a dog"]), vc2.text_encoder([""]),
                                    fps=vc2.config.fps, steps=2, eta=0.0, travel_context=travel)
    torch.testing.assert_close(latent, expected)
    assert not torch.allclose(latent, vc_model.generate(vc2, "a dog", **kwargs))
    with pytest.raises(ValueError, match="either prompt or prompt_travel"):
        vc_model.generate(vc2, "a cat", prompt_travel=["a", "b"], **kwargs)
    with pytest.raises(ValueError, match="at least 3 frames"):
        vc_model.generate(vc2, prompt_travel=["a", "b", "c"], **{**kwargs, "frames": 2})
    with pytest.raises(ValueError, match="temporal stride"):
        vc_model.generate(vc2, "a cat", temporal_window=4, temporal_stride=0, **kwargs)


def test_demo_long_video_with_prompt_travel_writes_every_frame(tmp_path, capsys):
    out = tmp_path / "long.mp4"
    assert cli.main(["demo", "a cat", "--travel", "a dog", "--frames", "10", "--window", "4", "--stride", "3",
                     "--steps", "2", "--out", str(out)]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10
    err = capsys.readouterr().err
    assert "FreeNoise: temporal windows of 4 frames every 3" in err and "prompt travel through 2 prompts" in err


@pytest.mark.parametrize("extra,words", [(["--stride", "2"], "--stride needs --window"),
                                         (["--window", "4", "--stride", "5"], "--stride must be between 1 and 4"),
                                         (["--window", "0"], "--window must be between")])
def test_long_video_option_mistakes_are_one_sentence(tmp_path, capsys, extra, words):
    assert cli.main(["demo", "--out", str(tmp_path / "x.mp4"), *extra]) == 2
    assert words in capsys.readouterr().err
