"""Reliability of the nodes without a ComfyUI host: odd inputs, out-of-memory, interrupts, unsafe and wrong files.

What needs a running ComfyUI (validation messages in the API, interrupts, long sessions) is in
tests/host/test_reliability.py. The parts of the nodes that import ComfyUI are driven here with small
stand-ins for `comfy.model_management` and `comfy.utils`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import traceback
import types
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pack_import import PACK, pack_module  # noqa: E402


logic = pack_module("nodes.logic")
guards = pack_module("nodes.guards")
check = pack_module("nodes.ckpt_check")
diffusion = pack_module("nodes.diffusion")
vcm = pack_module("vc_model")
config_mod = pack_module("vc_model.config")
checkpoint_mod = pack_module("vc_model.checkpoint")
CheckpointError = checkpoint_mod.CheckpointError


def one_sentence(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message
    assert message.rstrip().endswith((".", ")")), message


# ---- images: alpha, greyscale, odd sizes, batches ----------------------------------------------------


def test_alpha_is_dropped_and_the_colours_kept_exactly():
    rgba = torch.rand(2, 5, 7, 4)
    rgb = logic.image_rgb(rgba)
    assert rgb.shape == (2, 5, 7, 3) and torch.equal(rgb, rgba[..., :3])
    transparent = rgba.clone()
    transparent[..., 3] = 0
    assert torch.equal(logic.images_to_model(transparent), logic.images_to_model(rgba))


@pytest.mark.parametrize("channels", [1, 2])
def test_greyscale_with_or_without_alpha_becomes_grey_rgb(channels):
    grey = torch.rand(3, 4, 6, channels)
    rgb = logic.image_rgb(grey)
    assert rgb.shape == (3, 4, 6, 3)
    for c in range(3):
        assert torch.equal(rgb[..., c], grey[..., 0])


@pytest.mark.parametrize("shape,words", [
    ((0, 8, 8, 3), "empty"), ((4, 0, 8, 3), "empty"), ((8, 8, 3), "Expected an IMAGE batch"),
    ((1, 2, 8, 8, 3), "Expected an IMAGE batch"),
])
def test_tensors_that_are_not_image_batches_fail_in_one_sentence(shape, words):
    with pytest.raises(ValueError) as info:
        logic.image_rgb(torch.zeros(shape))
    assert words in str(info.value)
    one_sentence(str(info.value))


@pytest.fixture(scope="module")
def tiny_i2v():
    config = config_mod.tiny_config(i2v=True)
    return config, vcm.random_state_dict(config, seed=3)


@pytest.fixture(scope="module")
def image_tower(tiny_i2v):
    config, state_dict = tiny_i2v
    return vcm.build(state_dict, config).image_encoder.clip.eval()


@pytest.mark.parametrize("height,width,channels", [(1, 1, 3), (3, 7, 4), (17, 1001, 1), (320, 512, 2)])
def test_start_images_of_any_size_and_channel_count_give_the_same_token_shape(image_tower, height, width, channels):
    """What VideoCrafter Image Encode runs: IMAGE -> images_to_model -> the CLIP tower (squash to 224)."""
    with torch.no_grad():
        tokens = image_tower(logic.images_to_model(torch.rand(2, height, width, channels)))
        reference = image_tower(logic.images_to_model(torch.rand(2, 224, 224, 3)))
    assert tokens.shape == reference.shape and torch.isfinite(tokens).all()


def test_rgba_start_image_encodes_like_its_rgb(image_tower):
    rgb = torch.rand(1, 40, 60, 3)
    rgba = torch.cat([rgb, torch.rand(1, 40, 60, 1)], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(image_tower(logic.images_to_model(rgba)), image_tower(logic.images_to_model(rgb)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("images,videos,ok", [(1, 1, True), (1, 4, True), (3, 3, True), (2, 1, False), (2, 3, False)])
def test_image_batch_must_be_one_or_one_per_video(images, videos, ok):
    message = logic.image_batch_problem(images, videos)
    if ok:
        assert message is None
    else:
        assert f"{images} images but {videos} videos" in message and "one image per video" in message
        one_sentence(message)


# ---- numbers: frames, fps, steps, cfg, eta ------------------------------------------------------------


@pytest.mark.parametrize("values,words", [
    ((512, 320, logic.MAX_FRAMES + 1, 8, 1), "frames must be a whole number from 1 to 256"),
    ((512, 320, 10**9, 8, 1), "frames must be"),
    ((512, 320, 16, logic.MAX_FPS + 1, 1), "fps must be from 0"),
    ((512, 320, 16, 8, logic.MAX_BATCH + 1), "batch_size must be from 1"),
])
def test_huge_conditioning_numbers_are_refused(values, words):
    message = logic.conditioning_problem(*values)
    assert words in message
    one_sentence(message)


@pytest.mark.parametrize("steps,cfg,eta,words", [
    (0, 12.0, 1.0, "steps must be a whole number from 1 to 1000"),
    (1001, 12.0, 1.0, "steps must be"),
    (2.5, 12.0, 1.0, "steps must be"),
    (True, 12.0, 1.0, "steps must be"),
    (50, -0.5, 1.0, "cfg must be a number from 0 to 100"),
    (50, 100.5, 1.0, "cfg must be"),
    (50, float("nan"), 1.0, "cfg must be"),
    (50, float("inf"), 1.0, "cfg must be"),
    (50, 12.0, -0.01, "eta must be from 0"),
    (50, 12.0, 1.5, "not the duration"),
    (50, 12.0, float("nan"), "eta must be"),
])
def test_sampler_numbers_out_of_range_are_refused(steps, cfg, eta, words):
    message = logic.sampler_problem(steps, cfg, eta)
    assert message is not None and words in message, message
    one_sentence(message)


@pytest.mark.parametrize("values", [(1, 0.0, 0.0), (50, 12.0, 1.0), (1000, 100.0, 1.0), (50, 12, 0), (None, None, None)])
def test_sampler_numbers_in_range_pass(values):
    assert logic.sampler_problem(*values) is None


# ---- prompts: long contexts never mix with image tokens -------------------------------------------------


def _unet(config, state_dict):
    resampler = config.image_encoder.resampler if config.image_encoder is not None else None
    with torch.device("meta"):
        unet = diffusion.VideoCrafterUNet(config.unet, resampler)
    weights = {k[len("model.diffusion_model."):]: v for k, v in state_dict.items() if k.startswith("model.diffusion_model.")}
    weights.update({k: v for k, v in state_dict.items() if k.startswith("image_proj_model.")})
    unet.load_state_dict(weights, strict=True, assign=True)
    return unet.eval()


@pytest.mark.parametrize("i2v", [False, True])
def test_over_long_prompts_work_and_stay_text(i2v, tiny_i2v):
    """CLIP Text Encode turns a prompt over 77 tokens into 154+ (two chunks), and ComfyUI batches a 77- with a
    154-token context by repeating the shorter one. Attention over a repeated context equals attention over
    the original, so a 154-token [c, c] must give what [c] gives; a U-Net that split text and image tokens at
    a fixed position 77 (as the official one concatenates them) would read the second copy as image tokens."""
    config = tiny_i2v[0] if i2v else config_mod.tiny_config()
    state_dict = tiny_i2v[1] if i2v else vcm.random_state_dict(config, seed=4)
    unet = _unet(config, state_dict)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 16, generator=g)
    text = torch.randn(1, 77, config.unet.context_dim, generator=g)
    kwargs = {"fps": torch.tensor([8])}
    if i2v:
        width = config.image_encoder.resampler.embedding_dim
        kwargs["clip_tokens"] = torch.randn(1, 50, width, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        short = unet(x, t, context=text, **kwargs)
        repeated = unet(x, t, context=torch.cat([text, text], dim=1), **kwargs)
        longer = unet(x, t, context=torch.randn(1, 231, config.unet.context_dim, generator=g), **kwargs)
        empty_like = unet(x, t, context=torch.zeros(1, 77, config.unet.context_dim), **kwargs)
    torch.testing.assert_close(repeated, short, rtol=1e-4, atol=1e-5)
    assert longer.shape == short.shape and torch.isfinite(longer).all() and torch.isfinite(empty_like).all()
    if i2v:  # the image branch is live: other image tokens change the result
        with torch.no_grad():
            other = unet(x, t, context=text, fps=kwargs["fps"], clip_tokens=torch.randn_like(kwargs["clip_tokens"]))
        assert (other - short).abs().max() > 1e-4


# ---- out of memory ------------------------------------------------------------------------------------------


def cuda_oom(size="2.00 GiB"):
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size}. GPU 0 has a total capacity of 8 GiB")


def test_unet_out_of_memory_says_what_to_lower(monkeypatch):
    """Every sampler (KSampler, SamplerCustom, VideoCrafter Sampler) runs the U-Net through this forward."""
    config = config_mod.tiny_config()
    unet = diffusion.VideoCrafterUNet(config.unet)

    def exhausted(self, *args, **kwargs):
        raise cuda_oom()

    monkeypatch.setattr(pack_module("vc_model.unet").UNet3D, "forward", exhausted)
    with pytest.raises(torch.OutOfMemoryError) as info:
        unet(torch.zeros(2, 4, 16, 40, 64), torch.tensor([1.0, 1.0]), context=torch.zeros(2, 77, 64))
    message = str(info.value)
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)  # what ComfyUI checks before unloading models
    assert "sampling 16 frames at 512x320 (U-Net batch 2)" in message
    assert "lower frames, width/height or batch_size in VideoCrafter Conditioning" in message
    assert "weight_dtype fp16 or bf16" in message  # fp32 weights
    assert "Tried to allocate 2.00 GiB" in message and "\n" not in message


def test_half_precision_unet_is_not_told_to_halve_its_weights(monkeypatch):
    unet = diffusion.VideoCrafterUNet(config_mod.tiny_config().unet).half()
    monkeypatch.setattr(pack_module("vc_model.unet").UNet3D, "forward", lambda self, *a, **k: (_ for _ in ()).throw(cuda_oom()))
    with pytest.raises(torch.OutOfMemoryError) as info:
        unet(torch.zeros(1, 4, 2, 8, 8), torch.tensor([1.0]), context=torch.zeros(1, 77, 64))
    assert "weight_dtype" not in str(info.value) and "batch_size" in str(info.value)


def test_other_errors_pass_unchanged_and_explanations_are_not_nested():
    with pytest.raises(ValueError, match="^plain$"):
        with guards.explain_out_of_memory(lambda: ("x", "y")):
            raise ValueError("plain")
    with pytest.raises(torch.OutOfMemoryError) as info:
        with guards.explain_out_of_memory(lambda: ("sampling", "outer advice")):
            with guards.explain_out_of_memory(lambda: ("running the U-Net", "inner advice")):
                raise cuda_oom()
    assert str(info.value).count("Out of memory while") == 1 and "inner advice" in str(info.value)


def test_cpu_allocator_failure_is_explained_too():
    with pytest.raises(torch.OutOfMemoryError, match="Out of memory while decoding.*lower it"):
        with guards.explain_out_of_memory(lambda: ("decoding", "lower it")):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes.")


def test_failed_work_is_freed_before_the_error_reaches_comfyui():
    """The explained error must not keep the failed step's tensors alive through its traceback."""
    ref = {}

    def work():
        big = torch.empty(1000, 1000)
        ref["big"] = weakref.ref(big)
        raise cuda_oom()

    with pytest.raises(torch.OutOfMemoryError) as info:
        with guards.explain_out_of_memory(lambda: ("working", "less")):
            work()
    assert info.value is not None and ref["big"]() is None


def test_chunked_work_explains_which_chunk_ran_out():
    calls = []

    def fn(piece):
        calls.append(piece.shape[0])
        if len(calls) == 2:
            raise cuda_oom()
        return piece * 2

    describe = lambda a, b: guards.coding_oom("decoding", "VideoCrafter Decode", a, b, 6, 2, "512x320")  # noqa: E731
    with pytest.raises(torch.OutOfMemoryError) as info:
        guards.map_chunks(fn, torch.arange(6.0), 2, describe=describe)
    message = str(info.value)
    assert calls == [2, 2]
    assert "decoding frames 3-4 of 6 (512x320)" in message
    assert "lower frames_per_chunk in VideoCrafter Decode (now 2" in message
    _, advice = guards.coding_oom("decoding", "VideoCrafter Decode", 0, 1, 6, 1, "512x320")
    assert "even one frame at a time does not fit" in advice


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


def test_interrupt_is_checked_before_every_chunk_and_returns_nothing():
    state = {"chunks": 0, "progress": 0, "stop_after": 2}

    def check():
        if state["chunks"] >= state["stop_after"]:
            raise Interrupted()

    def fn(piece):
        state["chunks"] += 1
        return piece

    with pytest.raises(Interrupted):
        guards.map_chunks(fn, torch.arange(10.0), 3, check_interrupt=check,
                          progress=lambda: state.__setitem__("progress", state["progress"] + 1))
    assert state["chunks"] == 2 and state["progress"] == 2
    state.update(chunks=0, progress=0, stop_after=99)
    out = guards.map_chunks(fn, torch.arange(10.0), 3, check_interrupt=check)
    assert torch.equal(out, torch.arange(10.0)) and state["chunks"] == 4


# ---- VideoCrafter Decode/Encode with stand-ins for ComfyUI --------------------------------------------------


class FakeVAE:
    """comfy.sd.VAE's interface: decode [n,4,h,w] -> [n,8h,8w,3], encode [n,H,W,3] -> [n,4,H/8,W/8]."""

    latent_dim, latent_channels = 2, 4

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at, self.seen = 0, fail_at, []

    def _step(self, x):
        self.calls += 1
        self.seen.append(tuple(x.shape))
        if self.calls == self.fail_at:
            raise cuda_oom("512.00 MiB")

    def decode(self, z):
        self._step(z)
        return z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2).movedim(1, -1) * 0 + 0.5

    def encode(self, pixels):
        self._step(pixels)
        n, h, w, _ = pixels.shape
        return torch.zeros(n, 4, h // 8, w // 8)


@pytest.fixture
def vae_io(monkeypatch):
    """nodes/vae_io.py imported against stand-ins for comfy.model_management and comfy.utils."""
    state = {"interrupt_after": None, "checks": 0, "progress": 0}

    def throw_exception_if_processing_interrupted():
        state["checks"] += 1
        if state["interrupt_after"] is not None and state["checks"] > state["interrupt_after"]:
            raise Interrupted()

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update(self, value):
            state["progress"] += value

    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.intermediate_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    comfy.model_management, comfy.utils = mm, utils
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)
    name = f"{PACK}.nodes.vae_io"
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    module.state = state
    yield module
    sys.modules.pop(name, None)


def test_decode_checks_interrupt_before_each_chunk(vae_io):
    vae = FakeVAE()
    vae_io.state["interrupt_after"] = 2
    with pytest.raises(Interrupted):
        vae_io.decode(vae, torch.zeros(2, 4, 5, 2, 3), frames_per_chunk=3)
    assert vae.calls == 2 and vae_io.state["progress"] == 2  # the third chunk never started
    vae_io.state.update(interrupt_after=None, checks=0, progress=0)
    images = vae_io.decode(FakeVAE(), torch.zeros(2, 4, 5, 2, 3), frames_per_chunk=3)
    assert images.shape == (10, 16, 24, 3) and vae_io.state["checks"] == 4


def test_decode_out_of_memory_names_the_chunk_and_frames_per_chunk(vae_io):
    with pytest.raises(torch.OutOfMemoryError) as info:
        vae_io.decode(FakeVAE(fail_at=2), torch.zeros(1, 4, 16, 40, 64), frames_per_chunk=8)
    message = str(info.value)
    assert "decoding frames 9-16 of 16 (512x320)" in message and "frames_per_chunk in VideoCrafter Decode (now 8" in message


@pytest.mark.parametrize("shape,words", [((1, 4, 40, 64), "image latent"), ((1, 16, 4, 40, 64), "16 channels")])
def test_decode_refuses_other_latents_before_touching_the_vae(vae_io, shape, words):
    vae = FakeVAE()
    with pytest.raises(ValueError, match=words):
        vae_io.decode(vae, torch.zeros(shape), 8)
    assert vae.calls == 0


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_encode_takes_alpha_and_greyscale_frames(vae_io, channels):
    vae = FakeVAE()
    latent = vae_io.encode(vae, torch.rand(6, 64, 128, channels), frames=3, frames_per_chunk=4)
    assert latent.shape == (2, 4, 3, 8, 16)
    assert [s[-1] for s in vae.seen] == [3, 3]


def test_encode_interrupt_and_bad_batch(vae_io):
    vae_io.state["interrupt_after"] = 1
    vae = FakeVAE()
    with pytest.raises(Interrupted):
        vae_io.encode(vae, torch.rand(6, 64, 64, 3), frames=0, frames_per_chunk=2)
    assert vae.calls == 1
    vae_io.state["interrupt_after"] = None
    with pytest.raises(ValueError, match="cannot be split into videos of 4 frames"):
        vae_io.encode(FakeVAE(), torch.rand(6, 64, 64, 3), frames=4, frames_per_chunk=2)


# ---- checkpoint files in the loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t2v():
    return vcm.random_state_dict(config_mod.tiny_config(), seed=5)


def _write(path: Path, state_dict) -> str:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save({"state_dict": state_dict}, str(path))
    return str(path)


def refusal(path) -> str:
    with pytest.raises(CheckpointError) as info:
        check.inspect_checkpoint(str(path))
    message = str(info.value)
    one_sentence(message)
    assert os.path.basename(str(path)) in message
    return message


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_checkpoints_are_refused_at_validation(tmp_path, tiny_t2v, suffix, keep):
    whole = _write(tmp_path / f"whole{suffix}", tiny_t2v)
    data = Path(whole).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    message = refusal(cut)
    assert "truncated" in message and ("download" in message or "convert" in message)


@pytest.mark.parametrize("name,content", [
    ("empty.safetensors", b""), ("empty.ckpt", b""),
    ("notes.ckpt", b"these are my notes, not a model\n" * 20),
    ("photo.safetensors", b"\x89PNG\r\n\x1a\n" + bytes(200)),
    ("photo.pth", b"\x89PNG\r\n\x1a\n" + bytes(200)),
])
def test_files_that_are_not_checkpoints_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    refusal(path)


@pytest.mark.parametrize("obj,words", [
    (torch.zeros(3), "holds a Tensor, not a state dict"),
    ({"epoch": 3, "note": "no weights"}, "contains no tensors"),
])
def test_torch_files_without_a_state_dict_are_refused(tmp_path, obj, words):
    path = tmp_path / "thing.ckpt"
    torch.save(obj, str(path))
    assert words in refusal(path)


U = "model.diffusion_model."
DYNAMICRAFTER_UNET = {U + "input_blocks.0.0.weight": (320, 8, 3, 3), U + "input_blocks.1.2.norm.weight": (320,),
                      U + "init_attn.0.norm.weight": (320,), U + "framestride_embed.0.weight": (1280, 320),
                      U + "fps_embedding.0.weight": (1280, 320),
                      "image_proj_model.latents": (1, 16, 1024), "embedder.model.visual.conv1.weight": (1280, 3, 14, 14),
                      "cond_stage_model.model.token_embedding.weight": (49408, 1024),
                      "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
FOREIGN = {
    "sd15.safetensors": ({U + "input_blocks.0.0.weight": (320, 4, 3, 3),
                          U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                          "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "Stable Diffusion 1.x"),
    "sd21.ckpt": ({U + "input_blocks.0.0.weight": (320, 4, 3, 3),
                   U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                   "cond_stage_model.model.token_embedding.weight": (49408, 1024),
                   "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
                   "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3), "alphas_cumprod": (1000,)},
                  "Stable Diffusion 2.x"),
    "sdxl.safetensors": ({U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "label_emb.0.0.weight": (1280, 2816),
                          "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                          "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
                          "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "SDXL"),
    "dynamicrafter_512.ckpt": (DYNAMICRAFTER_UNET, "DynamiCrafter or ToonCrafter"),
    "tooncrafter_512_interp.safetensors": ({**DYNAMICRAFTER_UNET,
                                            "first_stage_model.decoder.up.0.block.0.time_stack.in_layers.0.weight": (128,),
                                            "first_stage_model.decoder.conv_out.time_mix_conv.weight": (3, 3, 3, 1, 1)},
                                           "DynamiCrafter or ToonCrafter"),
    "vae_ft_mse.safetensors": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},
                               "standalone VAE"),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_other_model_families_are_named_with_what_to_do(tmp_path, name):
    keys, words = FOREIGN[name]
    path = _write(tmp_path / name, {k: torch.zeros(shape) for k, shape in keys.items()})
    message = refusal(path)
    assert words in message and "not a VideoCrafter checkpoint" in message
    assert "the loader needs an official VideoCrafter model.ckpt" in message


@pytest.mark.parametrize("parts,words", [
    (("cond_stage_model.model.",), "holds text encoder but no U-Net or VAE"),
    (("model.diffusion_model.", "first_stage_model."), "holds U-Net, VAE but no text encoder"),
    (("embedder.model.visual.", "image_proj_model."), "holds image encoder but no U-Net or VAE or text encoder"),
])
def test_partial_videocrafter_files_say_what_they_hold(tmp_path, tiny_i2v, parts, words):
    _, state_dict = tiny_i2v
    path = _write(tmp_path / "part.safetensors", {k: v for k, v in state_dict.items() if k.startswith(parts)})
    message = refusal(path)
    assert "partial checkpoint" in message and words in message and "complete VideoCrafter model.ckpt" in message


class Payload:
    """Unpickling this runs `touch <marker>`."""

    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


@pytest.mark.parametrize("name,style", [("evil.ckpt", "zip"), ("evil.pt", "legacy"), ("evil.bin", "zip"),
                                        ("evil.pth", "legacy")])
def test_malicious_pickle_is_refused_by_the_loader_and_never_executed(tmp_path, tiny_t2v, name, style):
    Payload.marker = tmp_path / "pwned"
    path = tmp_path / name
    if style == "zip":
        torch.save({"state_dict": tiny_t2v, "callbacks": Payload()}, str(path))
    else:
        path.write_bytes(pickle.dumps({"state_dict": {"w": Payload()}}, protocol=2))
    message = refusal(path)
    assert "Refused" in message and "arbitrary code" in message and "nothing in it was executed" in message
    with pytest.raises(CheckpointError):  # what the loader reads after validation refuses it the same way
        checkpoint_mod.lazy_state_dict(str(path))
    assert not Payload.marker.exists()


def test_every_pickle_read_of_the_loader_is_weights_only(tmp_path, tiny_t2v, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = _write(tmp_path / "good.ckpt", tiny_t2v)
    check._cache.clear()
    assert check.inspect_checkpoint(path).unet is not None
    checkpoint_mod.lazy_state_dict(path)
    assert calls and all(flag is True for flag in calls)


def test_repeated_refusals_do_not_grow(tmp_path):
    """ComfyUI validates the loader at every prompt: a cached refusal must not chain tracebacks."""
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"garbage" * 10)
    lengths = []
    for _ in range(5):
        try:
            check.inspect_checkpoint(str(path))
        except CheckpointError as error:
            lengths.append(len(traceback.extract_tb(error.__traceback__)))
    assert len(lengths) == 5 and len(set(lengths)) == 1


def test_a_replaced_file_is_inspected_again(tmp_path, tiny_t2v):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"half a download")
    refusal(path)
    _write(path, tiny_t2v)
    assert check.inspect_checkpoint(str(path)).unet is not None


def test_unreadable_files_get_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "locked.ckpt"
    path.write_bytes(b"\x80\x02}q\x00.")

    def denied(_path):
        raise PermissionError(13, "Permission denied", str(_path))

    monkeypatch.setattr(check, "header_state_dict", denied)
    assert "cannot be read (Permission denied)" in refusal(path)
