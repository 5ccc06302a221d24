"""Every official golden fixture, reproduced through the public API (config_from_official + build).

Tolerances are the fixture README's: module outputs max|a-b| <= 1e-4 + 1e-4*max|ref|; DDIM latents 2e-3.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vc_model

FIXTURES = Path(__file__).parent / "fixtures"
DATA_PREFIXES = ("input.", "output.", "intermediate.", "aux.")
TEXT_CONTEXT_LEN = 77  # official CrossAttention.text_context_len: I2V context = 77 text + image tokens


def load_case(name):
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    weights = {k: v for k, v in tensors.items() if not k.startswith(DATA_PREFIXES)}
    data = {k: v for k, v in tensors.items() if k.startswith(DATA_PREFIXES)}
    return meta, weights, data


def official_params(meta):
    """The `model.params`-style block each fixture JSON carries."""
    if "latent_diffusion_config" in meta:
        return meta["latent_diffusion_config"]["params"]
    keys = ("unet_config", "first_stage_config", "cond_stage_config", "cond_img_config", "scale_factor")
    return {k: meta[k] for k in keys if k in meta}


def build_case(name, dtype=torch.float32):
    meta, weights, data = load_case(name)
    archs = {}
    if "open_clip_arch_registered" in meta:
        for key in ("cond_stage_config", "cond_img_config"):
            if key in meta:
                archs[meta[key]["params"]["arch"]] = meta["open_clip_arch_registered"]
    config = vc_model.config_from_official(official_params(meta), open_clip_archs=archs)
    return vc_model.build(weights, config=config, dtype=dtype), data


def close(actual, ref, rel=1e-4, abs_=1e-4):
    diff = (actual.float() - ref.float()).abs().max().item()
    bound = abs_ + rel * ref.abs().max().item()
    assert diff <= bound, f"max diff {diff:.3g} > {bound:.3g}"
    return diff


@pytest.mark.parametrize("case", ["t2v_unet_v1", "t2v_unet_v2"])
def test_unet_eps(case):
    bundle, d = build_case(case)
    assert bundle.vae is None and bundle.text_encoder is None
    with torch.no_grad():
        eps = bundle.unet(d["input.x"], d["input.timesteps"], d["input.context"], fps=d["input.fps"])
    close(eps, d["output.eps"])


def test_i2v_unet_eps_with_text_and_image_tokens():
    bundle, d = build_case("i2v_unet")
    assert bundle.config.unet.image_attention and bundle.image_encoder is None
    context = d["input.context"]
    assert context.shape[1] == TEXT_CONTEXT_LEN + 16
    with torch.no_grad():
        eps = bundle.unet(d["input.x"], d["input.timesteps"], context[:, :TEXT_CONTEXT_LEN], fps=d["input.fps"],
                          image_context=context[:, TEXT_CONTEXT_LEN:])
    close(eps, d["output.eps"])


def test_image_embedder_tokens():
    bundle, d = build_case("image_embedder")
    assert bundle.unet is None and bundle.config.image_encoder.resampler.num_queries == 16
    with torch.no_grad():
        close(bundle.image_encoder(d["input.image"]), d["output.image_emb"])
        close(bundle.image_encoder.unconditional(1), d["output.image_emb_uncond"])


def test_vae_encode_decode():
    bundle, d = build_case("vae")
    assert bundle.unet is None
    with torch.no_grad():
        close(bundle.vae.encode(d["input.video"]), d["output.latent_mean_scaled"])
        close(bundle.vae.decode(d["input.z"]), d["output.decoded"])


def test_text_encoder_tokens_and_embeddings():
    bundle, d = build_case("text_encoder")
    meta = json.loads((FIXTURES / "text_encoder.json").read_text())
    tokens = bundle.text_encoder.tokenize(meta["prompts"])
    assert torch.equal(tokens, d["input.tokens"])
    with torch.no_grad():
        close(bundle.text_encoder(meta["prompts"]), d["output.text_emb"])


def test_ddim_with_use_scale_end_to_end():
    bundle, d = build_case("ddim_scale")
    assert bundle.config.schedule.use_scale and bundle.config.schedule.scale_b == pytest.approx(0.7)
    steps_seen = []
    with torch.no_grad():
        x0 = vc_model.sample_ddim(
            bundle.unet, bundle.schedule, d["input.x_T"], d["input.cond_c_crossattn"], d["input.uncond_c_crossattn"],
            fps=d["input.fps"], steps=5, cfg=7.5, eta=0.0,
            callback=lambda i, total, x, pred_x0: steps_seen.append(x.clone()),
        )
    assert len(steps_seen) == 5
    for i, x in enumerate(steps_seen):
        assert (x - d["intermediate.x_inter"][i]).abs().max().item() <= 2e-3
    assert (x0 - d["output.x0"]).abs().max().item() <= 2e-3
