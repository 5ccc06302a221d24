"""VideoVAE against the official AutoencoderKL golden tensors (tests/fixtures/vae.*)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file

import vc_model
from vc_model.config import VAEConfig
from vc_model.conv import upsample_conv
from vc_model.ops import GroupNorm
from vc_model.vae import VideoVAE, norm

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "first_stage_model."


def vae_config(meta: dict) -> VAEConfig:
    """VAEConfig from the fixture JSON's official first_stage_config."""
    params = {"first_stage_config": meta["first_stage_config"], "scale_factor": meta["scale_factor"]}
    return vc_model.config_from_official(params).vae


def assert_close(out, ref, rel=1e-4, atol=1e-4):
    """max|a-b| <= atol + rel * max|ref| (README tolerance for float32 module outputs)."""
    assert out.shape == ref.shape
    diff = (out.float() - ref.float()).abs().max().item()
    bound = atol + rel * ref.abs().max().item()
    assert diff <= bound, f"max diff {diff:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def fixture():
    tensors = load_file(FIXTURES / "vae.safetensors")
    meta = json.loads((FIXTURES / "vae.json").read_text())
    return tensors, meta


@pytest.fixture(scope="module")
def vae(fixture):
    tensors, meta = fixture
    with torch.device("meta"):
        model = VideoVAE(vae_config(meta)).eval()
    weights = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def frames_of(video):
    return rearrange(video, "b c t h w -> (b t) c h w")


@torch.no_grad()
def test_posterior(fixture, vae):
    tensors, _ = fixture
    mean, logvar = vae.posterior(frames_of(tensors["input.video"]))
    assert_close(mean, frames_of(tensors["intermediate.posterior_mean"]))
    assert_close(logvar, frames_of(tensors["intermediate.posterior_logvar"]))


@torch.no_grad()
def test_encode_mean(fixture, vae):
    tensors, _ = fixture
    assert_close(vae.encode(tensors["input.video"]), tensors["output.latent_mean_scaled"])


@torch.no_grad()
def test_encode_sample_fixed_noise(fixture, vae):
    tensors, _ = fixture
    video, ref = tensors["input.video"], tensors["output.latent_sample_scaled"]
    noise = rearrange(tensors["input.posterior_noise"], "(b t) c h w -> b c t h w", b=video.shape[0])
    assert_close(vae.encode(video, sample=True, noise=noise), ref)
    # the same sample by hand from posterior()
    mean, logvar = vae.posterior(frames_of(video))
    by_hand = vae.cfg.scale_factor * (mean + torch.exp(0.5 * logvar) * tensors["input.posterior_noise"])
    assert_close(by_hand, frames_of(ref))


@torch.no_grad()
def test_encode_sample_generator(fixture, vae):
    """Noise comes from the generator as one frame-major [(b t), c, h, w] draw, whatever the chunks."""
    tensors, _ = fixture
    video = torch.cat([tensors["input.video"], -tensors["input.video"]])  # B=2, T=3
    b, _, t, height, width = video.shape
    noise = torch.randn(b * t, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(7))
    mean, logvar = vae.posterior(frames_of(video))
    ref = rearrange(vae.cfg.scale_factor * (mean + torch.exp(0.5 * logvar) * noise),
                    "(b t) c h w -> b c t h w", b=b)
    for chunk in (None, 1, 4):
        out = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(7),
                         frames_per_chunk=chunk)
        assert_close(out, ref, rel=2e-5, atol=1e-6)
    other = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(8))
    assert (other - ref).abs().max() > 1e-3


@torch.no_grad()
def test_decode(fixture, vae):
    tensors, _ = fixture
    assert_close(vae.decode(tensors["input.z"]), tensors["output.decoded"])


@torch.no_grad()
def test_chunk_size_does_not_matter(fixture, vae):
    """Chunks of 1..4 frames, including chunks that span two videos of the batch."""
    tensors, _ = fixture
    video = torch.cat([tensors["input.video"], tensors["input.video"].flip(2)])
    z = torch.cat([tensors["input.z"], 0.5 * tensors["input.z"].flip(2)])
    latent, decoded = vae.encode(video), vae.decode(z)
    assert_close(latent[:1], tensors["output.latent_mean_scaled"])
    assert_close(latent[1:], tensors["output.latent_mean_scaled"].flip(2))
    assert_close(decoded[:1], tensors["output.decoded"])
    # oneDNN may pick another kernel for another batch size: float32 rounding noise only
    # (measured <= 3.2e-6 relative).
    for chunk in (1, 2, 4):  # 2 and 4 span the two videos
        assert_close(vae.encode(video, frames_per_chunk=chunk), latent, rel=2e-5, atol=1e-6)
        assert_close(vae.decode(z, frames_per_chunk=chunk), decoded, rel=2e-5, atol=1e-6)


def test_meta_keys_match_release_manifest():
    """The full-size VAE (on the meta device) has exactly the checkpoint's keys and shapes."""
    manifest = json.loads((FIXTURES / "manifests" / "t2v_512_v2.0.json").read_text())
    expected = {k[len(PREFIX):]: list(v[0]) for k, v in manifest.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = VideoVAE(VAEConfig())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len(got) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_attn_resolutions_placement():
    """Attention after every ResnetBlock of the levels whose resolution is listed (official layout)."""
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(32,), resolution=64)
    model = VideoVAE(cfg)
    keys = {k.rsplit(".", 2)[0] for k in model.state_dict() if ".attn." in k}
    assert keys == {"encoder.down.1.attn.0", "encoder.down.1.attn.1",
                    "decoder.up.1.attn.0", "decoder.up.1.attn.1", "decoder.up.1.attn.2"}
    assert model.state_dict()["decoder.up.1.attn.0.q.weight"].shape == (64, 64, 1, 1)
    with torch.no_grad():
        latent = model.encode(torch.rand(1, 3, 2, 16, 24) * 2 - 1)
        assert latent.shape == (1, 4, 2, 4, 6)
        assert model.decode(latent).shape == (1, 3, 2, 16, 24)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_nearest_then_conv(channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 7, generator=gen)
    weight, bias = torch.randn(6, 8, 3, 3, generator=gen), torch.randn(6, generator=gen)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = upsample_conv(x.contiguous(memory_format=fmt), weight, bias)
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, ref, rel=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@torch.no_grad()
def test_group_norm_channels_last_large_mean(dtype, offset):
    """PyTorch's CPU channels-last GroupNorm cancels when mean >> std; ours stays as exact as NCHW."""
    gen = torch.Generator().manual_seed(0)
    layer = GroupNorm(32, 64, eps=1e-6).to(dtype)
    x = (torch.randn(2, 64, 24, 40, generator=gen) + offset).to(dtype)
    ref = F.silu(F.group_norm(x.double(), 32, layer.weight.double(), layer.bias.double(), 1e-6))
    out = norm(layer, x.contiguous(memory_format=torch.channels_last), act=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    error = (out.double() - ref).abs().max().item()
    assert error <= (1e-5 if dtype == torch.float32 else 3e-2)
