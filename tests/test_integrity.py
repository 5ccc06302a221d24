"""Damaged or hand-edited checkpoints: one tensor of the wrong shape or an integer dtype is named, with the
shape the rest of the file (or the detected release) implies, by `vc_model.build`, the headless command and
the loader's validation; NaN or infinite values are named in a warning while the weights are copied.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

import vc_model
from pack_import import pack_module
from test_manifests import manifest, meta_state_dict
from vc_model import cli
from vc_model.config import tiny_config

U = "model.diffusion_model."
REST = "the model the rest of the file describes"


def half(axis: int):
    return lambda t: t.narrow(axis, 0, t.shape[axis] // 2).clone()


def longer(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t[:1]])


@pytest.fixture(scope="module")
def t2v():
    return vc_model.random_state_dict(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def i2v():
    return vc_model.random_state_dict(tiny_config(i2v=True), seed=0)


def damaged(state: dict, key: str, change) -> dict:
    out = dict(state)
    out[key] = change(state[key])
    return out


def refusal(state) -> str:
    with pytest.raises(vc_model.CheckpointError) as info:
        vc_model.build(state, device="meta")
    return str(info.value)


# ---- shapes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,change", [
    (U + "input_blocks.0.0.weight", half(0)),  # the reported case: conv_in with half its output channels
    (U + "input_blocks.0.0.weight", half(1)),  # ... or half its input (latent) channels
    (U + "input_blocks.1.0.in_layers.2.weight", half(0)),  # a tensor the level's width is read from
    (U + "time_embed.0.weight", half(1)),
    (U + "out.2.bias", half(0)),
    (U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", half(1)),  # text context width
    (U + "init_attn.0.proj_in.weight", half(0)),  # where the head width is read
    (U + "output_blocks.2.0.skip_connection.weight", half(1)),
    ("first_stage_model.encoder.conv_in.weight", half(0)),
    ("first_stage_model.decoder.conv_in.weight", half(1)),
    ("first_stage_model.post_quant_conv.weight", half(1)),
    ("cond_stage_model.model.token_embedding.weight", half(0)),  # vocabulary: the tokenizer's, not the file's
    ("cond_stage_model.model.positional_embedding", longer),
    ("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight", half(0)),
    ("alphas_cumprod", half(0)),
    ("scale_arr", half(0)),
    ("scale_arr", lambda t: torch.cat([t, t])),
    ("scale_arr", lambda t: t[None]),
])
def test_one_tensor_of_the_wrong_shape_is_named_with_the_shape_the_rest_implies(t2v, key, change):
    bad = damaged(t2v, key, change)
    assert vc_model.detect_config(bad) == vc_model.detect_config(t2v)  # the rest of the file decides
    message = refusal(bad)
    assert f"'{key}' has shape {list(bad[key].shape)} where {REST} needs {list(t2v[key].shape)}" in message
    assert message.count("has shape") == 1 and "the file is damaged or was modified" in message


@pytest.mark.parametrize("key,change", [
    ("embedder.model.visual.conv1.weight", half(0)),
    ("embedder.model.visual.positional_embedding", half(0)),
    ("embedder.model.visual.transformer.resblocks.1.attn.in_proj_weight", half(1)),
    ("image_proj_model.proj_in.weight", half(1)),
    ("image_proj_model.layers.0.0.to_kv.weight", half(0)),
    ("image_proj_model.norm_out.weight", half(0)),
    ("embedder.model.token_embedding.weight", half(1)),  # an unused leftover: still damaged
    (U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight", half(1)),
])
def test_image_to_video_parts_name_the_damaged_tensor(i2v, key, change):
    bad = damaged(i2v, key, change)
    message = refusal(bad)
    assert f"'{key}' has shape {list(bad[key].shape)} where {REST} needs {list(i2v[key].shape)}" in message


# Sizes only one tensor carries, of tensors nothing reads (kept because the checkpoint has them): cutting
# them gives another consistent model, harmless; every other size is read by majority.
SINGLE_SOURCE = {("cond_stage_model.model.text_projection", 1), ("embedder.model.visual.proj", 1),
                 ("embedder.model.text_projection", 1), ("image_proj_model.latents", 1)}


@pytest.mark.parametrize("model", ["t2v", "i2v"])
def test_no_single_damaged_tensor_changes_the_detected_model(model, request):
    """Tensors of every role and level of the tiny models, cut to half along each axis in turn: detection
    still gives the undamaged model, so the strict check names exactly that tensor (as the examples above show)."""
    state = request.getfixturevalue(model)
    want = vc_model.detect_config(state)
    changed, roles = [], {}
    for key in state:  # the first and last tensor of each role (block numbers aside): every level is covered
        roles.setdefault(re.sub(r"\d+", "#", key), []).append(key)
    for key in sorted({keys[i] for keys in roles.values() for i in (0, -1)}):
        value = state[key]
        for axis in range(value.ndim):
            if value.shape[axis] > 1 and (key, axis) not in SINGLE_SOURCE:
                if vc_model.detect_config(damaged(state, key, half(axis))) != want:
                    changed.append((key, axis))
    assert changed == []


def test_a_damaged_release_names_the_release_and_its_shape():
    shapes = manifest("vc2_t2v_512")
    state = meta_state_dict(shapes)
    key = U + "input_blocks.0.0.weight"
    state[key] = torch.empty(160, 4, 3, 3, device="meta")
    message = refusal(state)
    assert ("'model.diffusion_model.input_blocks.0.0.weight' has shape [160, 4, 3, 3] where VideoCrafter2 T2V 512 "
            "(the release the rest of the file matches) needs [320, 4, 3, 3]") in message


def test_sizes_no_module_can_have_are_a_sentence_not_a_layer_error():
    config = tiny_config()
    broken = config.replace(unet=dataclasses.replace(config.unet, model_channels=16))  # GroupNorm needs 32 groups
    with pytest.raises(vc_model.CheckpointError, match="do not make a working model"):
        vc_model.expected_shapes(broken)


# ---- dtypes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [U + "input_blocks.3.0.in_layers.2.weight", "first_stage_model.quant_conv.bias",
                                 "betas", "scale_arr"])
def test_an_integer_tensor_is_named(t2v, key):
    bad = damaged(t2v, key, lambda t: (t * 100).to(torch.int64))
    message = refusal(bad)
    assert f"'{key}' is stored as int64, but every VideoCrafter weight is floating point" in message
    assert "damaged or was modified" in message


# ---- values ------------------------------------------------------------------------------------------------


def _with_values(state: dict, key: str, values: list[float]) -> dict:
    tensor = state[key].clone()
    tensor.view(-1)[: len(values)] = torch.tensor(values)
    return damaged(state, key, lambda _: tensor)


@pytest.mark.parametrize("suffix,dtype", [(".safetensors", torch.bfloat16), (".ckpt", torch.float32),
                                          (".safetensors", torch.float8_e4m3fn)])
def test_nan_and_inf_values_are_named_in_a_warning(t2v, tmp_path, caplog, suffix, dtype):
    key, other = U + "middle_block.0.in_layers.2.weight", "first_stage_model.decoder.conv_out.weight"
    bad = _with_values(_with_values(t2v, key, [float("nan"), float("inf"), float("nan")]), other, [float("-inf")])
    path = tmp_path / f"nan{suffix}"
    save_file(bad, path) if suffix == ".safetensors" else torch.save({"state_dict": bad}, path)
    with caplog.at_level(logging.WARNING, logger="vc_model"):
        bundle = vc_model.load(path, dtype=dtype)
    warnings = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warnings) == 2, caplog.text  # one per module that has them
    assert any(f"'{key}' (3 values)" in w for w in warnings) and any(f"'{other}' (1 value)" in w for w in warnings)
    assert all("damaged or was modified" in w for w in warnings)
    assert bundle.unet is not None  # a warning: the file still loads


def test_values_a_narrower_dtype_cannot_hold_are_told_apart_from_broken_ones(t2v, tmp_path, caplog):
    key = U + "out.2.weight"
    path = tmp_path / "large.safetensors"
    save_file(_with_values(t2v, key, [1e6]), path)
    with caplog.at_level(logging.WARNING, logger="vc_model"):
        vc_model.load(path, dtype=torch.float16)
    assert f"tensor '{key}' holds values too large for the chosen weight dtype" in caplog.text
    assert "NaN or infinite" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vc_model"):
        vc_model.load(path, dtype=torch.bfloat16)  # bf16 holds 1e6
    assert caplog.text == ""


def test_a_clean_file_gives_no_warning(t2v, tmp_path, caplog):
    path = tmp_path / "clean.safetensors"
    save_file(t2v, path)
    with caplog.at_level(logging.WARNING, logger="vc_model"):
        vc_model.load(path, dtype=torch.bfloat16)
    assert caplog.text == ""


# ---- the headless command and the loader's validation ------------------------------------------------------------


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_headless_command_names_the_damaged_tensor(t2v, tmp_path, capsys):
    key = U + "input_blocks.0.0.weight"
    path = tmp_path / "damaged.ckpt"
    torch.save({"state_dict": damaged(t2v, key, half(0))}, path)
    for argv in (["generate", "a corgi", "--ckpt", path, "--out", tmp_path / "x.mp4", "--steps", "1"],
                 ["convert", path, tmp_path / "x.safetensors"], ["info", path]):
        code, err = _cli(capsys, *argv)
        assert code == 2, err
        assert f"'{key}' has shape [16, 4, 3, 3] where {REST} needs [32, 4, 3, 3]" in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.safetensors").exists()


def test_converting_a_file_with_nan_warns(t2v, tmp_path, capsys, caplog):
    key = U + "out.2.weight"
    path = tmp_path / "nan.ckpt"
    torch.save({"state_dict": _with_values(t2v, key, [float("nan")])}, path)
    with caplog.at_level(logging.WARNING, logger="vc_model"):
        code, err = _cli(capsys, "convert", path)
    assert code == 0, err
    assert f"tensor '{key}' (1 value) holds NaN or infinite values" in caplog.text


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_loader_validation_names_the_damaged_tensor_from_the_header(t2v, tmp_path, suffix):
    """The node's check reads only the header (safetensors) or a memory map (ckpt), dtypes included."""
    check = pack_module("nodes.ckpt_check")
    key, int_key = U + "input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.bias"
    bad = damaged(damaged(t2v, key, half(0)), int_key, lambda t: t.to(torch.int32))
    path = tmp_path / f"damaged{suffix}"
    save_file(bad, path) if suffix == ".safetensors" else torch.save({"state_dict": bad}, path)
    with pytest.raises(ValueError) as info:
        check.inspect_checkpoint(str(path))
    message = str(info.value)
    assert message.startswith(f"In 'damaged{suffix}', tensor '{key}' has shape [16, 4, 3, 3] where {REST} needs "
                              "[32, 4, 3, 3]; tensor 'first_stage_model.encoder.conv_in.bias' is stored as int32")
    assert "damaged or was modified" in message and "num_groups" not in message


def test_a_sum_that_only_overflows_is_no_warning(caplog):
    """The scan sums each tensor in its own dtype; fp16 sums past 65504 of finite values are ruled out."""
    from vc_model.integrity import FiniteScan

    large = torch.full((100,), 1000.0)
    assert torch.isinf(large.half().sum())
    scan = FiniteScan()
    scan.add("large", large.half(), large)
    scan.add("now", large.half(), large, now=True)
    with caplog.at_level(logging.WARNING, logger="vc_model"):
        assert scan.warn({"large": large}) == {}
    assert caplog.text == ""
