"""Each weight is held once: a tensor copied out of a memory-mapped checkpoint gives its file pages back.

`build` calls the state dict's `release(key)` after each cast, layout change or move; the pages are
dropped with madvise(MADV_DONTNEED) only where they map the checkpoint file and were never written, so
reading again faults in the same bytes. Residency is read from /proc/self/pagemap (bit 63: the page is
mapped into this process). Peak memory itself is measured by benchmarks/bench_load.py (full size).
"""
import mmap
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import vc_model
import vc_model.checkpoint as checkpoint
from vc_model.checkpoint import FilePages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
PAGE = mmap.PAGESIZE
# Reading a page also maps its already-cached neighbours (the kernel's fault-around, 64 KiB), so only the
# inside of a tensor, away from its ends, is checked.
EDGE = 128 * 1024
UNET = "model.diffusion_model."


def _config():
    """tiny_config with 64/128-channel U-Net convs: several conv weights of 0.3-0.6 MB (copied into
    channels-last even in fp32), beside the text encoder's 12 MB token embedding."""
    cfg = vc_model.tiny_config()
    return cfg.replace(unet=replace(cfg.unet, model_channels=64))


def _write(folder, state) -> dict:
    st, ckpt = folder / "small.safetensors", folder / "small.ckpt"
    save_file(state, st)
    torch.save({"state_dict": state}, ckpt)
    return {"safetensors": st, "ckpt": ckpt}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    state = vc_model.random_state_dict(_config(), seed=3)
    return state, _write(tmp_path_factory.mktemp("load_memory"), state)


@pytest.fixture(scope="module")
def half_files(files, tmp_path_factory):
    """The same model stored in float16 (schedule buffers stay float32, as in converted files)."""
    state = {k: v.half() if "." in k else v for k, v in files[0].items()}
    return state, _write(tmp_path_factory.mktemp("load_memory_fp16"), state)


def _resident_pages(start: int, end: int) -> int:
    """How many pages of [start, end) are mapped into this process."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        entries = torch.frombuffer(bytearray(f.read((end - start) // PAGE * 8)), dtype=torch.int64)
    return int((entries < 0).sum())


def _inside(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return -(-(start + EDGE) // PAGE) * PAGE, (end - EDGE) // PAGE * PAGE


def _built(bundle) -> dict[str, torch.Tensor]:
    prefixes = {"unet": UNET, "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."}
    return {prefixes[name] + k: v for name, module in bundle.modules().items() for k, v in module.state_dict().items()}


def _check_copies_released(state_dict, state, dtype):
    """Build from `state_dict`; every copied tensor of >= 4 edges must have no resident inside page."""
    sources = {k: state_dict[k] for k in state_dict}
    bundle = vc_model.build(state_dict, dtype=dtype)
    built = _built(bundle)
    # Residency first: reading the built values below reads the views of the file too, and the kernel
    # maps a fault's whole cached folio (which can reach into a copied neighbour's pages).
    checked = []
    for key, value in built.items():
        source = sources[key]
        first, last = _inside(source)
        if value.data_ptr() != source.data_ptr() and last - first >= 2 * EDGE:
            assert _resident_pages(first, last) == 0, f"{key}: copied, but its file pages stay resident"
            checked.append(key)
    for key, value in built.items():
        assert torch.equal(value, state[key].to(dtype)), key
    return checked


@linux_only
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("reader", ["lazy_state_dict", "load_state_dict"])
def test_copied_tensors_leave_no_file_pages(files, fmt, reader):
    state, paths = files
    read = getattr(vc_model, reader)
    # bf16: everything is cast, the 12 MB token embedding included.
    checked = _check_copies_released(read(paths[fmt]), state, torch.bfloat16)
    assert "cond_stage_model.model.token_embedding.weight" in checked
    # fp32: only the conv weights are copied (into channels-last); the rest stay views of the file.
    checked = _check_copies_released(read(paths[fmt]), state, torch.float32)
    assert any(k.startswith(UNET) and k.endswith("in_layers.2.weight") for k in checked), checked
    assert not any(k.startswith("cond_stage_model.") for k in checked)


@linux_only
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_half_precision_files_too(half_files, fmt):
    state, paths = half_files
    # fp32 from an fp16 file: every tensor is cast.
    checked = _check_copies_released(vc_model.load_state_dict(paths[fmt]), state, torch.float32)
    assert "cond_stage_model.model.token_embedding.weight" in checked
    # fp16 from an fp16 file: only the conv weights are copied.
    checked = _check_copies_released(vc_model.lazy_state_dict(paths[fmt]), state, torch.float16)
    assert checked and all(k.startswith(UNET) for k in checked), checked


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_released_tensors_read_back_unchanged(files, fmt):
    state, paths = files
    lazy = vc_model.lazy_state_dict(paths[fmt])
    vc_model.build(lazy, dtype=torch.bfloat16)
    for key, value in state.items():
        assert torch.equal(lazy[key], value), key


@linux_only
def test_a_tensor_changed_in_place_keeps_its_pages(files):
    """A written page of the private mapping is the process's own copy: dropping it would bring the
    file's bytes back, so such a tensor is never released."""
    state, paths = files
    key = "cond_stage_model.model.token_embedding.weight"
    sd = vc_model.load_state_dict(paths["safetensors"])
    sd[key].add_(1.0)
    bundle = vc_model.build(sd, dtype=torch.bfloat16)
    assert torch.equal(sd[key], state[key] + 1.0)
    assert torch.equal(bundle.text_encoder.state_dict()["token_embedding.weight"], (state[key] + 1.0).bfloat16())


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_without_madvise_loading_is_correct_and_keeps_the_pages(files, fmt, monkeypatch):
    """Windows and macOS have no MADV_DONTNEED that drops file pages: release does nothing there."""
    monkeypatch.setattr(checkpoint, "_MADVISE", None)
    state, paths = files
    sd = vc_model.load_state_dict(paths[fmt])
    key = "cond_stage_model.model.token_embedding.weight"
    bundle = vc_model.build(sd, dtype=torch.bfloat16)
    for name, value in _built(bundle).items():
        assert torch.equal(value, state[name].bfloat16()), name
    if sys.platform.startswith("linux"):
        first, last = _inside(sd[key])
        assert _resident_pages(first, last) == (last - first) // PAGE


def test_load_state_dict_to_another_device_copies_every_tensor(files):
    state, paths = files
    for path in paths.values():
        sd = vc_model.load_state_dict(path, device="meta")
        assert sd.keys() == state.keys() and all(t.is_meta for t in sd.values())


def test_release_never_touches_memory_outside_the_file(files):
    _, paths = files
    pages = FilePages(str(paths["safetensors"]))
    tensor = torch.arange(1 << 20, dtype=torch.float32)  # ordinary (anonymous) memory
    before = tensor.clone()
    pages.release(tensor)
    assert torch.equal(tensor, before)
