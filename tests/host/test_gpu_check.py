"""benchmarks/gpu_check.sh in its CPU dry-run mode (needs COMFYUI_PATH): the script a GPU session runs
as is must run through and write its JSON and table with every row."""
from __future__ import annotations

import json
import os
import subprocess

from harness import COMFYUI_PATH, PYTHON, ROOT, require_comfyui

require_comfyui()


def test_gpu_check_dry_run_writes_every_row(tmp_path):
    env = {**os.environ, "COMFYUI_PATH": COMFYUI_PATH, "COMFYUI_PYTHON": PYTHON,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", "check.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "check.json").read_text())
    rows = result["rows"]
    e2e = [r for r in rows if r["row"] == "e2e"]
    assert [r["weight_dtype"] for r in e2e] == ["fp16", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "bf16"]
    assert all(r["finite"] and r["frames_out"] == 4 and r["seconds"] > 0 for r in e2e)
    partial, = [r for r in rows if r["row"] == "partial"]
    assert partial["lowvram"] and partial["loaded_gib"] < partial["weights_gib"]
    assert partial["max_diff"] <= 1e-5 * partial["max_ref"]
    long, = [r for r in rows if r["row"] == "long"]
    assert long["finite"] and long["frames_out"] == 16 and long["size"] == "128x64x16"
    turbo, = [r for r in rows if r["row"] == "turbo"]
    assert turbo["finite"] and turbo["frames_out"] == 4 and turbo["steps"] == 4
    sdpa, = [r for r in rows if r["row"] == "sdpa"]
    assert sdpa["batch"] > sdpa["limit"] and sdpa["vc_model_max_diff"] < 1e-5 and sdpa["comfy_max_diff"] < 1e-4
    table = (tmp_path / "check.txt").read_text()
    assert all(name in table for name in ("fp8_e4m3fn_fast", "partial", "long", "turbo", "sdpa"))
