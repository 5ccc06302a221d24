"""Reading checkpoint files: formats, wrappers, unsafe and damaged files, foreign model families."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import vc_model
from vc_model.checkpoint import describe_state_dict


@pytest.fixture(scope="module")
def tiny_sd():
    return vc_model.random_state_dict(vc_model.tiny_config(), seed=1)


def _same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrap", ["plain", "lightning", "deepspeed"])
def test_ckpt_wrappers_are_unwrapped(tmp_path, tiny_sd, wrap):
    obj = {
        "plain": tiny_sd,
        "lightning": {"state_dict": tiny_sd, "epoch": 3, "global_step": 1000},
        "deepspeed": {"module": {"_forward_module." + k: v for k, v in tiny_sd.items()}},
    }[wrap]
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    _same(vc_model.load_state_dict(path), tiny_sd)


def test_safetensors_and_lazy_mapping(tmp_path, tiny_sd):
    path = tmp_path / "model.safetensors"
    save_file(tiny_sd, path)
    _same(vc_model.load_state_dict(path), tiny_sd)
    lazy = vc_model.lazy_state_dict(path)
    assert len(lazy) == len(tiny_sd) and torch.equal(lazy["betas"], tiny_sd["betas"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch " + str(_Payload.marker),))


def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, tiny_sd):
    _Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_sd, "hook": _Payload()}, path)
    with pytest.raises(vc_model.CheckpointError, match="arbitrary code.*nothing in it was executed"):
        vc_model.load_state_dict(path)
    assert not _Payload.marker.exists()


def test_legacy_raw_pickle_that_runs_code_is_refused(tmp_path):
    _Payload.marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": _Payload()}, protocol=2))
    with pytest.raises(vc_model.CheckpointError, match="Refused"):
        vc_model.load_state_dict(path)
    assert not _Payload.marker.exists()


class ModelCheckpoint:
    """Pickled under Lightning's module name to mimic a Lightning training checkpoint."""

    def __init__(self):
        self.best_model_score = 1.0


def test_lightning_callback_objects_are_tolerated(tmp_path, tiny_sd, monkeypatch):
    # Lightning stores its ModelCheckpoint callback beside the weights; it must load without Lightning.
    import sys
    import types

    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)
    module.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(ModelCheckpoint, "__module__", name)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny_sd, "callbacks": {"cb": ModelCheckpoint()}}, path)
    for gone in (name, "pytorch_lightning.callbacks", "pytorch_lightning"):
        monkeypatch.delitem(sys.modules, gone)
    _same(vc_model.load_state_dict(path), tiny_sd)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_files_are_refused(tmp_path, tiny_sd, suffix):
    whole = tmp_path / ("whole" + suffix)
    (torch.save({"state_dict": tiny_sd}, whole) if suffix == ".ckpt" else save_file(tiny_sd, whole))
    cut = tmp_path / ("cut" + suffix)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(vc_model.CheckpointError, match="truncated|damaged"):
        vc_model.load_state_dict(cut)


@pytest.mark.parametrize("content", [b"", b"hello, not a model" * 10, b"PK\x03\x04 broken zip"])
def test_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    with pytest.raises(vc_model.CheckpointError):
        vc_model.load_state_dict(path)


def test_missing_file():
    with pytest.raises(vc_model.CheckpointError, match="No checkpoint file"):
        vc_model.load_state_dict("/nonexistent/model.ckpt")


def _unet_key(k):
    return "model.diffusion_model." + k


@pytest.mark.parametrize("family, keys, words", [
    ("sd15", {_unet_key("input_blocks.0.0.weight"): (320, 4, 3, 3),
              _unet_key("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"): (320, 768),
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
     "Stable Diffusion 1"),
    ("sd2", {_unet_key("input_blocks.0.0.weight"): (320, 4, 3, 3),
             _unet_key("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"): (320, 1024),
             "cond_stage_model.model.token_embedding.weight": (49408, 1024)}, "Stable Diffusion 2"),
    ("sdxl", {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
              _unet_key("input_blocks.0.0.weight"): (320, 4, 3, 3)}, "SDXL"),
    ("dynamicrafter", {_unet_key("input_blocks.0.0.weight"): (320, 8, 3, 3),
                       _unet_key("framestride_embed.0.weight"): (1280, 320),
                       "image_proj_model.latents": (1, 16, 1024)}, "DynamiCrafter"),
    ("diffusers", {"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers"),
])
def test_foreign_families_are_named(family, keys, words):
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    assert words in describe_state_dict(sd)
    with pytest.raises(vc_model.CheckpointError, match=words):
        vc_model.build(sd)


@pytest.mark.parametrize("kwargs", [{}, {"v1": True}, {"i2v": True}])
def test_tiny_models_are_detected_from_weights(tiny_sd, kwargs):
    config = vc_model.tiny_config(**kwargs)
    sd = vc_model.random_state_dict(config, seed=2)
    found = vc_model.detect_config(sd)
    for part in ("unet", "vae", "text_encoder", "image_encoder", "schedule"):
        assert getattr(found, part) == getattr(config, part), part
    bundle = vc_model.build(sd)
    assert (bundle.image_encoder is not None) == bool(kwargs.get("i2v"))


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_partial_state_dicts_build_just_that_part(tiny_sd, part):
    prefix = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model.model."}[part]
    sd = {k: v for k, v in tiny_sd.items() if k.startswith(prefix)}
    bundle = vc_model.build(sd)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        assert (getattr(bundle, name) is not None) == (name == part), name
