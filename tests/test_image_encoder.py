"""ImageEncoder (CLIP vision tokens + Resampler). No official golden tensors exist for this path,
so behaviour is pinned against the spec (section 4.2-4.4) and small independent references."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vc_model.config import ImageEncoderConfig, ResamplerConfig, TextEncoderConfig
from vc_model.image_encoder import ImageEncoder, image_encoder_unused_keys, preprocess

FIXTURES = Path(__file__).parent / "fixtures"
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def tiny_config() -> ImageEncoderConfig:
    """ViT with the real patch/image size (257 tokens), tiny widths; output_dim != dim on purpose."""
    return ImageEncoderConfig(
        width=32, layers=2, heads=2, patch_size=14, image_size=224, embed_dim=16,
        text=TextEncoderConfig(width=32, heads=2, layers=1, embed_dim=16),
        resampler=ResamplerConfig(dim=48, depth=2, dim_head=16, heads=3, num_queries=4,
                                  embedding_dim=32, output_dim=24, ff_mult=2),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = ImageEncoder(tiny_config()).eval()
    with torch.no_grad():  # no parameter at a trivial value (zero biases, unit norm weights)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
    return model


def images(b=2, h=224, w=224, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# independent references


def gaussian_blur(x, sigmas):
    """Separable Gaussian blur, reflect padding, odd kernel int(max(4 sigma, 3)) (kornia's antialias)."""
    b, c = x.shape[:2]
    for axis, sigma in enumerate(sigmas):  # 0: height, 1: width
        size = int(max(4 * sigma, 3))
        size += 1 - size % 2
        t = torch.arange(size, dtype=torch.float64) - size // 2
        kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).float()
        r = size // 2
        if axis == 0:
            x, kernel = F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, size, 1)
        else:
            x, kernel = F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, size)
        x = F.conv2d(x.reshape(b * c, 1, *x.shape[2:]), kernel)
        x = x.reshape(b, c, *x.shape[2:])
    return x


def reference_preprocess(x, size=224):
    h, w = x.shape[-2:]
    factors = (h / size, w / size)
    if max(factors) > 1:
        x = gaussian_blur(x, [max((f - 1) / 2, 0.001) for f in factors])
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    return ((x + 1) / 2 - MEAN) / STD


def layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def attention(q, k, v, heads, scale_each):
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))  # b n h d
    logits = torch.einsum("bihd,bjhd->bhij", q * scale_each, k * scale_each)
    out = torch.einsum("bhij,bjhd->bihd", logits.float().softmax(-1), v)
    return out.flatten(-2)


def reference_clip(clip, pixels):
    """ViT forward from the spec: patches -> [cls; tokens] + pos -> ln_pre -> blocks, no ln_post."""
    cfg, p = clip.cfg, clip.cfg.patch_size
    patches = pixels.unfold(2, p, p).unfold(3, p, p)  # b c gh gw p p
    patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # b (gh gw) (c p p)
    x = patches @ clip.conv1.weight.flatten(1).T
    x = torch.cat([clip.class_embedding.expand(x.shape[0], 1, -1), x], 1) + clip.positional_embedding
    x = layer_norm(x, clip.ln_pre)
    d = cfg.width // cfg.heads
    for blk in clip.transformer.resblocks:
        q, k, v = (layer_norm(x, blk.ln_1) @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, -1)
        x = x + attention(q, k, v, cfg.heads, d ** -0.25) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        h = layer_norm(x, blk.ln_2) @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    return x


def reference_resampler(r, x):
    """The official Resampler math, written with einsum: q, k scaled by dim_head^-1/4, fp32 softmax."""
    cfg = r.cfg
    x = x @ r.proj_in.weight.T + r.proj_in.bias
    latents = r.latents.expand(x.shape[0], -1, -1)
    for attn, ff in r.layers:
        xs, ls = layer_norm(x, attn.norm1), layer_norm(latents, attn.norm2)
        q = ls @ attn.to_q.weight.T
        k, v = (torch.cat([xs, ls], 1) @ attn.to_kv.weight.T).chunk(2, -1)
        latents = latents + attention(q, k, v, cfg.heads, cfg.dim_head ** -0.25) @ attn.to_out.weight.T
        h = layer_norm(latents, ff[0]) @ ff[1].weight.T
        latents = latents + F.gelu(h) @ ff[3].weight.T
    return layer_norm(latents @ r.proj_out.weight.T + r.proj_out.bias, r.norm_out)


# ---------------------------------------------------------------------------------------------
# structure


def test_full_size_keys_match_i2v_manifest():
    manifest = json.loads((FIXTURES / "manifests" / "i2v_512_v1.0.json").read_text())
    expected = {k: tuple(v[0]) for k, v in manifest.items() if k.startswith(("embedder.", "image_proj_model."))}
    cfg = ImageEncoderConfig()
    with torch.device("meta"):
        model = ImageEncoder(cfg)
    got = {"embedder.model.visual." + k: tuple(v.shape) for k, v in model.clip.state_dict().items()}
    got.update({"image_proj_model." + k: tuple(v.shape) for k, v in model.resampler.state_dict().items()})
    unused = image_encoder_unused_keys(cfg)
    assert not set(unused) & set(got)
    got.update(unused)
    assert got == expected
    assert sum(k.startswith("image_proj_model.") for k in got) == 51
    assert not list(model.buffers())


@torch.no_grad()
def test_meta_build_then_assign_runs(model):
    with torch.device("meta"):
        fresh = ImageEncoder(model.cfg)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    x = images(1)
    assert torch.equal(fresh(x), model(x))


@torch.no_grad()
def test_shapes(model):
    for h, w in ((224, 224), (320, 512), (100, 150)):
        tokens = model.clip(images(2, h, w))
        assert tokens.shape == (2, 1 + 16 * 16, 32)
    assert model(images(3)).shape == (3, 4, 24)


# ---------------------------------------------------------------------------------------------
# preprocessing


def test_normalisation_constants():
    values = torch.tensor([-1.0, 0.0, 0.6]).view(1, 3, 1, 1)
    out = preprocess(values.expand(1, 3, 224, 224), 224)
    expected = ((values + 1) / 2 - MEAN) / STD
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-6)
    grey = preprocess(torch.zeros(1, 3, 224, 224), 224)[0, :, 0, 0]
    torch.testing.assert_close(grey, torch.tensor([0.06904, 0.16139, 0.33284]), rtol=0, atol=1e-5)


def test_224_input_is_not_resampled():
    x = images(2, 224, 224)
    assert torch.equal(preprocess(x, 224), ((x + 1) / 2 - MEAN) / STD)


@pytest.mark.parametrize("h, w", [(320, 512), (448, 300), (100, 150)])
def test_resize_is_antialiased_bicubic_squash(h, w):
    x = images(1, h, w)
    torch.testing.assert_close(preprocess(x, 224), reference_preprocess(x), rtol=0, atol=2e-5)


@torch.no_grad()
def test_squash_keeps_the_whole_image(model):
    """A 224x448 image: its left quarter must land in the left quarter of the CLIP input (a centre
    crop would drop it), and must influence the tokens."""
    dark = -torch.ones(1, 3, 224, 448)
    bright = dark.clone()
    bright[..., :112] = 1
    pre_dark, pre_bright = preprocess(dark, 224), preprocess(bright, 224)
    changed = (pre_bright - pre_dark).abs().amax(dim=(0, 1, 2)) > 1e-3  # per output column
    assert changed[:54].all() and not changed[60:].any()
    right = dark.clone()
    right[..., -112:] = 1
    changed = (preprocess(right, 224) - pre_dark).abs().amax(dim=(0, 1, 2)) > 1e-3
    assert changed[-54:].all() and not changed[:-60].any()
    tokens = model.clip(torch.cat([dark, bright, right]))
    assert not torch.allclose(tokens[0], tokens[1]) and not torch.allclose(tokens[0], tokens[2])


# ---------------------------------------------------------------------------------------------
# math


@torch.no_grad()
def test_clip_tokens_match_reference(model):
    for x in (images(2, 224, 224), images(1, 320, 512)):
        out = model.clip(x)
        ref = reference_clip(model.clip, reference_preprocess(x))
        err = (out - ref).abs().max().item()
        print(f"clip tokens vs einsum reference: max|diff| = {err:.3g} (max|ref| {ref.abs().max():.3g})")
        assert err <= 1e-4 + 1e-4 * ref.abs().max()


@torch.no_grad()
def test_clip_tokens_match_open_clip_blocks(model):
    """Cross-check with open_clip's own ViT (same state dict), last block output before ln_post."""
    from open_clip.transformer import VisionTransformer

    cfg = model.clip.cfg
    visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                               layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                               output_dim=cfg.embed_dim)
    if not hasattr(visual, "forward_intermediates"):
        pytest.skip("open_clip without forward_intermediates")
    visual.load_state_dict(model.clip.state_dict(), strict=True)
    x = images(2)
    out = visual.forward_intermediates(preprocess(x, 224), indices=1, output_fmt="NLC",
                                       intermediates_only=True, output_extra_tokens=True)
    ref = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
    torch.testing.assert_close(model.clip(x), ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_resampler_matches_einsum_reference(model):
    tokens = torch.randn(2, 257, 32, generator=torch.Generator().manual_seed(3))
    out = model.resampler(tokens)
    ref = reference_resampler(model.resampler, tokens)
    err = (out - ref).abs().max().item()
    print(f"resampler vs einsum reference: max|diff| = {err:.3g} (max|ref| {ref.abs().max():.3g})")
    assert out.shape == (2, 4, 24)
    assert err <= 1e-4 + 1e-4 * ref.abs().max()


@torch.no_grad()
def test_forward_is_resampler_of_clip(model):
    x = images(2, 320, 512)
    assert torch.equal(model(x), model.resampler(model.clip(x)))


@torch.no_grad()
def test_mid_grey_unconditional(model):
    """Official CFG image = zeros(b, 3, 224, 224) in [-1, 1], a uniform 0.5 grey after (x+1)/2."""
    official = model(torch.zeros(2, 3, 224, 224))
    torch.testing.assert_close(model.unconditional(2), official, rtol=0, atol=0)
    # a zero image of any size squashes to the same constant image
    torch.testing.assert_close(model(torch.zeros(2, 3, 320, 512)), official, rtol=0, atol=1e-5)
    grey = ((torch.full((1, 3, 224, 224), 0.5) - MEAN) / STD)
    ref = reference_resampler(model.resampler, reference_clip(model.clip, grey))
    torch.testing.assert_close(official, ref.expand_as(official), rtol=0, atol=1e-4)
    assert not torch.allclose(official, model(images(2)))


@torch.no_grad()
@pytest.mark.parametrize("dtype, rel_bound", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_half_precision_close_to_float32(model, dtype, rel_bound):
    half = ImageEncoder(model.cfg).to(dtype).eval()
    half.load_state_dict(model.state_dict())
    x = images(2, 320, 512)
    ref_tokens, ref = model.clip(x), model(x)
    tokens, out = half.clip(x), half(x)
    assert tokens.dtype == out.dtype == dtype
    for name, a, b in (("clip tokens", tokens, ref_tokens), ("resampler output", out, ref)):
        err = (a.float() - b).abs().max().item()
        print(f"{dtype} {name}: max|diff| = {err:.3g}, relative {err / b.abs().max():.3g}")
        assert err <= rel_bound * b.abs().max()
