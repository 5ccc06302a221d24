"""Speed/memory code paths give the same results as the plain ones."""
import torch

from vc_model import attention
from vc_model.attention import FeedForward


def test_feed_forward_chunks_equal_one_pass(monkeypatch):
    torch.manual_seed(0)
    ff = FeedForward(16).eval()
    x = torch.randn(2, 3, 50, 16)
    with torch.no_grad():
        whole = ff.net(x)
        monkeypatch.setitem(attention.FF_CHUNK_BYTES, "cpu", 7 * 128 * 4)  # 7 tokens per chunk
        chunked = ff(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_vae_cpu_chunk_is_fixed_and_small():
    import vc_model
    from vc_model.vae import VideoVAE

    cfg = vc_model.tiny_config().vae
    vae = VideoVAE(cfg)
    assert vae._chunk(None, 128, 128) == 1
    assert vae._chunk(None, 64, 64) == 4
    assert vae._chunk(None, 576, 1024) == 1
    assert vae._chunk(3, 576, 1024) == 3
    assert vae.to(torch.bfloat16)._chunk(None, 128, 128) == 2
