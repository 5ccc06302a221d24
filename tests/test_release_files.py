"""The four released model.ckpt files as their published pickle scans describe them, and files stored that way load.

`tests/fixtures/released_files.json` records the facts: every file pickles only `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` and one storage class; the three text-to-video files hold float32 tensors,
Image2Video-512 float16; the top level is a `{"state_dict": ...}` wrapper or the OrderedDict itself. Tiny models
are written the same way (the test checks they pickle exactly those imports) and must load, wrapped or flat; an
fp16 file must load into fp16, bf16, fp32 and fp8 as exact casts of its values, without an fp32 copy.
"""
from __future__ import annotations

import json
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vc_model
from pack_import import pack_module
from vc_model.checkpoint import COMPONENT_PREFIXES
from vc_model.config import tiny_config

FACTS = json.loads((Path(__file__).parent / "fixtures" / "released_files.json").read_text())
TINY = {"vc1_t2v_512": tiny_config(v1=True), "vc1_t2v_1024": tiny_config(v1=True), "vc2_t2v_512": tiny_config(),
        "vc1_i2v_512": tiny_config(i2v=True)}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def release_like(path: Path, release: str, flat: bool = False) -> OrderedDict:
    """A tiny model stored as the release is: its dtype, an OrderedDict, wrapped in {"state_dict": ...} or not."""
    dtype = DTYPES[FACTS["releases"][release]["dtype"]]
    tensors = OrderedDict((k, v.to(dtype)) for k, v in vc_model.random_state_dict(TINY[release], seed=1).items())
    torch.save(tensors if flat else {"state_dict": tensors}, path)
    return tensors


def pickle_imports(path: Path) -> set[str]:
    """Every global the file's pickle refers to ("module.name"), as a pickle scanner lists them."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


@pytest.mark.parametrize("flat", [False, True], ids=["state_dict wrapper", "flat dict"])
@pytest.mark.parametrize("release", FACTS["releases"])
def test_a_file_stored_like_the_release_pickles_only_its_imports_and_loads(tmp_path, release, flat):
    facts = FACTS["releases"][release]
    path = tmp_path / "model.ckpt"
    tensors = release_like(path, release, flat)
    assert pickle_imports(path) == set(FACTS["pickle_imports"]) | {facts["storage"]}
    # torch's own weights-only unpickler accepts exactly these: nothing has to be allowed in addition
    plain = torch.load(path, weights_only=True, map_location="cpu")
    assert isinstance(plain if flat else plain["state_dict"], OrderedDict)
    for loaded in (vc_model.load_state_dict(path), vc_model.lazy_state_dict(path)):
        assert list(loaded) == list(tensors)
        assert all(loaded[k].dtype == DTYPES[facts["dtype"]] and torch.equal(loaded[k], v) for k, v in tensors.items())
    config = pack_module("nodes.ckpt_check").inspect_checkpoint(str(path))  # the loader node's validation
    assert repr(config) == repr(vc_model.detect_config(tensors))  # (the pack imports its own copy of vc_model)
    assert config.is_i2v == (release == "vc1_i2v_512")


def test_fp16_schedule_buffers_still_name_the_release():
    """A whole file cast to fp16 (as Image2Video-512 is) holds its schedule buffers in fp16 too."""
    from test_manifests import manifest, meta_state_dict
    from vc_model.schedule import schedule_buffers

    release = vc_model.RELEASES["vc1_i2v_512"]
    state = meta_state_dict(manifest("vc1_i2v_512"))
    state.update({k: v.half() for k, v in schedule_buffers(release.schedule).items()})
    assert vc_model.detect_config(state) == release


class Float32Outputs(TorchDispatchMode):
    """Records the largest float32 tensor any operation makes (meta tensors aside)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float32 and leaf.device.type != "meta":
                self.largest = max(self.largest, leaf.numel())
        return out


def _file_key(part: str, key: str) -> str:
    if part == "image_encoder":
        tower, rest = key.split(".", 1)
        return COMPONENT_PREFIXES["image_clip" if tower == "clip" else "image_proj"] + rest
    return COMPONENT_PREFIXES[part] + key


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8) if tensor.element_size() == 1 else tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_an_fp16_release_loads_as_exact_casts_without_an_fp32_copy(tmp_path, dtype):
    path = tmp_path / "model.ckpt"
    tensors = release_like(path, "vc1_i2v_512")
    lazy = vc_model.lazy_state_dict(path)
    with Float32Outputs() as recorder:
        bundle = vc_model.build(lazy, dtype=dtype)
    for part, module in bundle.modules().items():
        for key, value in module.state_dict().items():
            want = tensors[_file_key(part, key)].to(dtype)
            assert value.dtype == dtype and torch.equal(_bits(value), _bits(want)), (part, key)
    largest_weight = max(t.numel() for t in tensors.values())
    schedule = max(t.numel() for k, t in tensors.items() if "." not in k)
    if dtype != torch.float32:
        # nothing bigger than a schedule buffer (kept in float32 on purpose) went through float32
        assert recorder.largest <= schedule < largest_weight
    else:
        assert recorder.largest <= largest_weight  # one tensor at a time, never the model in one piece
