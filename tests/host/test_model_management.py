"""The VideoCrafter MODEL under ComfyUI's memory manager (needs COMFYUI_PATH; runs on the CPU).

`comfy_inprocess.py` runs in ComfyUI's Python against its real ModelPatcher, ops and LoRA code, for
tiny VideoCrafter2, VideoCrafter1 (relative position) and I2V checkpoints, and reports JSON that
these tests check: a load with 30% of the weights' size as budget leaves no module stranded and
gives the fully loaded model's step; LoRAs (kohya and PEFT) change the output, work on the
partially loaded model and unpatch to the original weights; fp8 storage computes by manual cast;
the attention is ComfyUI's; the image encoder is a core CLIP vision model.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from harness import COMFYUI_PATH, PYTHON, ROOT, require_comfyui

require_comfyui()

MODELS = ["vc2", "vc1", "i2v"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("inprocess")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([COMFYUI_PATH, str(ROOT / "tests"), str(ROOT)]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([PYTHON, str(Path(__file__).with_name("comfy_inprocess.py")), str(work)],
                          cwd=COMFYUI_PATH, env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name", MODELS)
def test_partial_load_at_30_percent_strands_nothing_and_equals_full_load(report, name):
    partial = report[name]["partial"]
    assert partial["lowvram"] and partial["loaded_fraction"] < 0.3
    placement = partial["placement"]
    assert placement["stranded"] == [] and placement["cast"] > placement["loaded"] > 0
    assert partial["diff"] <= 1e-5 * partial["scale"]


@pytest.mark.parametrize("kind", ["kohya", "peft"])
@pytest.mark.parametrize("name", MODELS)
def test_lora_changes_output_works_partially_loaded_and_unpatches(report, name, kind):
    result = report[name][kind]
    assert result["patches"] > 0 and result["change"] > 1e-2
    assert result["partial_diff"] <= 1e-5 * report[name]["partial"]["scale"]
    assert result["restored"] and result["after_unpatch_diff"] == 0.0


@pytest.mark.parametrize("name", MODELS)
def test_fp8_weights_are_stored_in_8_bits_and_computed_by_manual_cast(report, name):
    fp8 = report[name]["fp8"]
    assert fp8["dtypes"] == ["torch.float8_e4m3fn"] and fp8["manual_cast"] == "torch.float32" and fp8["finite"]
    assert fp8["relative_error"] < 0.5  # tiny random weights: most are near fp8's subnormal range


@pytest.mark.parametrize("name", MODELS)
def test_attention_memory_estimate_and_clip_vision(report, name):
    result = report[name]
    assert result["attention"]
    assert 1.0e9 < result["memory_required"] < 4.0e9  # [2,4,16,40,64] in fp32: the measured fit, not 2x
    assert result["clip_vision"] == ("ClipVisionModel" if name == "i2v" else None)
