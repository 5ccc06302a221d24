"""Loading into another dtype gives the file pages back, and that never changes any value.

`build` calls the lazy mapping's `release(key)` after each cast; the pages are dropped with
madvise(MADV_DONTNEED) only where they map the checkpoint file, so reading again faults in the same
bytes. Peak memory itself is measured by benchmarks/bench_load.py (full size).
"""
import torch
from safetensors.torch import save_file

import vc_model
from vc_model.checkpoint import FilePages


def _files(tmp_path):
    state = vc_model.random_state_dict(vc_model.tiny_config(), seed=3)
    st, ckpt = tmp_path / "tiny.safetensors", tmp_path / "tiny.ckpt"
    save_file(state, st)
    torch.save({"state_dict": state}, ckpt)
    return state, (st, ckpt)


def test_lazy_bf16_build_matches_and_file_stays_intact(tmp_path):
    state, paths = _files(tmp_path)
    for path in paths:
        lazy = vc_model.lazy_state_dict(path)
        assert callable(getattr(lazy, "release", None))
        bundle = vc_model.build(lazy, dtype=torch.bfloat16)
        unet = bundle.unet.state_dict()
        for key, value in unet.items():
            assert torch.equal(value, state["model.diffusion_model." + key].to(torch.bfloat16)), key
        # Every released tensor reads back with its original values.
        for key, value in state.items():
            assert torch.equal(lazy[key], value), key


def test_fp32_build_keeps_views_and_values(tmp_path):
    state, paths = _files(tmp_path)
    for path in paths:
        bundle = vc_model.build(vc_model.lazy_state_dict(path), dtype=torch.float32)
        for key, value in bundle.vae.state_dict().items():
            assert torch.equal(value, state["first_stage_model." + key]), key


def test_release_never_touches_memory_outside_the_file(tmp_path):
    _, (st, _) = _files(tmp_path)
    pages = FilePages(str(st))
    tensor = torch.arange(1 << 16, dtype=torch.float32)  # ordinary (anonymous) memory
    before = tensor.clone()
    pages.release(tensor)
    assert torch.equal(tensor, before)
