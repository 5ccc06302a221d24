"""Host-free checks of the nodes' input handling (nodes/logic.py) and checkpoint screening (nodes/ckpt_check.py)."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from pack_import import PACK, ROOT, pack_module  # noqa: E402


logic = pack_module("nodes.logic")
check = pack_module("nodes.ckpt_check")
vcm = pack_module("vc_model")
config_mod = pack_module("vc_model.config")
CheckpointError = pack_module("vc_model.checkpoint").CheckpointError


def test_root_package_imports_without_comfyui():
    assert "comfy" not in sys.modules and callable(sys.modules[PACK].comfy_entrypoint)


@pytest.mark.parametrize("width,height", [(512, 320), (1024, 576), (64, 64), (4096, 64)])
def test_sizes_that_work(width, height):
    assert logic.size_problem(width, height) is None


@pytest.mark.parametrize("width,height,words", [
    (500, 320, "width 500 is not usable: VideoCrafter needs a multiple of 64"),
    (512, 330, "height 330"),
    (0, 320, "width 0"),
    (4160, 320, "between 64 and 4096"),
    (512.0, 320, "whole number"),
])
def test_sizes_that_fail_say_why(width, height, words):
    message = logic.size_problem(width, height)
    assert message is not None and words in message and message.count(".") <= 2


def test_frames_bounds():
    assert logic.frames_problem(16) is None
    assert "from 1 to" in logic.frames_problem(0)


def test_empty_latent_layout():
    latent = logic.empty_latent(2, 16, 512, 320)
    assert latent.shape == (2, 4, 16, 40, 64) and not latent.any()
    assert logic.latent_problem(latent) is None


@pytest.mark.parametrize("shape,words", [
    ((1, 4, 40, 64), "image latent"),
    ((1, 16, 4, 40, 64), "16 channels"),
    ((4, 40, 64), "Expected a video latent"),
])
def test_wrong_latents_are_named(shape, words):
    assert words in logic.latent_problem(torch.zeros(shape))


def test_latent_size_must_fit_the_unet():
    assert logic.latent_size_problem(torch.zeros(1, 4, 16, 40, 64), 8) is None
    assert "96x96 pixels" in logic.latent_size_problem(torch.zeros(1, 4, 16, 12, 12), 8)


def test_time_folds_into_batch_video_major():
    samples = torch.arange(2 * 4 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 4, 3, 2, 2)
    frames = logic.latent_to_frames(samples)
    assert frames.shape == (6, 4, 2, 2)
    assert torch.equal(frames[4], samples[1, :, 1])
    assert torch.equal(logic.frames_to_latent(frames, 2), samples)


def test_video_batch_split():
    assert logic.video_batch(32, 16) == (2, 16)
    assert logic.video_batch(5, 0) == (1, 5)
    with pytest.raises(ValueError, match="cannot be split into videos of 16 frames"):
        logic.video_batch(20, 16)


def test_chunks_cover_everything():
    assert logic.chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert logic.chunks(3, 0) == [(0, 1), (1, 2), (2, 3)]


def test_images_to_model_range_and_alpha():
    images = torch.rand(2, 5, 7, 4)
    x = logic.images_to_model(images)
    assert x.shape == (2, 3, 5, 7)
    torch.testing.assert_close(x[1, 2], images[1, :, :, 2] * 2 - 1)
    assert logic.images_to_model(torch.ones(1, 2, 2, 1)).shape == (1, 3, 2, 2)
    assert torch.equal(logic.grey_images(1, 224), torch.zeros(1, 3, 224, 224))


# ---- checkpoint screening --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    t2v = vcm.random_state_dict(config_mod.tiny_config())
    i2v = vcm.random_state_dict(config_mod.tiny_config(i2v=True))
    out = {}

    def write(name, sd):
        path = root / name
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save({"state_dict": sd}, str(path))
        out[name] = str(path)

    write("t2v.safetensors", t2v)
    write("t2v.ckpt", t2v)
    write("i2v.safetensors", i2v)
    write("unet_only.safetensors", {k: v for k, v in t2v.items() if k.startswith("model.diffusion_model.") or "." not in k})
    write("vae_only.safetensors", {k: v for k, v in t2v.items() if k.startswith("first_stage_model.")})
    write("no_proj.safetensors", {k: v for k, v in i2v.items() if not k.startswith("image_proj_model.")})
    sd_image = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 768),
                "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}
    write("sd15.safetensors", sd_image)
    broken = dict(t2v)
    broken["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    write("broken.safetensors", broken)
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    out["garbage.safetensors"] = str(root / "garbage.safetensors")
    return out


@pytest.mark.parametrize("name", ["t2v.safetensors", "t2v.ckpt"])
def test_complete_t2v_checkpoint_is_detected(files, name):
    config = check.inspect_checkpoint(files[name])
    assert config.unet.temporal_conv and not config.is_i2v and config.fps == 28


def test_i2v_checkpoint_is_detected(files):
    config = check.inspect_checkpoint(files["i2v.safetensors"])
    assert config.is_i2v and config.image_encoder.resampler.num_queries == 4 and config.fps == 8


@pytest.mark.parametrize("name,words", [
    ("unet_only.safetensors", "partial checkpoint (it holds U-Net but no VAE or text encoder)"),
    ("vae_only.safetensors", "partial checkpoint (it holds VAE but no U-Net or text encoder)"),
    ("no_proj.safetensors", "incomplete image encoder"),
    ("sd15.safetensors", "Stable Diffusion 1.x image checkpoint"),
    ("broken.safetensors", "tensor 'model.diffusion_model.out.2.weight' has shape [4, 32, 1, 1] where the model the "
                           "rest of the file describes needs [4, 32, 3, 3]: the file is damaged or was modified"),
    ("garbage.safetensors", "not a readable safetensors file"),
])
def test_unusable_checkpoints_fail_with_one_sentence(files, name, words):
    with pytest.raises(CheckpointError) as info:
        check.inspect_checkpoint(files[name])
    message = str(info.value)
    assert words in message and name in message and "\n" not in message


def test_screening_reads_headers_only(files, monkeypatch):
    """Safetensors screening must not load weights (it runs at every prompt validation)."""
    import safetensors

    opened = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._f = real(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, key):
            return self._f.get_slice(key)

        def get_tensor(self, key):
            opened.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    check._cache.clear()
    check.inspect_checkpoint(files["t2v.safetensors"])
    assert opened and all("." not in key for key in opened)  # only the schedule buffers


RELEASE_MANIFESTS = [("t2v_512_v1.0", "vc1_t2v_512"), ("t2v_1024_v1.0", "vc1_t2v_1024"),
                     ("t2v_512_v2.0", "vc2_t2v_512"), ("i2v_512_v1.0", "vc1_i2v_512")]


def manifest_state_dict(manifest: str) -> dict:
    import json

    entries = json.loads((ROOT / "tests" / "fixtures" / "manifests" / f"{manifest}.json").read_text())
    return {key: torch.empty(shape, device="meta") for key, (shape, _dtype) in entries.items()}


@pytest.mark.parametrize("manifest,release", RELEASE_MANIFESTS)
def test_released_layouts_pass_screening_as_their_release(manifest, release):
    """The four official checkpoints' key/shape manifests are accepted and named (no weights needed)."""
    config = check.screen("model.ckpt", manifest_state_dict(manifest))
    want = config_mod.RELEASES[release]
    assert config.name == want.name and (config.width, config.height, config.fps) == (want.width, want.height, want.fps)


@pytest.mark.parametrize("manifest,release", RELEASE_MANIFESTS)
def test_loader_modules_take_the_released_weights(manifest, release):
    """What the loader builds (on meta here) has exactly the released keys and shapes, and the core
    CLIP/VAE get the stock SD2 CLIP-H config and SD VAE detection."""
    diffusion = pack_module("nodes.diffusion")
    image_encoder = pack_module("vc_model.image_encoder")
    state_dict = manifest_state_dict(manifest)
    config = check.screen("model.ckpt", state_dict)
    resampler = config.image_encoder.resampler if config.image_encoder is not None else None
    with torch.device("meta"):
        unet = diffusion.VideoCrafterUNet(config.unet, resampler)
        tower = image_encoder.ImageEncoder(config.image_encoder).clip if config.image_encoder is not None else None
    ours = {("" if k.startswith("image_proj_model.") else "model.diffusion_model.") + k: tuple(v.shape)
            for k, v in unet.state_dict().items()}
    if tower is not None:
        ours.update({"embedder.model.visual." + k: tuple(v.shape) for k, v in tower.state_dict().items()})
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()
              if k.startswith(("model.diffusion_model.", "image_proj_model.", "embedder.model.visual."))}
    assert ours == theirs
    assert logic.clip_text_config(config.text_encoder) == {  # ComfyUI's sd2_clip_config.json
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1024}
    assert logic.vae_config(config.vae, config_mod.VAEConfig()) is None


def test_tiny_models_get_sized_core_configs():
    tiny = config_mod.tiny_config()
    assert logic.clip_text_config(tiny.text_encoder)["hidden_size"] == 64
    assert logic.vae_config(tiny.vae, config_mod.VAEConfig())["params"]["ddconfig"]["ch_mult"] == [1, 1, 2, 2]


@pytest.mark.parametrize("values,words", [
    ((0, 0, 16, 0, 1), None), ((None, 320, None, None, None), None), ((512, 320, 0, 8, 1), "frames"),
    ((512, 320, 16, -1, 1), "fps must be"), ((512, 320, 16, 8, 0), "batch_size"), ((520, 320, 16, 8, 1), "width 520"),
])
def test_conditioning_numbers(values, words):
    message = logic.conditioning_problem(*values)
    assert (message is None) if words is None else (words in message)
