"""Every release constant pinned to the official value, written out here (not read back from RELEASES).

Sources (AILab-CVC/VideoCrafter @ 11bcd76, see ../shared/notes/videocrafter-spec.md sections 1, 7, 9):
`configs/inference_t2v_512_v1.0.yaml`, `inference_t2v_1024_v1.0.yaml`, `inference_t2v_512_v2.0.yaml`,
`inference_i2v_512_v1.0.yaml` (schedule, sizes, `scale_factor`, U-Net flags), the `LatentDiffusion`
class defaults (`scale_a` 1, `scale_b` 0.3, `mid_step` 400, `fix_scale_bug` False),
`LatentVisualDiffusion.__init__` / `init_projector` (16 resampler tokens, dim 1024, depth 4, 64 x 12
heads, CLIP width 1280, ff_mult 4), `lvdm/modules/attention.py` (`text_context_len = 77`) and the run
scripts (`--fps 28` for text-to-video, `--fps 8` for image-to-video, save fps 10). The released
checkpoints' key manifests (tests/fixtures/manifests/) carry the same numbers in their shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vc_model
from vc_model.config import RELEASES, ScheduleConfig, TextEncoderConfig, VAEConfig, tiny_config
from vc_model.schedule import Schedule, schedule_buffers
from vc_model.text_encoder import TextEncoder, tokenize
from vc_model.vae import VideoVAE

FIXTURES = Path(__file__).parent / "fixtures"
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows" / "api"

# release: (height, width, frames, conditioning fps, use_scale, scale_b, fix_scale_bug, scale_arr length)
OFFICIAL = {
    "vc1_t2v_512": (320, 512, 16, 24, False, None, None, 0),  # fps: inference.py's default, unused (no fps_cond)
    "vc1_t2v_1024": (576, 1024, 16, 28, True, 0.3, True, 1000),  # scale_b: the class default, not in the yaml
    "vc2_t2v_512": (320, 512, 16, 28, True, 0.7, False, 1400),
    "vc1_i2v_512": (320, 512, 16, 8, True, 0.7, False, 1400),
}
# release: (temporal_conv, use_relative_position, fps_cond, use_image_attention)
UNET_FLAGS = {
    "vc1_t2v_512": (False, True, False, False),
    "vc1_t2v_1024": (False, True, True, False),
    "vc2_t2v_512": (True, False, True, False),
    "vc1_i2v_512": (True, False, True, True),
}
MANIFESTS = {"vc1_t2v_512": "t2v_512_v1.0", "vc1_t2v_1024": "t2v_1024_v1.0", "vc2_t2v_512": "t2v_512_v2.0",
             "vc1_i2v_512": "i2v_512_v1.0"}


@pytest.mark.parametrize("release", OFFICIAL)
def test_release_size_frames_fps_and_schedule(release):
    height, width, frames, fps, use_scale, scale_b, fix_scale_bug, length = OFFICIAL[release]
    cfg = RELEASES[release]
    assert (cfg.height, cfg.width, cfg.frames, cfg.fps) == (height, width, frames, fps)
    s = cfg.schedule
    assert (s.timesteps, s.linear_start, s.linear_end) == (1000, 0.00085, 0.012)
    assert s.use_scale is use_scale and s.scale_arr_len == length
    if use_scale:
        assert (s.scale_a, s.scale_b, s.mid_step, s.fix_scale_bug) == (1.0, scale_b, 400, fix_scale_bug)


@pytest.mark.parametrize("release", OFFICIAL)
def test_release_schedule_values(release):
    """The buffers a real checkpoint holds: betas from 0.00085 to 0.012, alphas_cumprod[0] = 0.99915,
    scale_arr ramps from 1 to scale_b over t = 0..399 and stays there."""
    *_, use_scale, scale_b, _, length = OFFICIAL[release]
    buffers = schedule_buffers(RELEASES[release].schedule)
    assert buffers["betas"].shape == (1000,)
    assert float(buffers["betas"][0]) == pytest.approx(0.00085, rel=1e-6)
    assert float(buffers["betas"][-1]) == pytest.approx(0.012, rel=1e-6)
    assert float(buffers["alphas_cumprod"][0]) == pytest.approx(0.99915, rel=1e-7)
    assert float(buffers["alphas_cumprod"][-1]) == pytest.approx(0.004660, rel=1e-3)
    if not use_scale:
        assert "scale_arr" not in buffers and Schedule.from_config(RELEASES[release].schedule).scale_arr is None
        return
    scale = buffers["scale_arr"].double()
    assert scale.shape == (length,)
    assert float(scale[0]) == 1.0
    assert float(scale[200]) == pytest.approx(1 - (1 - scale_b) * 200 / 399, abs=1e-7)
    assert torch.allclose(scale[399:], torch.full_like(scale[399:], scale_b), atol=1e-7, rtol=0)


def test_scale_arr_length_follows_fix_scale_bug():
    assert ScheduleConfig(use_scale=True).scale_arr_len == 1400  # the official class default (the "bug")
    assert ScheduleConfig(use_scale=True, fix_scale_bug=True).scale_arr_len == 1000
    assert ScheduleConfig().scale_arr_len == 0
    assert (ScheduleConfig().linear_start, ScheduleConfig().linear_end, ScheduleConfig().timesteps) == (0.00085, 0.012, 1000)
    assert (ScheduleConfig().scale_a, ScheduleConfig().scale_b, ScheduleConfig().mid_step) == (1.0, 0.3, 400)


@pytest.mark.parametrize("release", OFFICIAL)
def test_release_networks(release):
    cfg = RELEASES[release]
    u = cfg.unet
    assert (u.temporal_conv, u.relative_position, u.fps_cond, u.image_attention) == UNET_FLAGS[release]
    assert (u.in_channels, u.out_channels, u.model_channels, u.channel_mult, u.attention_resolutions) == \
        (4, 4, 320, (1, 2, 4, 4), (4, 2, 1))
    assert (u.num_res_blocks, u.num_head_channels, u.context_dim, u.transformer_depth, u.temporal_length) == \
        (2, 64, 1024, 1, 16)
    assert u.init_attn and u.init_attn_heads == 8
    v = cfg.vae
    assert v.scale_factor == 0.18215
    assert (v.ch, v.ch_mult, v.num_res_blocks, v.attn_resolutions, v.z_channels, v.embed_dim, v.double_z) == \
        (128, (1, 2, 4, 4), 2, (), 4, 4, True)
    t = cfg.text_encoder
    assert (t.width, t.heads, t.layers, t.context_length, t.vocab_size, t.skip_last_layers) == \
        (1024, 16, 24, 77, 49408, 1)  # ViT-H-14 text tower, "penultimate"
    if not UNET_FLAGS[release][3]:
        assert cfg.image_encoder is None
        return
    i = cfg.image_encoder
    assert (i.width, i.layers, i.heads, i.patch_size, i.image_size) == (1280, 32, 16, 14, 224)  # ViT-H-14 visual
    r = i.resampler
    assert (r.num_queries, r.dim, r.depth, r.dim_head, r.heads, r.embedding_dim, r.output_dim, r.ff_mult) == \
        (16, 1024, 4, 64, 12, 1280, 1024, 4)


@pytest.mark.parametrize("release", OFFICIAL)
def test_manifests_carry_the_same_numbers(release):
    """Shapes of the released checkpoints that encode these constants, read from the key manifests."""
    shapes = {k: tuple(v[0]) for k, v in json.loads((FIXTURES / "manifests" / f"{MANIFESTS[release]}.json").read_text()).items()}
    length = OFFICIAL[release][-1]
    assert shapes.get("scale_arr") == ((length,) if length else None)
    assert shapes["betas"] == (1000,)
    assert shapes["cond_stage_model.model.positional_embedding"] == (77, 1024)
    assert ("model.diffusion_model.fps_embedding.0.weight" in shapes) == UNET_FLAGS[release][2]
    if UNET_FLAGS[release][3]:
        assert shapes["image_proj_model.latents"] == (1, 16, 1024)


def test_defaults_are_the_official_values():
    """The dataclass defaults that official configs leave implicit (what detection and tiny models use)."""
    assert VAEConfig().scale_factor == 0.18215
    assert tiny_config().vae.scale_factor == 0.18215
    assert TextEncoderConfig().context_length == 77
    assert vc_model.config_from_official({"first_stage_config": {"params": {}}}).vae.scale_factor == 0.18215
    assert (tiny_config().fps, tiny_config(v1=True).fps, tiny_config(i2v=True).fps) == (28, 28, 8)


def test_text_context_is_77_tokens():
    """CLIP context length 77; the official I2V cross-attention splits text from image tokens there."""
    assert tokenize(["", "a corgi"]).shape == (2, 77)
    encoder = TextEncoder(tiny_config().text_encoder).eval()
    with torch.no_grad():
        assert encoder(["a corgi running on the beach"]).shape == (1, 77, encoder.cfg.width)


@torch.no_grad()
def test_vae_latents_are_scaled_by_0_18215():
    cfg = tiny_config().vae
    vae = VideoVAE(cfg).eval()
    video = torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = vae.posterior(video.transpose(1, 2).flatten(0, 1))
    latent = vae.encode(video)
    torch.testing.assert_close(latent.transpose(1, 2).flatten(0, 1), 0.18215 * mean)
    torch.testing.assert_close(vae.decode(latent).transpose(1, 2).flatten(0, 1),
                               vae.decode_frames(latent.transpose(1, 2).flatten(0, 1) / 0.18215))


@pytest.mark.parametrize("name,fps", [("videocrafter2_t2v_512", 28), ("videocrafter1_t2v_1024", 28),
                                      ("videocrafter1_i2v_512", 8)])
def test_workflows_use_the_official_fps_and_save_at_10(name, fps):
    """Conditioning fps of the run scripts; the official scripts save every video at 10 fps."""
    graph = json.loads((WORKFLOWS / f"{name}.json").read_text())
    by_type = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert by_type["VideoCrafterConditioning"]["fps"] == fps
    assert by_type["CreateVideo"]["fps"] == 10
