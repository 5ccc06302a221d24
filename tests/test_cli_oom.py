"""The headless command's exit status 3 when the GPU runs out of memory (README "Headless command").

Out-of-memory is simulated by making one model stage raise torch.OutOfMemoryError (what a CUDA
allocation failure raises; torch.cuda.OutOfMemoryError is the same class), once through `cli.main`
and once as a real `python -m vc_model` process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vc_model import cli
from vc_model.unet import UNet3D
from vc_model.vae import VideoVAE

ROOT = Path(__file__).resolve().parents[1]
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB"


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM_MESSAGE)


@pytest.mark.parametrize("stage", [(UNet3D, "forward"), (VideoVAE, "decode_frames")], ids=["sampling", "decoding"])
def test_out_of_memory_exits_3_with_advice_and_no_file(stage, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VC_MODEL_DEBUG", raising=False)
    monkeypatch.setattr(*stage, _raise_oom)
    out = tmp_path / "demo.mp4"
    rc = cli.main(["demo", "--out", str(out), "--steps", "1"])
    _, err = capsys.readouterr()
    assert rc == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ran out of memory" in errors[0] and "--frames" in errors[0], err
    assert "Traceback" not in err and OOM_MESSAGE not in err
    assert list(tmp_path.iterdir()) == []  # no video, no temporary file


def test_out_of_memory_is_exit_status_3_of_the_process(tmp_path):
    """`python -m vc_model` as a user runs it; the OOM is injected before the module's main runs."""
    out = tmp_path / "demo.mp4"
    code = ("import runpy, sys, torch\n"
            "from vc_model.unet import UNet3D\n"
            "def oom(*a, **k):\n"
            f"    raise torch.OutOfMemoryError({OOM_MESSAGE!r})\n"
            "UNet3D.forward = oom\n"
            f"sys.argv = ['vc_model', 'demo', '--out', {str(out)!r}, '--steps', '1']\n"
            "runpy.run_module('vc_model', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "VC_MODEL_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "error: the GPU ran out of memory" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
