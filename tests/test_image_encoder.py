"""ImageEncoder (CLIP vision tokens + Resampler) against the official `image_embedder` golden tensors.

The fixture (tests/fixtures/image_embedder.*) was made by the official FrozenOpenCLIPImageEmbedderV2
and the Resampler that LatentVisualDiffusion.init_projector builds, on tiny seeded weights: the
preprocessing (antialiased bicubic squash to 224, CLIP normalisation), all 257 patch tokens of the last
block, the 16 resampled tokens, and the same for the official mid-grey unconditional image.
Tolerance (fixture README): max|a-b| <= 1e-4 + 1e-4 * max|ref|.
"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vc_model
from vc_model.config import ImageEncoderConfig, ResamplerConfig
from vc_model.image_encoder import ImageEncoder, image_encoder_unused_keys, preprocess

FIXTURES = Path(__file__).parent / "fixtures"
CLIP_PREFIX, PROJ_PREFIX = "embedder.model.visual.", "image_proj_model."


def close(actual, ref, rel=1e-4, atol=1e-4):
    """max|a-b| <= atol + rel * max|ref| (the fixture README's bound for float32 module outputs)."""
    assert actual.shape == ref.shape
    diff = (actual.float() - ref.float()).abs().max().item()
    bound = atol + rel * ref.abs().max().item()
    assert diff <= bound, f"max diff {diff:.3g} > {bound:.3g}"
    return diff


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(FIXTURES / "image_embedder.safetensors")
    meta = json.loads((FIXTURES / "image_embedder.json").read_text())
    return tensors, meta


def golden_config(meta) -> ImageEncoderConfig:
    """The fixture's tower from its open_clip arch, its resampler from the official init_projector call."""
    arch = meta["cond_img_config"]["params"]["arch"]
    official = vc_model.config_from_official({"cond_img_config": meta["cond_img_config"]},
                                             open_clip_archs={arch: meta["open_clip_arch_registered"]})
    return replace(official.image_encoder, resampler=ResamplerConfig(**meta["image_proj_model"]["resampler_kwargs"]))


@pytest.fixture(scope="module")
def model(golden):
    """The official weights, assigned the way the loader does (meta device, strict)."""
    tensors, meta = golden
    with torch.device("meta"):
        model = ImageEncoder(golden_config(meta)).eval()
    model.clip.load_state_dict({k[len(CLIP_PREFIX):]: v for k, v in tensors.items() if k.startswith(CLIP_PREFIX)},
                               strict=True, assign=True)
    model.resampler.load_state_dict({k[len(PROJ_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJ_PREFIX)},
                                    strict=True, assign=True)
    return model


def images(b=2, h=224, w=224, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# parity with the official code


def test_preprocess_is_the_official_squash(golden):
    tensors, _ = golden
    assert tensors["input.image"].shape[-2:] == (240, 320)  # both axes shrink: antialiasing matters
    close(preprocess(tensors["input.image"], 224), tensors["intermediate.preprocessed"], rel=1e-5, atol=1e-5)


@torch.no_grad()
def test_clip_patch_tokens_match_official(golden, model):
    tensors, _ = golden
    close(model.clip(tensors["input.image"]), tensors["intermediate.image_tokens"])
    close(model.clip(tensors["input.image_uncond"]), tensors["intermediate.image_tokens_uncond"])


@torch.no_grad()
def test_resampler_matches_official(golden, model):
    tensors, _ = golden
    close(model.resampler(tensors["intermediate.image_tokens"]), tensors["output.image_emb"])
    close(model.resampler(tensors["intermediate.image_tokens_uncond"]), tensors["output.image_emb_uncond"])


@torch.no_grad()
def test_image_to_context_tokens_match_official(golden, model):
    tensors, _ = golden
    out = model(tensors["input.image"])
    assert out.shape == (2, 16, 32)  # the official 16 resampler tokens
    close(out, tensors["output.image_emb"])
    assert torch.equal(out, model.resampler(model.clip(tensors["input.image"])))


@torch.no_grad()
def test_unconditional_is_the_official_mid_grey_image(golden, model):
    """Official CFG image = zeros(b, 3, 224, 224) in [-1, 1]."""
    tensors, _ = golden
    assert not tensors["input.image_uncond"].any()
    close(model.unconditional(1), tensors["output.image_emb_uncond"])
    torch.testing.assert_close(model.unconditional(2), model(torch.zeros(2, 3, 224, 224)), rtol=0, atol=0)
    # a zero image of any size squashes to the same constant image
    torch.testing.assert_close(model(torch.zeros(2, 3, 320, 512)), model.unconditional(2), rtol=0, atol=1e-5)


def test_build_reads_the_resampler_sizes_from_the_weights(golden):
    """The YAML does not carry the resampler's sizes; `build` must find the official ones in the weights."""
    tensors, meta = golden
    arch = meta["cond_img_config"]["params"]["arch"]
    config = vc_model.config_from_official({"cond_img_config": meta["cond_img_config"]},
                                           open_clip_archs={arch: meta["open_clip_arch_registered"]})
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output.", "intermediate."))}
    bundle = vc_model.build(weights, config=config)
    assert bundle.config.image_encoder.resampler == golden_config(meta).resampler
    with torch.no_grad():
        close(bundle.image_encoder(tensors["input.image"]), tensors["output.image_emb"])


# ---------------------------------------------------------------------------------------------
# structure


def test_fixture_keys_are_ours_plus_the_unused_text_leftovers(golden, model):
    tensors, meta = golden
    weights = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith(("input.", "output.", "intermediate."))}
    ours = {CLIP_PREFIX + k: tuple(v.shape) for k, v in model.clip.state_dict().items()}
    ours.update({PROJ_PREFIX + k: tuple(v.shape) for k, v in model.resampler.state_dict().items()})
    ours.update(image_encoder_unused_keys(golden_config(meta)))
    assert ours == weights


def test_full_size_keys_match_i2v_manifest():
    manifest = json.loads((FIXTURES / "manifests" / "i2v_512_v1.0.json").read_text())
    expected = {k: tuple(v[0]) for k, v in manifest.items() if k.startswith(("embedder.", "image_proj_model."))}
    cfg = ImageEncoderConfig()
    with torch.device("meta"):
        model = ImageEncoder(cfg)
    got = {CLIP_PREFIX + k: tuple(v.shape) for k, v in model.clip.state_dict().items()}
    got.update({PROJ_PREFIX + k: tuple(v.shape) for k, v in model.resampler.state_dict().items()})
    unused = image_encoder_unused_keys(cfg)
    assert not set(unused) & set(got)
    got.update(unused)
    assert got == expected
    assert sum(k.startswith(PROJ_PREFIX) for k in got) == 51
    assert not list(model.buffers())


@torch.no_grad()
def test_any_input_size_gives_257_tokens(model):
    for h, w in ((224, 224), (320, 512), (100, 150)):
        assert model.clip(images(2, h, w)).shape == (2, 1 + 16 * 16, model.cfg.width)


def test_224_input_is_not_resampled():
    x = images(2, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.equal(preprocess(x, 224), ((x + 1) / 2 - mean) / std)


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
