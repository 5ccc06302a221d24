"""`generate` wiring with tiny fake components (the documented call signatures, no real weights)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vc_model.config import RELEASES, tiny_config
from vc_model.pipeline import generate, pixel_multiple, to_uint8_frames
from vc_model.schedule import Schedule


class FakeText(nn.Module):
    """[B,77,D]: every token = (number of characters of the prompt) / 10."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.w = dim, nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, prompts):
        self.calls.append(list(prompts))
        values = torch.tensor([len(p) / 10 for p in prompts])
        return values.view(-1, 1, 1).expand(-1, 77, self.dim) * self.w


class FakeImage(nn.Module):
    """[B,4,D]: every token = mean pixel of the image + 1."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.w = dim, nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, images):
        self.calls.append(images.clone())
        return (images.mean((1, 2, 3)) + 1).view(-1, 1, 1).expand(-1, 4, self.dim) * self.w


class FakeUNet(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=dtype))
        self.calls = []

    @property
    def dtype(self):
        return self.w.dtype

    def forward(self, x, t, context, fps=None, image_context=None):
        self.calls.append(dict(x=x.clone(), t=t, context=context, fps=fps, image=image_context))
        eps = 0.1 * x + context.float().mean((1, 2)).view(-1, 1, 1, 1, 1)
        if image_context is not None:
            eps = eps + image_context.float().mean((1, 2)).view(-1, 1, 1, 1, 1)
        return eps.to(self.dtype)


class FakeVAE(nn.Module):
    """decode: first 3 latent channels, upsampled 8x, times 3 (so clamping matters)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def decode(self, latent):
        x = latent[:, :3].repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        return 3 * x * self.w


def make_bundle(i2v=False, unet_dtype=torch.float32):
    config = tiny_config(i2v=i2v)
    dim = config.unet.context_dim
    return SimpleNamespace(
        config=config,
        unet=FakeUNet(unet_dtype),
        vae=FakeVAE(),
        text_encoder=FakeText(dim),
        image_encoder=FakeImage(dim) if i2v else None,
        schedule=Schedule.from_config(config.schedule),
    )


def test_pixel_multiple_of_releases():
    assert {pixel_multiple(c) for c in RELEASES.values()} == {64}
    assert pixel_multiple(tiny_config()) == 32


def test_default_shapes_and_range():
    bundle = make_bundle()
    cfg = bundle.config
    video = generate(bundle, "a cat", steps=3, seed=0)
    assert video.shape == (1, 3, cfg.frames, cfg.height, cfg.width) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and (video.abs() == 1).any()
    latent = generate(bundle, "a cat", steps=3, seed=0, return_latent=True)
    assert latent.shape == (1, 4, cfg.frames, cfg.height // 8, cfg.width // 8)
    video = generate(bundle, ["a", "b"], height=32, width=64, frames=3, steps=2, seed=0)
    assert video.shape == (2, 3, 3, 32, 64)


def test_uncond_is_empty_prompt_and_batched_cond_first():
    bundle = make_bundle()
    generate(bundle, ["a cat", "a dog!"], steps=2, cfg=7.0, fps=12, seed=1)
    assert bundle.text_encoder.calls == [["a cat", "a dog!"], ["", ""]]
    call = bundle.unet.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["x"][:2], call["x"][2:])
    assert call["context"][:, 0, 0].tolist() == pytest.approx([0.5, 0.6, 0.0, 0.0])
    assert call["fps"].tolist() == [12] * 4 and call["image"] is None
    assert call["t"].tolist() == [501] * 4  # 2 steps: [1, 501]


def test_negative_prompt_and_no_guidance():
    bundle = make_bundle()
    generate(bundle, ["a cat", "a dog"], negative_prompt="blurry", steps=2, seed=1)
    assert bundle.text_encoder.calls[1] == ["blurry", "blurry"]
    bundle = make_bundle()
    generate(bundle, "a cat", negative_prompt=["x", "yy"], steps=2, seed=1)
    assert bundle.text_encoder.calls == [["a cat", "a cat"], ["x", "yy"]]
    bundle = make_bundle()
    generate(bundle, "a cat", steps=2, cfg=1.0, seed=1)
    assert bundle.text_encoder.calls == [["a cat"]]  # official: a single conditional call
    assert [c["x"].shape[0] for c in bundle.unet.calls] == [1, 1]
    assert bundle.unet.calls[0]["fps"].tolist() == [bundle.config.fps]
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        generate(make_bundle(), ["a", "b"], negative_prompt=["x", "y", "z"], steps=2)


def test_i2v_uses_mid_grey_uncond_image():
    bundle = make_bundle(i2v=True)
    image = torch.full((2, 3, 40, 56), 0.5)
    generate(bundle, "a cat", image=image, steps=2, seed=0)
    images = bundle.image_encoder.calls
    assert len(images) == 2 and torch.equal(images[0], image)
    assert images[1].shape == (1, 3, 224, 224) and images[1].abs().max() == 0  # zeros in [-1,1] = grey
    call = bundle.unet.calls[0]
    assert call["image"][:, 0, 0].tolist() == pytest.approx([1.5, 1.5, 1.0, 1.0])
    assert call["context"].shape[0] == 4 and bundle.text_encoder.calls[0] == ["a cat", "a cat"]
    assert call["fps"].tolist() == [8] * 4  # the I2V native fps


def test_i2v_and_t2v_image_errors():
    with pytest.raises(ValueError, match="image-to-video"):
        generate(make_bundle(i2v=True), "a cat", steps=2)
    with pytest.raises(ValueError, match="text-to-video"):
        generate(make_bundle(), "a cat", image=torch.zeros(1, 3, 64, 64), steps=2)
    with pytest.raises(ValueError, match="image"):
        generate(make_bundle(i2v=True), "a", image=torch.zeros(1, 1, 64, 64), steps=2)
    bundle = make_bundle(i2v=True)
    bundle.image_encoder = None
    with pytest.raises(ValueError, match="image encoder"):
        generate(bundle, "a cat", image=torch.zeros(1, 3, 64, 64), steps=2)


def test_seeds_reproducible_and_noise_on_cpu():
    bundle = make_bundle()
    run = lambda seed: generate(bundle, "a cat", steps=3, seed=seed, return_latent=True)
    a, b, c, d = run(123), run(123), run(124), run(torch.Generator().manual_seed(123))
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)
    bundle = make_bundle()
    generate(bundle, "a cat", steps=3, seed=7)
    cfg = bundle.config
    expected = torch.randn((1, 4, cfg.frames, cfg.height // 8, cfg.width // 8),
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(bundle.unet.calls[0]["x"][:1], expected)
    e1 = generate(make_bundle(), "a cat", steps=3, seed=None, return_latent=True)
    e2 = generate(make_bundle(), "a cat", steps=3, seed=None, return_latent=True)
    assert not torch.equal(e1, e2)


def test_half_unet_gets_its_dtype_and_the_latent_stays_float():
    """The U-Net computes in its input's dtype: the sampler hands it x and context in the model's
    dtype and keeps its own latent in float32."""
    bundle = make_bundle(unet_dtype=torch.bfloat16)
    latent = generate(bundle, "a cat", steps=2, seed=0, return_latent=True)
    call = bundle.unet.calls[0]
    assert call["context"].dtype == torch.bfloat16 and call["x"].dtype == torch.bfloat16
    assert latent.dtype == torch.float32


def test_validation_errors():
    bundle = make_bundle()
    for kw in (dict(height=48), dict(width=100), dict(height=0), dict(width=64.0)):
        with pytest.raises(ValueError, match="multiple of 32"):
            generate(bundle, "a", steps=2, **kw)
    with pytest.raises(ValueError, match="frames"):
        generate(bundle, "a", frames=0, steps=2)
    with pytest.raises(ValueError, match="steps"):
        generate(bundle, "a", steps=0)
    with pytest.raises(ValueError, match="prompt"):
        generate(bundle, [], steps=2)
    with pytest.raises(ValueError, match="seed"):
        generate(bundle, "a", steps=2, seed="12")
    bundle.vae = None
    with pytest.raises(ValueError, match="vae"):
        generate(bundle, "a", steps=2)
    assert generate(bundle, "a", steps=2, return_latent=True).ndim == 5


def test_callback_and_interrupt():
    seen = []
    generate(make_bundle(), "a", steps=5, callback=lambda i, n, x, x0: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]

    class Interrupted(Exception):
        pass

    def stop(i, n, x, x0):
        raise Interrupted

    bundle = make_bundle()
    with pytest.raises(Interrupted):
        generate(bundle, "a", steps=5, callback=stop)
    assert len(bundle.unet.calls) == 1


def test_to_uint8_frames_truncates():
    video = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 1, 1, 6, 3) and frames.dtype == torch.uint8
    assert frames[0, 0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
    video = torch.rand(2, 3, 4, 8, 16) * 2 - 1
    frames = to_uint8_frames(video)
    assert frames.shape == (2, 4, 8, 16, 3)
    assert torch.equal(frames[1, 2, :, :, 0], ((video[1, 0, 2] + 1) / 2 * 255).to(torch.uint8))
