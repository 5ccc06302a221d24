"""vc_model.conv: the GEMM form of small convolutions (taken by vc_model.ops.Conv2d/Conv3d) equals the
ordinary convolution."""
import pytest
import torch
import torch.nn.functional as F

from vc_model import conv
from vc_model.conv import conv_gemm
from vc_model.ops import Conv2d, Conv3d


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 2, 0)])
@pytest.mark.parametrize("weight_cl", [False, True])
@pytest.mark.parametrize("input_cl", [False, True])
def test_conv2d_gemm_matches(kernel, stride, padding, weight_cl, input_cl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, 6, generator=g)
    w = torch.randn(7, 8, kernel, kernel, generator=g)
    b = torch.randn(7, generator=g)
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    if input_cl:
        x = x.to(memory_format=torch.channels_last)
    if weight_cl:
        w = w.to(memory_format=torch.channels_last)
    out = conv_gemm(x, w, b, (stride, stride), (padding, padding))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out = conv_gemm(x, w, None, (stride, stride), (padding, padding))
    torch.testing.assert_close(out, ref - b[:, None, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_cl", [False, True])
def test_conv3d_temporal_gemm_matches(weight_cl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 8, 3, 1, 1, generator=g)
    b = torch.randn(8, generator=g)
    ref = F.conv3d(x, w, b, padding=(1, 0, 0))
    if weight_cl:
        w = w.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv_gemm(x, w, b, (1, 1, 1), (1, 0, 0)), ref, rtol=1e-5, atol=1e-5)


def test_modules_pick_the_path_by_size(monkeypatch):
    calls = []
    real = conv.conv_gemm
    monkeypatch.setattr(conv, "conv_gemm", lambda *a: calls.append(1) or real(*a))
    layer = Conv2d(4, 4, 3, padding=1)
    small, large = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 32, 32)
    for x in (small, large):
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1  # only the 2x4x4 = 32-position input took the GEMM form
    layer3 = Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(1, 4, 3, 2, 2)
    torch.testing.assert_close(layer3(x), F.conv3d(x, layer3.weight, layer3.bias, padding=(1, 0, 0)),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_bf16_gemm_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(4, 64, 3, 3, generator=g), torch.randn(32, 64, 3, 3, generator=g) / 24, torch.randn(32, generator=g)
    ref = F.conv2d(x, w, b, padding=1)
    out = conv_gemm(x.bfloat16(), w.bfloat16(), b.bfloat16(), (1, 1), (1, 1)).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
