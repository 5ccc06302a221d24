"""The four released checkpoints: full-size models built on `meta` match their key manifests."""
import json
from pathlib import Path

import pytest
import torch

import vc_model
from vc_model.config import RELEASES

MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"
RELEASE_FILES = {
    "vc1_t2v_512": "t2v_512_v1.0.json",
    "vc1_t2v_1024": "t2v_1024_v1.0.json",
    "vc2_t2v_512": "t2v_512_v2.0.json",
    "vc1_i2v_512": "i2v_512_v1.0.json",
}


def manifest(release: str) -> dict[str, tuple[int, ...]]:
    entries = json.loads((MANIFESTS / RELEASE_FILES[release]).read_text())
    return {key: tuple(shape) for key, (shape, _dtype) in entries.items()}


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.mark.parametrize("release", RELEASE_FILES)
def test_expected_keys_and_shapes_equal_manifest(release):
    ours = vc_model.expected_shapes(RELEASES[release])
    theirs = manifest(release)
    assert sorted(set(ours) - set(theirs))[:5] == [] and sorted(set(theirs) - set(ours))[:5] == []
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert wrong == {}


@pytest.mark.parametrize("release", RELEASE_FILES)
def test_detect_config_names_the_release(release):
    config = vc_model.detect_config(meta_state_dict(manifest(release)))
    assert config == RELEASES[release]


@pytest.mark.parametrize("release", RELEASE_FILES)
def test_build_on_meta_is_strict_and_complete(release):
    bundle = vc_model.build(meta_state_dict(manifest(release)), device="meta", dtype=torch.bfloat16)
    assert bundle.config == RELEASES[release]
    assert bundle.unet is not None and bundle.vae is not None and bundle.text_encoder is not None
    assert (bundle.image_encoder is not None) == (release == "vc1_i2v_512")
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16
    # parameter counts match the manifest's own totals per component
    counts = json.loads((MANIFESTS / "index.json").read_text())["manifests"]
    entry = counts["inference_" + RELEASE_FILES[release][:-5]]["counts_by_prefix"]
    unet_params = sum(p.numel() for p in bundle.unet.parameters())
    assert unet_params == entry["model.diffusion_model."]["n_parameters"]


def test_missing_key_is_named():
    shapes = manifest("vc2_t2v_512")
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(vc_model.CheckpointError, match="out.2.weight"):
        vc_model.build(meta_state_dict(shapes), config=RELEASES["vc2_t2v_512"], device="meta")


def test_unexpected_key_is_named():
    shapes = manifest("vc2_t2v_512")
    shapes["model.diffusion_model.extra.weight"] = (3,)
    with pytest.raises(vc_model.CheckpointError, match="extra.weight"):
        vc_model.build(meta_state_dict(shapes), config=RELEASES["vc2_t2v_512"], device="meta")


def test_wrong_release_config_is_refused():
    # A VC2 file forced through the VC1 config: temporal conv keys are unexpected, relpos tables missing.
    with pytest.raises(vc_model.CheckpointError, match="temopral_conv|relative_position"):
        vc_model.build(meta_state_dict(manifest("vc2_t2v_512")), config=RELEASES["vc1_t2v_512"], device="meta")
