"""TextEncoder against the official FrozenOpenCLIPEmbedder golden fixture (tiny weights)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vc_model
from vc_model.config import TextEncoderConfig
from vc_model.text_encoder import EOT_TOKEN, SOT_TOKEN, TextEncoder, tokenize

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "cond_stage_model.model."


def config_from_arch(arch: dict) -> TextEncoderConfig:
    """TextEncoderConfig of the fixture's tiny open_clip arch, read as the official config does."""
    params = {"cond_stage_config": {"params": {"arch": "fixture-arch", "layer": "penultimate"}}}
    return vc_model.config_from_official(params, open_clip_archs={"fixture-arch": arch}).text_encoder


@pytest.fixture(scope="module")
def case():
    meta = json.loads((FIXTURES / "text_encoder.json").read_text())
    tensors = load_file(FIXTURES / "text_encoder.safetensors")
    with torch.device("meta"):
        model = TextEncoder(config_from_arch(meta["open_clip_arch_registered"]))
    weights = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    model.load_state_dict(weights, strict=True, assign=True)
    return meta, tensors, model.eval()


def within_tolerance(a, ref):
    err = (a.float() - ref).abs().max().item()
    return err, err <= 1e-4 + 1e-4 * ref.abs().max().item()


def test_tokens_match_official(case):
    meta, tensors, model = case
    tokens = model.tokenize(meta["prompts"])
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, tensors["input.tokens"])


def test_tokenizer_rules():
    empty, long = tokenize(["", "word " * 200])
    assert empty[:2].tolist() == [SOT_TOKEN, EOT_TOKEN] and not empty[2:].any()  # pad id 0
    assert long.shape == (77,) and long[0] == SOT_TOKEN and long[-1] == EOT_TOKEN and long.all()
    assert tokenize("a cat").shape == (1, 77)


@torch.no_grad()
def test_text_emb_matches_official(case):
    meta, tensors, model = case
    ref = tensors["output.text_emb"]
    for inputs in (meta["prompts"], tensors["input.tokens"]):
        out = model(inputs)
        assert out.shape == ref.shape and out.dtype == torch.float32
        err, ok = within_tolerance(out, ref)
        print(f"text_emb max|diff| = {err:.3g} (max|ref| = {ref.abs().max():.3g})")
        assert ok, err


@torch.no_grad()
def test_penultimate_layer_and_causal_mask(case):
    meta, tensors, model = case
    tokens = tensors["input.tokens"]
    ref = model(tokens)
    last, before_last = model.transformer.resblocks[-1], model.transformer.resblocks[-2]
    # the last block is never run, the one before it is
    for block, used in ((last, False), (before_last, True)):
        saved = block.mlp.c_proj.bias.clone()
        block.mlp.c_proj.bias.add_(1.0)
        assert torch.equal(model(tokens), ref) != used
        block.mlp.c_proj.bias.copy_(saved)
    assert torch.equal(model(tokens), ref)
    # causal: a token changes only its own and later positions
    changed = tokens.clone()
    changed[:, 40] = 1000
    out = model(changed)
    assert torch.equal(out[:, :40], ref[:, :40])
    assert not torch.allclose(out[:, 40:], ref[:, 40:])


@pytest.mark.parametrize("release", ["t2v_512_v2.0", "t2v_512_v1.0", "t2v_1024_v1.0", "i2v_512_v1.0"])
def test_full_size_keys_match_manifest(release):
    manifest = json.loads((FIXTURES / "manifests" / f"{release}.json").read_text())
    expected = {k[len(PREFIX):]: tuple(v[0]) for k, v in manifest.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = TextEncoder(TextEncoderConfig())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len(got) == 294
