"""The shipped ComfyUI sampling classes run by ComfyUI's own sampler code (no server).

`ModelSamplingVideoCrafter` (nodes/model.py) and VideoCrafter Sampler (nodes/sampler.py) are imported
from this repository inside ComfyUI's Python by `comfy_sampling_probe.py` (a separate process, so this
pytest process never imports ComfyUI); the models come from the pack's own loader. Results are compared
with `vc_model.sample_ddim`, the official DDIM (itself checked against golden fixtures). The host-free
tests (tests/test_nodes_sampling.py) check the pure maths these classes call.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from harness import COMFYUI_PATH, PYTHON, ROOT, require_comfyui, write_checkpoint

require_comfyui()

from vc_model.config import tiny_config  # noqa: E402

PROBE = Path(__file__).with_name("comfy_sampling_probe.py")
CONFIGS = {"vc2": tiny_config(), "vc1": tiny_config(v1=True), "i2v": tiny_config(i2v=True)}
REL = 5e-5  # of max|ref|: float32 sampling, different op order (same bound as the server tests)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    for name, config in CONFIGS.items():
        write_checkpoint(folder / f"{name}.safetensors", config, seed=5)
    out = folder / "results.json"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([COMFYUI_PATH, str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run([PYTHON, str(PROBE), str(out), str(folder)], cwd=COMFYUI_PATH, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def assert_close(entry: dict) -> None:
    print(f"max |diff| {entry['max_diff']:.3g} (max |ref| {entry['max_ref']:.3g})")
    assert entry["max_diff"] <= REL * entry["max_ref"]


@pytest.mark.parametrize("name", ["vc2", "vc1", "i2v"])
def test_model_sampling_class_holds_the_official_schedule(probe, name):
    result = probe["schedule"][name]
    assert result["is_shipped_class"], result["class"]
    assert result["tables_equal"]
    assert result["timesteps"] == result["official_timesteps"]  # ComfyUI's lookup on our table
    for key in ("model_input", "pure_noise_start"):
        entry = result[key]
        assert entry["max_diff"] <= 1e-5 * max(1.0, entry["max_ref"]), (key, entry)


@pytest.mark.parametrize("case", ["vc2-ddim", "vc2-euler", "vc1-ddim", "vc1-euler", "i2v-ddim", "i2v-euler"])
def test_core_ksampler_ddim_uniform_is_official_ddim_eta0(probe, case):
    assert_close(probe["ksampler"][case])


@pytest.mark.parametrize("name", ["vc2", "vc1", "i2v"])
def test_videocrafter_sampler_is_official_ddim_eta1(probe, name):
    assert_close(probe["videocrafter_sampler"][name])
