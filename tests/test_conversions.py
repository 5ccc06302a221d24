"""Common conversions of the released files load: the Hugging Face `model.safetensors` of a release (same keys,
fp32), and U-Net-only files (keys with or without `model.diffusion_model.`, fp16) through `vc_model` and through
Load VideoCrafter U-Net's validation. Other files get the "not a VideoCrafter checkpoint" answer naming what they are.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import vc_model
from pack_import import pack_module
from test_manifests import RELEASE_FILES, manifest, meta_state_dict
from vc_model.checkpoint import COMPONENT_PREFIXES
from vc_model.config import RELEASES, tiny_config

U = COMPONENT_PREFIXES["unet"]
check = pack_module("nodes.ckpt_check")


@pytest.fixture(scope="module")
def t2v():
    return vc_model.random_state_dict(tiny_config(), seed=2)


def unet_only(state: dict, bare: bool, dtype=torch.float16) -> dict:
    return {(k[len(U):] if bare else k): v.to(dtype) for k, v in state.items() if k.startswith(U)}


def test_hugging_face_safetensors_of_a_release_loads_like_the_ckpt(t2v, tmp_path):
    """The Hub's converter writes the ckpt's state dict, same keys in fp32, with metadata {"format": "pt"}."""
    ckpt, converted = tmp_path / "model.ckpt", tmp_path / "model.safetensors"
    torch.save({"state_dict": t2v}, ckpt)
    save_file(t2v, converted, metadata={"format": "pt"})
    from_ckpt, from_st = vc_model.load(ckpt), vc_model.load(converted)
    assert from_st.config == from_ckpt.config
    for name, module in from_st.modules().items():
        theirs = from_ckpt.modules()[name].state_dict()
        assert all(torch.equal(value, theirs[key]) for key, value in module.state_dict().items()), name
    assert repr(check.inspect_checkpoint(str(converted))) == repr(check.inspect_checkpoint(str(ckpt)))


@pytest.mark.parametrize("bare", [True, False], ids=["without prefix", "with prefix"])
def test_unet_only_fp16_file_builds_the_unet_alone(t2v, tmp_path, bare):
    path = tmp_path / "unet.safetensors"
    save_file(unet_only(t2v, bare), path)
    bundle = vc_model.load(path, dtype=torch.float32)
    assert set(bundle.modules()) == {"unet"} and bundle.schedule is not None
    assert bundle.config.unet == tiny_config().unet
    for key, value in bundle.unet.state_dict().items():
        assert torch.equal(value, t2v[U + key].half().float()), key  # exact: fp16 values widened
    assert repr(check.inspect_unet(str(path)).unet) == repr(bundle.config.unet)  # Load VideoCrafter U-Net's check


@pytest.mark.parametrize("bare", [True, False], ids=["without prefix", "with prefix"])
@pytest.mark.parametrize("release", RELEASE_FILES)
def test_a_released_unet_alone_is_named_and_gets_its_release_schedule(release, bare):
    """Without the schedule buffers the U-Net decides: each released U-Net is a different one."""
    shapes = {(k[len(U):] if bare else k): v for k, v in manifest(release).items() if k.startswith(U)}
    config = vc_model.detect_config(meta_state_dict(shapes))
    assert config.name == RELEASES[release].name and config.schedule == RELEASES[release].schedule
    assert config.fps == RELEASES[release].fps and config.vae is None and config.text_encoder is None
    bundle = vc_model.build(meta_state_dict(shapes), device="meta")
    assert set(bundle.modules()) == {"unet"} and bundle.schedule.use_scale == RELEASES[release].schedule.use_scale


def test_unet_loader_takes_the_unet_of_a_full_text_to_video_checkpoint(t2v, tmp_path):
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": t2v}, path)
    assert repr(check.inspect_unet(str(path)).unet) == repr(tiny_config().unet)  # (the pack's own vc_model copy)


def test_checkpoint_loader_points_a_unet_alone_to_the_unet_loader(t2v, tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file(unet_only(t2v, bare=True), path)
    with pytest.raises(ValueError) as info:
        check.inspect_checkpoint(str(path))
    assert "partial checkpoint (it holds U-Net but no VAE or text encoder)" in str(info.value)
    assert "a U-Net on its own loads with Load VideoCrafter U-Net" in str(info.value)


def _z(*shape):
    return torch.zeros(shape)


@pytest.mark.parametrize("name,tensors,words", [
    ("i2v_unet.safetensors", None, "holds the image-to-video U-Net, which needs the image encoder of the full "
                                   "VideoCrafter1 I2V checkpoint: load that file with Load VideoCrafter Checkpoint"),
    ("sd15_unet.safetensors", {"input_blocks.0.0.weight": _z(8, 4, 3, 3), "out.2.weight": _z(4, 8, 3, 3),
                               "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _z(8, 768)},
     "is a Stable Diffusion 1.x image checkpoint (no temporal layers), not a VideoCrafter checkpoint or U-Net"),
    ("motion.safetensors", {"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": _z(8)},
     "is a diffusers-format model"),
    ("vae.safetensors", {"encoder.conv_in.weight": _z(8, 3, 3, 3), "decoder.conv_out.weight": _z(3, 8, 3, 3)},
     "is a standalone VAE file (without the first_stage_model. prefix), not a VideoCrafter checkpoint or U-Net"),
    ("text.safetensors", {"cond_stage_model.model.token_embedding.weight": _z(10, 8)},
     "is a file with a text encoder, not a VideoCrafter checkpoint or U-Net"),
])
def test_unet_loader_refuses_other_files_naming_what_they_look_like(tmp_path, name, tensors, words):
    if tensors is None:
        tensors = unet_only(vc_model.random_state_dict(tiny_config(i2v=True), seed=2), bare=True)
    path = tmp_path / name
    save_file(tensors, path)
    with pytest.raises(ValueError) as info:
        check.inspect_unet(str(path))
    assert words in str(info.value) and name in str(info.value)


def test_a_damaged_unet_alone_names_the_tensor(t2v, tmp_path):
    state = unet_only(t2v, bare=True)
    state["out.0.bias"] = state["out.0.bias"][:8]
    path = tmp_path / "unet.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError) as info:
        check.inspect_unet(str(path))
    assert ("tensor 'model.diffusion_model.out.0.bias' has shape [8] where the model the rest of the file "
            "describes needs [32]") in str(info.value)
