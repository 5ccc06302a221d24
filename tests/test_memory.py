"""The activation estimate ComfyUI plans with (vc_model.memory) against the peak tracked on the meta device."""
import pytest
import torch

from vc_model.config import RELEASES
from vc_model.memory import ActivationTracker, unet_activation_bytes, unet_activation_peak


def test_tracker_counts_live_tensors_once_per_storage():
    x = torch.empty(1000, 1000, device="meta")
    with ActivationTracker() as tracker:
        y = x * 2                # 4 MB
        z = y.view(-1)           # same storage: nothing new
        w = z + 1                # 4 MB, peak 8 MB
        del y, z                 # y's storage freed
        v = w * 3                # 4 MB again
    assert tracker.peak == 8_000_000 and tracker.now == 8_000_000
    del v, w


@pytest.mark.parametrize("release,size", [("vc2_t2v_512", (16, 40, 64)), ("vc1_t2v_1024", (16, 72, 128))])
def test_estimate_is_1_to_1_5_times_the_measured_peak(release, size):
    """Each release at its native size, cond + uncond in one call, fp16 (two fits: with and without
    relative position attention)."""
    cfg = RELEASES[release].unet
    peak = unet_activation_peak(cfg, 2, *size, dtype=torch.float16)
    estimate = unet_activation_bytes(cfg, 2, *size, dtype_size=2)
    assert 1.0 <= estimate / peak <= 1.5, (estimate / peak, peak)
