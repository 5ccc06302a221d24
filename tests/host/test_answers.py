"""Clear answers through ComfyUI's /prompt (set COMFYUI_PATH): each validation message attached to the input it is
about, damaged checkpoints named tensor by tensor, and Load VideoCrafter U-Net with U-Net-only files.

One server (tests/host/harness.py) with tiny random checkpoints, damaged copies of one in models/checkpoints/, and
U-Net-only files in models/diffusion_models/. Every wait is bounded.
"""
from __future__ import annotations

import pytest
from harness import require_comfyui

require_comfyui()

import torch  # noqa: E402
from harness import comfy_server, prepare_base  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import vc_model  # noqa: E402
from vc_model.config import tiny_config  # noqa: E402
from vc_model.schedule import schedule_buffers  # noqa: E402

WIDTH, HEIGHT, FRAMES = 128, 64, 4
T2V, EXACT = "tiny_vc2.safetensors", "tiny_vc1_fp16_values.safetensors"
U = "model.diffusion_model."
CONV_IN = U + "input_blocks.0.0.weight"
NAN_KEY = U + "middle_block.0.in_layers.2.weight"


def _files(base) -> None:
    prepare_base(base)
    good = vc_model.random_state_dict(tiny_config(), seed=7)
    checkpoints = base / "models" / "checkpoints"
    half = dict(good)
    half[CONV_IN] = good[CONV_IN][:16].clone()  # the reported case: half the output channels
    save_file(half, str(checkpoints / "half_conv_in.safetensors"))
    integer = dict(good)
    integer["first_stage_model.decoder.conv_out.bias"] = (good["first_stage_model.decoder.conv_out.bias"] * 9).long()
    torch.save({"state_dict": integer}, str(checkpoints / "int_weight.ckpt"))
    nan = dict(good)
    nan[NAN_KEY] = good[NAN_KEY].clone()
    nan[NAN_KEY].view(-1)[:2] = float("nan")
    save_file(nan, str(checkpoints / "nan_weight.safetensors"))
    # a full checkpoint whose values fp16 holds exactly, and its U-Net alone in fp16 (bare and prefixed keys);
    # tiny v1 has the default schedule, which is what a U-Net alone of an unknown (tiny) model gets
    exact = {k: v.half().float() for k, v in vc_model.random_state_dict(tiny_config(v1=True), seed=5).items()}
    exact.update(schedule_buffers(tiny_config(v1=True).schedule))
    save_file(exact, str(base / "models" / "videocrafter" / EXACT))
    unets = base / "models" / "diffusion_models"
    unets.mkdir(parents=True, exist_ok=True)
    unet = {k[len(U):]: v.half() for k, v in exact.items() if k.startswith(U)}
    save_file(unet, str(unets / "vc_unet_fp16.safetensors"))
    save_file({U + k: v for k, v in unet.items()}, str(unets / "vc_unet_prefixed_fp16.safetensors"))
    save_file(unet, str(base / "models" / "videocrafter" / "unet_alone.safetensors"))
    save_file({"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3), "out.2.weight": torch.zeros(4, 8, 3, 3),
               "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768)},
              str(unets / "sd15_unet.safetensors"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_answers")
    _files(base)
    with comfy_server(base, {T2V: tiny_config()}) as srv:
        yield srv


def graph(ckpt: str = T2V) -> dict:
    """The pack's nodes in one graph: loader, text, conditioning, sampler, decode, encode (one output)."""
    return {
        "1": {"class_type": "VideoCrafterCheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "fp32"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a corgi"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "VideoCrafterConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "width": WIDTH, "height": HEIGHT, "frames": FRAMES,
            "fps": 0, "batch_size": 1, "model": ["1", 0]}},
        "5": {"class_type": "VideoCrafterSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["4", 2], "seed": 1,
            "steps": 1, "cfg": 7.5, "eta": 1.0}},
        "6": {"class_type": "VideoCrafterDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2], "frames_per_chunk": 4}},
        "7": {"class_type": "VideoCrafterEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2], "frames": 0,
                                                             "frames_per_chunk": 4}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/answers"}},
    }


def ddim_graph() -> dict:
    """The SAMPLER node alone, shown by Preview Any (a second output would be queued on its own)."""
    return {"9": {"class_type": "VideoCrafterDDIMSampler", "inputs": {"eta": 0.5}},
            "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}


def unet_graph(unet: str, prefix: str) -> dict:
    """Load VideoCrafter U-Net for the MODEL, CLIP and VAE from the full checkpoint's loader; one sampler step."""
    g = graph(EXACT)
    for node in ("6", "7"):
        del g[node]
    g["11"] = {"class_type": "VideoCrafterUNetLoader", "inputs": {"unet_name": unet, "weight_dtype": "fp32"}}
    g["4"]["inputs"]["model"] = g["5"]["inputs"]["model"] = ["11", 0]
    g["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}}
    return g


def node_errors(server, g: dict) -> dict[str, list[dict]]:
    status, reply = server.post_prompt(g)
    assert status == 400, reply
    return {node: entry["errors"] for node, entry in reply["node_errors"].items()}


def by_input(errors: list[dict]) -> dict[str, str]:
    """{input name: its message and details} of one node's errors."""
    out = {}
    for error in errors:
        name = error["extra_info"]["input_name"]
        assert name not in out, f"two messages on {name}: {errors}"
        out[name] = f"{error['message']} | {error['details']}"
    return out


def saved_latent(server, outputs: dict) -> torch.Tensor:
    return load_file(str(server.output_file(outputs["8"]["latents"][0])))["latent_tensor"]


# ---- one message per input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("node,change,inputs,words", [
    ("4", {"frames": 0}, {"frames"}, "Value 0 smaller than min of 1"),  # the reported case
    ("4", {"fps": 500}, {"fps"}, "Value 500 bigger than max of 120"),
    ("4", {"batch_size": 0}, {"batch_size"}, "smaller than min of 1"),
    ("5", {"steps": 0}, {"steps"}, "Value 0 smaller than min of 1"),
    ("5", {"cfg": 150.0}, {"cfg"}, "Value 150.0 bigger than max of 100.0"),
    ("5", {"eta": 2.0}, {"eta"}, "eta must be from 0 (deterministic) to 1 (the official default), got 2.0; it is "
                                 "not the duration"),
    ("5", {"seed": -1}, {"seed"}, "smaller than min of 0"),
    ("6", {"frames_per_chunk": 0}, {"frames_per_chunk"}, "smaller than min of 1"),
    ("7", {"frames": 300}, {"frames"}, "bigger than max of 256"),
    ("9", {"eta": -1.0}, {"eta"}, "eta must be from 0"),
    ("1", {"weight_dtype": "fp64"}, {"weight_dtype"}, "Value not in list"),
    ("1", {"ckpt_name": "nowhere.ckpt"}, {"ckpt_name"}, "'nowhere.ckpt' is in neither models/videocrafter/ nor "
                                                        "models/checkpoints/"),
])
def test_each_message_is_attached_to_the_input_it_is_about(server, node, change, inputs, words):
    g = ddim_graph() if node == "9" else graph()
    g[node]["inputs"].update(change)
    errors = node_errors(server, g)
    assert set(errors) == {node}, errors  # no other node complains
    messages = by_input(errors[node])
    assert set(messages) == inputs, messages
    assert all(words in text for text in messages.values()), messages


def test_two_wrong_inputs_get_one_message_each(server):
    g = graph()
    g["4"]["inputs"].update(frames=0, fps=500)
    g["5"]["inputs"].update(steps=0, eta=3.0)
    errors = node_errors(server, g)
    assert {node: set(by_input(e)) for node, e in errors.items()} == {"4": {"frames", "fps"}, "5": {"steps", "eta"}}


@pytest.mark.parametrize("change,words", [
    ({"height": 100}, "height 100 is not usable: VideoCrafter needs a multiple of 64 between 64 and 4096 (for example 64)"),
    ({"width": 4160}, "width 4160 is not usable: VideoCrafter needs a multiple of 64 between 64 and 4096"),
])
def test_a_size_the_unet_cannot_take_names_itself_on_width_and_height(server, change, words):
    """The one check of two inputs: width and height are checked together (multiples of 64), and ComfyUI files a
    check's message under every input the check takes, so it shows on both, naming the one that is wrong. The
    browser's number widgets step by 64 within the range, so only hand-written prompts get this message."""
    g = graph()
    g["4"]["inputs"].update(change)
    errors = node_errors(server, g)
    messages = by_input(errors["4"])
    assert set(errors) == {"4"} and set(messages) == {"width", "height"}, messages
    assert all(words in m for m in messages.values()), messages


# ---- damaged checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,words", [
    ("half_conv_in.safetensors", f"In 'half_conv_in.safetensors', tensor '{CONV_IN}' has shape [16, 4, 3, 3] where "
                                 "the model the rest of the file describes needs [32, 4, 3, 3]: the file is damaged "
                                 "or was modified; download it again"),
    ("int_weight.ckpt", "tensor 'first_stage_model.decoder.conv_out.bias' is stored as int64, but every VideoCrafter "
                        "weight is floating point: the file is damaged or was modified"),
])
def test_a_damaged_checkpoint_is_named_on_ckpt_name(server, name, words):
    messages = by_input(node_errors(server, graph(name))["1"])
    assert set(messages) == {"ckpt_name"} and words in messages["ckpt_name"], messages
    assert "num_groups" not in messages["ckpt_name"] and "Exception" not in messages["ckpt_name"]


def test_nan_values_load_with_a_warning_naming_the_tensor(server):
    g = graph("nan_weight.safetensors")
    status, reply = server.post_prompt(g)
    assert status == 200 and not reply.get("node_errors"), reply
    server.wait(reply["prompt_id"], timeout=240)
    log = server.log.read_text(errors="replace")
    assert f"tensor '{NAN_KEY}' (2 values) holds NaN or infinite values" in log, server.log_tail()


# ---- Load VideoCrafter U-Net ------------------------------------------------------------------------------------


def test_unet_loader_model_samples_like_the_full_checkpoint(server):
    full = graph(EXACT)
    for node in ("6", "7"):
        del full[node]
    full["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/full"}}
    reference = saved_latent(server, server.run_ok(full))
    for unet in ("vc_unet_fp16.safetensors", "vc_unet_prefixed_fp16.safetensors"):
        latent = saved_latent(server, server.run_ok(unet_graph(unet, unet.split(".")[0])))
        assert latent.shape == reference.shape and torch.equal(latent, reference), unet


@pytest.mark.parametrize("unet,words", [
    ("sd15_unet.safetensors", "'sd15_unet.safetensors' is a Stable Diffusion 1.x image checkpoint (no temporal "
                              "layers), not a VideoCrafter checkpoint or U-Net"),
    ("missing.safetensors", "is in neither models/videocrafter/ nor models/diffusion_models/"),
])
def test_unet_loader_refuses_other_files_on_unet_name(server, unet, words):
    messages = by_input(node_errors(server, unet_graph(unet, "refused"))["11"])
    assert set(messages) == {"unet_name"} and words in messages["unet_name"], messages


def test_checkpoint_loader_points_a_unet_alone_to_the_unet_loader(server):
    """models/videocrafter/ is listed by both loaders: a U-Net file picked in the checkpoint loader is refused
    with the node that takes it, and the U-Net loader lists it."""
    messages = by_input(node_errors(server, graph("unet_alone.safetensors"))["1"])
    assert set(messages) == {"ckpt_name"}
    assert "partial checkpoint (it holds U-Net but no VAE or text encoder)" in messages["ckpt_name"]
    assert "a U-Net on its own loads with Load VideoCrafter U-Net" in messages["ckpt_name"]
    options = server.object_info("VideoCrafterUNetLoader")["input"]["required"]["unet_name"][1]["options"]
    assert {"vc_unet_fp16.safetensors", "vc_unet_prefixed_fp16.safetensors", "unet_alone.safetensors"} <= set(options)
