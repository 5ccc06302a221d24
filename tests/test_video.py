"""mp4 writing: frame count, size, colour round trip, odd sizes, and no broken file on interruption."""
import av
import pytest
import torch

from vc_model import video


def _read_frames(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_writes_every_frame_at_the_right_size(tmp_path, codec):
    frames = torch.rand(7, 64, 96, 3)
    out = video.write_mp4(tmp_path / "clip.mp4", frames, fps=10, codec=codec)
    info = video.read_mp4_info(out)
    assert info["frames"] == 7
    assert (info["width"], info["height"]) == (96, 64)
    assert info["fps"] == pytest.approx(10)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_prefers_h264_when_available():
    expected = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    assert video.pick_codec() == expected


def test_colours_survive_encoding(tmp_path):
    # flat colour blocks survive yuv420p + crf 10 almost unchanged
    frames = torch.zeros(3, 64, 64, 3, dtype=torch.uint8)
    frames[:, :32, :, 0] = 200
    frames[:, 32:, :, 2] = 150
    decoded = _read_frames(video.write_mp4(tmp_path / "c.mp4", frames, fps=8))
    assert len(decoded) == 3
    diff = (torch.from_numpy(decoded[1]).float() - frames[1].float()).abs()
    assert diff[4:28, 4:60].max() <= 6 and diff[36:60, 4:60].max() <= 6


def test_odd_sizes_are_padded_to_even(tmp_path):
    out = video.write_mp4(tmp_path / "odd.mp4", torch.rand(2, 33, 47, 3), fps=8)
    info = video.read_mp4_info(out)
    assert (info["frames"], info["width"], info["height"]) == (2, 48, 34)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(KeyboardInterrupt):
        video.write_mp4(tmp_path / "x.mp4", torch.rand(6, 32, 32, 3), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "keep.mp4"
    video.write_mp4(target, torch.rand(2, 32, 32, 3), fps=8)
    before = target.read_bytes()
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        video.write_mp4(target, torch.rand(4, 32, 32, 3), fps=8)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


@pytest.mark.parametrize("bad", [torch.rand(0, 8, 8, 3), torch.rand(4, 8, 8), torch.rand(4, 8, 8, 4)])
def test_bad_frames_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        video.write_mp4(tmp_path / "bad.mp4", bad, fps=8)
    assert list(tmp_path.iterdir()) == []
