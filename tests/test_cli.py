"""The headless command: demo, generate, convert, info, and the errors users make."""
import io
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vc_model
from vc_model import cli, convert
from vc_model.config import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _mp4(path):
    """(frame count, width, height) read back by decoding every frame."""
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


@pytest.fixture(scope="module")
def tiny_sd():
    return vc_model.random_state_dict(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_sd):
    """A tiny random VideoCrafter2-layout checkpoint saved the way the official ones are."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": tiny_sd, "epoch": 0}, path)
    return path


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_sentence_error(err: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err


# --- demo ------------------------------------------------------------------------------------


def test_demo_writes_an_mp4_with_the_right_frames_and_size(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    rc, stdout, stderr = _run(capsys, "demo", "--out", out, "--steps", 2)
    assert rc == 0, stderr
    config = tiny_config()
    assert _mp4(out) == (config.frames, config.width, config.height)
    assert "RANDOM weights" in stderr and "noise" in stdout
    assert "sampling 2/2" in stderr and "ETA" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]


def test_demo_runs_as_a_module_in_a_fresh_process(tmp_path):
    """The README's main command, end to end, in a new interpreter."""
    out = tmp_path / "demo.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "vc_model", "demo", "--out", str(out), "--frames", "6", "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert _mp4(out)[0] == 6
    assert "random" in result.stderr.lower()


# --- generate --------------------------------------------------------------------------------


def test_generate_t2v_from_a_checkpoint(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "t2v.mp4"
    rc, _, stderr = _run(capsys, "generate", "a cat", "--ckpt", tiny_ckpt, "--out", out, "--steps", 2,
                         "--frames", 3, "--height", 32, "--width", 64, "--negative", "blurry", "--dtype", "fp32")
    assert rc == 0, stderr
    assert _mp4(out) == (3, 64, 32)


def test_generate_i2v_takes_an_image_and_needs_one(tmp_path, capsys):
    from PIL import Image

    ckpt = tmp_path / "tiny_i2v.ckpt"
    torch.save({"state_dict": vc_model.random_state_dict(tiny_config(i2v=True), seed=1)}, ckpt)
    image = tmp_path / "in.png"
    Image.new("RGBA", (70, 45), (10, 200, 30, 128)).save(image)  # alpha and an odd size both work

    rc, _, stderr = _run(capsys, "generate", "a cat", "--ckpt", ckpt, "--out", tmp_path / "i2v.mp4", "--steps", 2)
    assert rc == 2
    _one_sentence_error(stderr)
    assert "--image" in stderr

    rc, _, stderr = _run(capsys, "generate", "a cat", "--ckpt", ckpt, "--image", image, "--out", tmp_path / "i2v.mp4",
                         "--steps", 2, "--frames", 2, "--height", 64, "--width", 96)
    assert rc == 0, stderr
    assert _mp4(tmp_path / "i2v.mp4") == (2, 96, 64)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--height", "100"], "multiple of 32"),
        (["--width", "0"], "positive multiple of 32"),
        (["--frames", "0"], "--frames"),
        (["--frames", "100000"], "--frames"),
        (["--steps", "0"], "--steps"),
        (["--eta", "4"], "not a duration"),
        (["--fps", "0"], "--fps"),
        (["--out", "video.gif"], ".mp4"),
        (["--image", "missing.png"], "No image file"),
    ],
)
def test_generate_input_mistakes_are_one_sentence(tmp_path, capsys, tiny_ckpt, extra, words):
    argv = ["generate", "a cat", "--ckpt", tiny_ckpt, "--out", tmp_path / "x.mp4", "--steps", 2, *extra]
    argv = [a if a != "missing.png" else tmp_path / "missing.png" for a in argv]
    rc, _, stderr = _run(capsys, *argv)
    assert rc == 2
    _one_sentence_error(stderr)
    assert words in stderr
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize("name", ["missing.ckpt", "weights.txt"])
def test_checkpoint_path_mistakes_are_one_sentence(tmp_path, capsys, name):
    if name.endswith(".txt"):
        (tmp_path / name).write_text("hello")
    for argv in (["generate", "a cat", "--ckpt", tmp_path / name], ["convert", tmp_path / name],
                 ["info", tmp_path / name]):
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 2
        _one_sentence_error(stderr)


def test_no_subcommand_prints_help(capsys):
    rc, _, stderr = _run(capsys)
    assert rc == 2 and "generate" in stderr and "convert" in stderr


# --- convert ---------------------------------------------------------------------------------


def test_convert_round_trips_to_fp16(tmp_path, capsys, tiny_ckpt, tiny_sd):
    out = tmp_path / "tiny.safetensors"
    rc, stdout, stderr = _run(capsys, "convert", tiny_ckpt, out, "--dtype", "fp16")
    assert rc == 0, stderr
    assert "verified" in stdout
    written = load_file(str(out))
    assert set(written) == set(tiny_sd)
    for key, original in tiny_sd.items():
        if "." in key:  # component weights: exactly the fp16 cast
            assert written[key].dtype == torch.float16, key
            assert torch.equal(written[key], original.half()), key
        else:  # schedule buffers stay float32
            assert written[key].dtype == torch.float32, key
            assert torch.equal(written[key], original), key
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["dtype"] == "fp16"
    # the converted file builds the same model
    assert vc_model.detect_config(vc_model.load_state_dict(out)) == vc_model.detect_config(tiny_sd)
    bundle = vc_model.build(vc_model.load_state_dict(out), dtype=torch.float16)
    assert bundle.unet.dtype == torch.float16


def test_convert_bf16_default_name_and_no_overwrite_without_force(tmp_path, capsys, tiny_ckpt, tiny_sd):
    source = tmp_path / "model.ckpt"
    source.write_bytes(tiny_ckpt.read_bytes())
    rc, _, stderr = _run(capsys, "convert", source, "--dtype", "bf16")
    assert rc == 0, stderr
    out = tmp_path / "model.bf16.safetensors"
    key = next(k for k in tiny_sd if k.startswith("model.diffusion_model."))
    assert torch.equal(load_file(str(out))[key], tiny_sd[key].bfloat16())

    out.write_bytes(b"keep me")
    rc, _, stderr = _run(capsys, "convert", source, "--dtype", "bf16")
    assert rc == 2
    _one_sentence_error(stderr)
    assert "--force" in stderr and out.read_bytes() == b"keep me"
    rc, _, stderr = _run(capsys, "convert", source, "--dtype", "bf16", "--force")
    assert rc == 0, stderr
    assert len(load_file(str(out))) == len(tiny_sd)


def test_interrupted_conversion_leaves_no_file(tmp_path, capsys, monkeypatch, tiny_ckpt):
    source = tmp_path / "model.ckpt"
    source.write_bytes(tiny_ckpt.read_bytes())
    real, calls = convert._write_tensor, {"n": 0}

    def interrupted(f, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # Ctrl-C halfway through writing
        return real(f, tensor)

    monkeypatch.setattr(convert, "_write_tensor", interrupted)
    rc, _, stderr = _run(capsys, "convert", source, tmp_path / "out.safetensors")
    assert rc == 130 and calls["n"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]

    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert.convert_checkpoint(source, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_failed_verification_deletes_the_output(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.setattr(convert, "_compare", lambda *a: "tensor 'x' does not read back as written")
    with pytest.raises(vc_model.CheckpointError, match="does not read back"):
        convert.convert_checkpoint(tiny_ckpt, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_unsafe_pickles_without_running_them(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": Evil()}, evil)
    rc, _, stderr = _run(capsys, "convert", evil)
    assert rc == 2
    _one_sentence_error(stderr)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"]


def test_convert_refuses_other_model_families(tmp_path, capsys):
    sd15 = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                               "cond_stage_model.transformer.text_model.x": torch.zeros(2)}}, sd15)
    rc, _, stderr = _run(capsys, "convert", sd15)
    assert rc == 2
    _one_sentence_error(stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd15.ckpt"]


# --- info ------------------------------------------------------------------------------------


def test_info_names_the_model_and_its_parts(tmp_path, capsys, tiny_ckpt, tiny_sd):
    rc, stdout, stderr = _run(capsys, "info", tiny_ckpt)
    assert rc == 0, stderr
    assert "text-to-video" in stdout
    for part in ("U-Net", "VAE", "text encoder", "schedule buffers"):
        assert part in stdout
    unet_values = sum(v.numel() for k, v in tiny_sd.items() if k.startswith("model.diffusion_model."))
    assert f"{unet_values / 1e6:,.1f} M values" in stdout

    converted = tmp_path / "tiny.safetensors"
    convert.convert_checkpoint(tiny_ckpt, converted)
    rc, stdout16, _ = _run(capsys, "info", converted)
    assert rc == 0 and "float16" in stdout16 and f"{unet_values / 1e6:,.1f} M values" in stdout16


# --- progress bar ----------------------------------------------------------------------------


def test_progress_bar_counts_steps_and_estimates_time():
    stream = io.StringIO()
    bar = cli.ProgressBar("sampling", stream=stream)
    for i in range(50):
        bar(i, 50)
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 11  # not a tty: about one line per 10%
    assert lines[-1].startswith("sampling 50/50") and "100%" in lines[-1] and "ETA 0:00" in lines[-1]
