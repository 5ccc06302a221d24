"""The bundled workflows, without ComfyUI: they parse, are well-formed UI graphs, use only core nodes and
ours, keep the official defaults, and each UI workflow and its API twin describe the same graph.

`WIDGETS` (the widget inputs of every node type the workflows use, in the frontend's order) is what maps
a UI node's positional `widgets_values` to named inputs; tests/host/test_workflows.py checks it against a
live ComfyUI's /object_info, and reuses `ui_to_api` from here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "workflows" / "ui"
API_DIR = ROOT / "workflows" / "api"
EXAMPLES = ROOT / "example_workflows"  # the template browser's folder: the UI graphs again
# ComfyUI lists every *.json directly inside these folders of a pack as a template (only example_workflows
# is kept as such): keeping the rest in subfolders lists each workflow once and no API graph.
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")

# kind -> (checkpoint, width, height, conditioning fps, I2V)
KINDS = {
    "videocrafter2_t2v_512": ("videocrafter2_t2v_512.ckpt", 512, 320, 28, False),
    "videocrafter1_t2v_1024": ("videocrafter1_t2v_1024.ckpt", 1024, 576, 28, False),
    "videocrafter1_i2v_512": ("videocrafter1_i2v_512.ckpt", 512, 320, 8, True),
    "videocrafter2_t2v_512_long": ("videocrafter2_t2v_512.ckpt", 512, 320, 16, False),
}
# Long-video workflows (FreeNoise): kind -> (frames, eta, window, stride); the others are 16 frames at eta 1
LONG = {"videocrafter2_t2v_512_long": (64, 0.0, 16, 4)}
I2V_IMAGE = "example.png"  # LoadImage's default: ComfyUI ships input/example.png, so a fresh install opens it

# T2V-Turbo workflows: kind -> (checkpoint, T2V-Turbo file, steps, conditioning fps, mp4 fps)
TURBO_KINDS = {
    "videocrafter2_turbo_4step": ("videocrafter2_t2v_512.ckpt", "t2v_turbo_vc2_unet_lora.pt", 4, 16, 16),
}
ALL_KINDS = [*KINDS, *TURBO_KINDS]

OUR_TYPES = {"VideoCrafterCheckpointLoader", "VideoCrafterImageEncode", "VideoCrafterConditioning",
             "VideoCrafterSampler", "VideoCrafterDDIMSampler", "VideoCrafterDecode", "VideoCrafterEncode",
             "VideoCrafterLongVideo", "VideoCrafterFreeNoiseNoise", "VideoCrafterPromptTravel",
             "VideoCrafterApplyTurbo", "VideoCrafterTurboSampler"}
CORE_TYPES = {"CLIPTextEncode", "LoadImage", "CreateVideo", "SaveVideo", "KSampler"}
VIRTUAL_TYPES = {"MarkdownNote", "Note"}  # frontend-only notes: never sent to the server

# Extra values the frontend stores in widgets_values after some widgets (not inputs of the node):
CONTROL = "control_after_generate"  # after a seed: what to do with it after queueing
UPLOAD = "upload"  # after LoadImage's image: the upload button's value, "image"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

WIDGETS = {
    "VideoCrafterCheckpointLoader": ["ckpt_name", "weight_dtype"],
    "VideoCrafterImageEncode": [],
    "VideoCrafterConditioning": ["width", "height", "frames", "fps", "batch_size"],
    "VideoCrafterSampler": ["seed", CONTROL, "steps", "cfg", "eta"],
    "VideoCrafterDecode": ["frames_per_chunk"],
    "VideoCrafterLongVideo": ["window", "stride", "reschedule_noise"],
    "VideoCrafterApplyTurbo": ["turbo_name", "guidance", "motion_guidance", "motion_percentage"],
    "VideoCrafterTurboSampler": ["seed", CONTROL, "steps"],
    "CLIPTextEncode": ["text"],
    "LoadImage": ["image", UPLOAD],
    "CreateVideo": ["fps"],
    "SaveVideo": ["filename_prefix", "format", "codec"],
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ui_path(kind: str) -> Path:
    return UI_DIR / f"{kind}.json"


def api_path(kind: str) -> Path:
    return API_DIR / f"{kind}.json"


def widget_values(node: dict, names: list[str]) -> dict:
    """{input name: value} of a UI node's positional widgets_values (CONTROL/UPLOAD entries under their marker)."""
    values = node.get("widgets_values") or []
    assert len(values) == len(names), f"node {node['id']} ({node['type']}): widgets_values {values} vs {names}"
    return dict(zip(names, values))


def ui_to_api(ui: dict, widgets: dict[str, list[str]] = WIDGETS) -> dict:
    """What the frontend queues for a UI workflow: {id: {"class_type", "inputs"}} (no _meta), notes and
    muted/bypassed nodes left out. Links become [source id, output slot]."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_TYPES or node.get("mode", 0) != 0:
            continue
        inputs = {name: value for name, value in widget_values(node, widgets[node["type"]]).items()
                  if name not in (CONTROL, UPLOAD)}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in api.items()}


def all_json_files() -> list[Path]:
    return sorted((ROOT / "workflows").rglob("*.json")) + sorted(EXAMPLES.glob("*.json"))


# ---- files ---------------------------------------------------------------------------------------------


def test_every_json_file_parses():
    files = all_json_files()
    assert files, "no workflow files found"
    for path in files:
        assert isinstance(load(path), dict), path


def test_each_kind_has_ui_api_and_template_copy():
    names = {f"{kind}.json" for kind in ALL_KINDS}
    for folder in (UI_DIR, API_DIR, EXAMPLES):
        assert {p.name for p in folder.glob("*.json")} == names, folder
    for folder in TEMPLATE_FOLDERS[1:]:
        assert not list((ROOT / folder).glob("*.json")), f"{folder}/*.json would be listed as templates too"
    for kind in ALL_KINDS:
        assert load(EXAMPLES / f"{kind}.json") == load(ui_path(kind)), f"example_workflows/{kind}.json differs"


# ---- UI format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_ui_workflow_is_well_formed(kind):
    ui = load(ui_path(kind))
    assert ui["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in ui, key
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    assert ui["last_node_id"] >= max(nodes)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) and ui["last_link_id"] >= max(link_ids)
    for node in nodes.values():
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, f"node {node['id']} lacks {key}"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and node["mode"] == 0
        if node["type"] not in VIRTUAL_TYPES:
            assert node["properties"]["Node name for S&R"] == node["type"]
            for slot, output in enumerate(node["outputs"]):
                assert output.get("slot_index", slot) == slot
    assert sorted(node["order"] for node in nodes.values()) == list(range(len(nodes)))
    # every link is recorded at both ends, with the same type, and runs forward in execution order
    for link_id, source, source_slot, target, target_slot, kind_ in ui["links"]:
        output = nodes[source]["outputs"][source_slot]
        slot = nodes[target]["inputs"][target_slot]
        assert link_id in (output["links"] or []), f"link {link_id} missing at node {source}"
        assert slot["link"] == link_id, f"link {link_id} missing at node {target}"
        assert output["type"] == slot["type"] == kind_, f"link {link_id}: {output['type']} -> {slot['type']} ({kind_})"
        assert nodes[source]["order"] < nodes[target]["order"]
    used = {(n["id"], i) for n in nodes.values() for i, s in enumerate(n["inputs"]) if s.get("link") is not None}
    assert used == {(link[3], link[4]) for link in ui["links"]}
    for node in nodes.values():
        for output in node["outputs"]:
            for link_id in output["links"] or []:
                assert link_id in link_ids
    for node in nodes.values():
        if node["type"] in VIRTUAL_TYPES:
            assert not node["inputs"] and not node["outputs"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_only_core_and_our_node_types(kind):
    ui_types = {node["type"] for node in load(ui_path(kind))["nodes"]} - VIRTUAL_TYPES
    api_types = {node["class_type"] for node in load(api_path(kind)).values()}
    assert ui_types <= OUR_TYPES | CORE_TYPES, ui_types - OUR_TYPES - CORE_TYPES
    assert api_types == ui_types
    assert set(WIDGETS) >= ui_types


# ---- UI <-> API ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_ui_and_api_twin_describe_the_same_graph(kind):
    ui, api = load(ui_path(kind)), load(api_path(kind))
    assert ui_to_api(ui) == strip_meta(api)
    for node in ui["nodes"]:
        names = WIDGETS.get(node["type"], [])
        if CONTROL in names:
            assert widget_values(node, names)[CONTROL] in CONTROL_VALUES
        if UPLOAD in names:
            assert widget_values(node, names)[UPLOAD] == "image"
    for key, node in api.items():
        assert node["_meta"]["title"]
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link: [source id, output slot] of a node that has that output
                source = next(n for n in ui["nodes"] if str(n["id"]) == value[0])
                assert isinstance(value[1], int) and value[1] < len(source["outputs"]), (key, value)


@pytest.mark.parametrize("kind", KINDS)
def test_official_defaults_and_mp4_output(kind):
    ckpt, width, height, fps, i2v = KINDS[kind]
    api = load(api_path(kind))
    by_type = {}
    for key, node in api.items():
        by_type.setdefault(node["class_type"], []).append((key, node["inputs"]))
    (_, loader), = by_type["VideoCrafterCheckpointLoader"]
    assert loader == {"ckpt_name": ckpt, "weight_dtype": "auto"}
    frames, eta, window, stride = LONG.get(kind, (16, 1.0, None, None))
    (_, cond), = by_type["VideoCrafterConditioning"]
    assert (cond["width"], cond["height"], cond["frames"], cond["fps"], cond["batch_size"]) == (width, height, frames, fps, 1)
    (sampler_id, sampler), = by_type["VideoCrafterSampler"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["eta"]) == (123, 50, 12.0, eta)
    if window is None:
        assert "VideoCrafterLongVideo" not in by_type and sampler["model"] == ["1", 0]
    else:  # FreeNoise on the sampler's MODEL, with the official window, stride and rescheduled noise
        (long_id, long), = by_type["VideoCrafterLongVideo"]
        assert long == {"model": ["1", 0], "window": window, "stride": stride, "reschedule_noise": True}
        assert sampler["model"] == [long_id, 0]
    assert sampler["latent_image"][0] in dict(by_type["VideoCrafterConditioning"])
    texts = sorted(inputs["text"] for _, inputs in by_type["CLIPTextEncode"])
    assert texts[0] == "" and texts[1], "an example prompt and the official empty negative prompt"
    (decode_id, decode), = by_type["VideoCrafterDecode"]
    assert decode["samples"] == [sampler_id, 0]
    (create_id, create), = by_type["CreateVideo"]
    assert create["images"] == [decode_id, 0] and create["fps"] == 10  # the official scripts save at 10 fps
    (_, save), = by_type["SaveVideo"]
    assert save["video"] == [create_id, 0] and (save["format"], save["codec"]) == ("mp4", "h264")
    assert save["filename_prefix"] == f"video/{kind}"
    if i2v:
        (image_id, image), = by_type["LoadImage"]
        assert image == {"image": I2V_IMAGE}
        (encode_id, encode), = by_type["VideoCrafterImageEncode"]
        assert encode["image"] == [image_id, 0] and encode["image_encoder"][1] == 3
        assert cond["positive"] == [encode_id, 0] and cond["negative"] == [encode_id, 1]
    else:
        assert "LoadImage" not in by_type and "VideoCrafterImageEncode" not in by_type


@pytest.mark.parametrize("kind", TURBO_KINDS)
def test_turbo_workflow_keeps_the_official_turbo_settings(kind):
    ckpt, turbo_file, steps, fps, mp4_fps = TURBO_KINDS[kind]
    api = load(api_path(kind))
    by_type = {}
    for key, node in api.items():
        by_type.setdefault(node["class_type"], []).append((key, node["inputs"]))
    (loader_id, loader), = by_type["VideoCrafterCheckpointLoader"]
    assert loader == {"ckpt_name": ckpt, "weight_dtype": "auto"}
    (apply_id, apply), = by_type["VideoCrafterApplyTurbo"]
    assert apply == {"model": [loader_id, 0], "turbo_name": turbo_file, "guidance": 7.5, "motion_guidance": 0.05,
                     "motion_percentage": 0.5}
    (cond_id, cond), = by_type["VideoCrafterConditioning"]
    assert (cond["width"], cond["height"], cond["frames"], cond["fps"], cond["batch_size"]) == (512, 320, 16, fps, 1)
    (sampler_id, sampler), = by_type["VideoCrafterTurboSampler"]
    assert sampler == {"model": [apply_id, 0], "positive": [cond_id, 0], "latent_image": [cond_id, 2], "seed": 123,
                       "steps": steps}
    assert "VideoCrafterSampler" not in by_type and "KSampler" not in by_type
    (_, text), = by_type["CLIPTextEncode"]
    assert text["text"] and cond["positive"] == cond["negative"]  # no negative prompt: Turbo has no CFG
    (decode_id, decode), = by_type["VideoCrafterDecode"]
    assert decode["samples"] == [sampler_id, 0]
    (create_id, create), = by_type["CreateVideo"]
    assert create["images"] == [decode_id, 0] and create["fps"] == mp4_fps
    (_, save), = by_type["SaveVideo"]
    assert save["video"] == [create_id, 0] and (save["format"], save["codec"]) == ("mp4", "h264")
    assert save["filename_prefix"] == f"video/{kind}"
