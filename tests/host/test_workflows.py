"""The bundled workflows against a real ComfyUI (set COMFYUI_PATH to a ComfyUI v0.8.0 checkout).

One server (tests/host/harness.py) with tiny random checkpoints saved under the names the workflows use
(official `{"state_dict": ...}` .ckpt pickles) and, in its input folder, what a fresh ComfyUI has there (the
`input/example.png` ComfyUI ships, which the I2V template opens with).
Each UI workflow is checked against the live /object_info (node types, widget values, link types, and
the same graph as its API twin); each API workflow is queued with its size, frames and steps turned down
to tiny values and must leave an mp4 of the right frame count and size in the output folder. The I2V template
is also opened in headless Chromium (when installed) as the template browser opens it: no request may 404.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from harness import require_comfyui  # tests/host/harness.py (pytest puts tests/host on sys.path)

require_comfyui()

import torch  # noqa: E402
from browser import chromium, open_page  # noqa: E402
from harness import COMFYUI_PATH, comfy_server, mp4_info, prepare_base  # noqa: E402
from vc_model.config import tiny_config  # noqa: E402  (run from the repository root: python -m pytest)
from vc_model.turbo import random_turbo_lora  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "vc_workflow_files", Path(__file__).resolve().parents[1] / "test_workflow_files.py")
wf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wf)

CHECKPOINTS = {"videocrafter2_t2v_512.ckpt": tiny_config(), "videocrafter1_t2v_1024.ckpt": tiny_config(v1=True),
               "videocrafter1_i2v_512.ckpt": tiny_config(i2v=True)}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TINY = {"width": 128, "height": 64, "frames": 4, "steps": 2, "frames_per_chunk": 4}
RUN_TIMEOUT = 180
PACK = "comfyui-videocrafter"
USER_FILES = ("/api/userdata", "/user.css", "/favicon.ico")  # optional per-user files (settings, css, templates), icon


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert {spec[0] for spec in wf.KINDS.values()} == set(CHECKPOINTS)
    base = prepare_base(tmp_path_factory.mktemp("comfy_workflows"))
    for shipped in (Path(COMFYUI_PATH) / "input").iterdir():  # the input folder of a fresh install
        if shipped.is_file():
            shutil.copy(shipped, base / "input" / shipped.name)
    for turbo_file in {spec[1] for spec in wf.TURBO_KINDS.values()}:  # a tiny T2V-Turbo v1 LoRA, official list format
        (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
        torch.save(random_turbo_lora(tiny_config().unet), base / "models" / "loras" / turbo_file)
    with comfy_server(base, CHECKPOINTS) as srv:
        yield srv


@pytest.fixture(scope="module")
def info(server):
    return server.object_info()


# ---- helpers over /object_info ---------------------------------------------------------------------------


def input_specs(entry: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of a node's inputs in input_order (required, then optional)."""
    out = []
    for section in ("required", "optional"):
        for name in entry.get("input_order", {}).get(section, entry["input"].get(section, {})):
            out.append((name, entry["input"][section][name], section == "optional"))
    return out


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def widget_names(entry: dict) -> list[str]:
    """What the frontend puts in widgets_values, in order (seed control and upload button included)."""
    names = []
    for name, spec, _ in input_specs(entry):
        if is_widget(spec):
            names.append(name)
            options = spec[1] if len(spec) > 1 else {}
            if options.get("control_after_generate"):
                names.append(wf.CONTROL)
            if options.get("image_upload"):
                names.append(wf.UPLOAD)
    return names


def value_problem(spec: list, value) -> str | None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices[:12]}"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an INT"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{value!r} is not a FLOAT"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a STRING"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a BOOLEAN"
    else:
        return f"{kind} is not a widget type"
    if "min" in options and value < options["min"]:
        return f"{value} < min {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value} > max {options['max']}"
    return None


# ---- UI workflows against /object_info ----------------------------------------------------------------------


def test_static_widget_table_is_the_servers(info):
    for node_type, names in wf.WIDGETS.items():
        assert node_type in info, f"{node_type} is not registered"
        assert widget_names(info[node_type]) == names, node_type


@pytest.mark.parametrize("kind", wf.ALL_KINDS)
def test_ui_workflow_matches_object_info(info, kind):
    ui = wf.load(wf.ui_path(kind))
    nodes = {node["id"]: node for node in ui["nodes"]}
    problems = []
    for node in nodes.values():
        if node["type"] in wf.VIRTUAL_TYPES:
            continue
        if node["type"] not in info:
            problems.append(f"node {node['id']}: type {node['type']} does not exist")
            continue
        entry = info[node["type"]]
        specs = {name: (spec, optional) for name, spec, optional in input_specs(entry)}
        # widgets: every value valid for its input
        names = widget_names(entry)
        values = node["widgets_values"] or []
        if len(values) != len(names):
            problems.append(f"node {node['id']} ({node['type']}): {len(values)} widget values for {names}")
            continue
        for name, value in zip(names, values):
            if name == wf.CONTROL:
                ok = value in wf.CONTROL_VALUES
            elif name == wf.UPLOAD:
                ok = value == "image"
            else:
                problem = value_problem(specs[name][0], value)
                ok = problem is None
                if problem:
                    problems.append(f"node {node['id']} ({node['type']}).{name}: {problem}")
                continue
            if not ok:
                problems.append(f"node {node['id']} ({node['type']}).{name}: bad value {value!r}")
        # slots: inputs are real link inputs of the node (optional ones drawn as such), outputs as declared
        for slot in node["inputs"]:
            if slot["name"] not in specs:
                problems.append(f"node {node['id']} ({node['type']}) has no input {slot['name']}")
                continue
            spec, optional = specs[slot["name"]]
            if slot["type"] != spec[0] or (slot.get("shape") == 7) != optional:
                problems.append(f"node {node['id']}.{slot['name']}: {slot['type']} (shape {slot.get('shape')}) vs "
                                f"{spec[0]} (optional {optional})")
        declared = [(o["name"], o["type"]) for o in node["outputs"]]
        if declared != list(zip(entry["output_name"], entry["output"])):
            problems.append(f"node {node['id']} outputs {declared} vs {list(zip(entry['output_name'], entry['output']))}")
    # links: output type of the source == input type of the target (or "*")
    for link_id, source, source_slot, target, target_slot, _ in ui["links"]:
        out_type = info[nodes[source]["type"]]["output"][source_slot]
        name = nodes[target]["inputs"][target_slot]["name"]
        in_type = dict((n, s) for n, s, _ in input_specs(info[nodes[target]["type"]]))[name][0]
        if not (out_type == in_type or "*" in (out_type, in_type)):
            problems.append(f"link {link_id}: {nodes[source]['type']} {out_type} -> {nodes[target]['type']}.{name} {in_type}")
    assert not problems, "\n".join(problems)
    # the API twin is what this server's widget order makes of the UI graph
    live = {t: widget_names(info[t]) for t in {n["type"] for n in ui["nodes"]} - wf.VIRTUAL_TYPES}
    assert wf.ui_to_api(ui, live) == wf.strip_meta(wf.load(wf.api_path(kind)))


def test_example_workflows_are_served_as_templates(server):
    status, templates = server.request("/workflow_templates")
    assert status == 200 and sorted(templates.get(PACK, [])) == sorted(wf.ALL_KINDS), templates  # each once, no API
    for kind in wf.ALL_KINDS:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{kind}.json", timeout=30) as reply:
            assert json.loads(reply.read()) == wf.load(wf.EXAMPLES / f"{kind}.json")


def test_i2v_template_opens_an_image_a_fresh_comfyui_has(server):
    assert (Path(COMFYUI_PATH) / "input" / wf.I2V_IMAGE).is_file(), (
        f"ComfyUI no longer ships input/{wf.I2V_IMAGE}: give the I2V template an image it does ship")
    ui = wf.load(wf.EXAMPLES / "videocrafter1_i2v_512.json")
    (loader,) = [node for node in ui["nodes"] if node["type"] == "LoadImage"]
    assert loader["widgets_values"][0] == wf.I2V_IMAGE
    note = next(node for node in ui["nodes"] if node["type"] in wf.VIRTUAL_TYPES)["widgets_values"][0]
    assert f"`{wf.I2V_IMAGE}`" in note and "replace the start image" in note  # the note says what to replace
    assert wf.I2V_IMAGE in server.object_info("LoadImage")["input"]["required"]["image"][0]
    with urllib.request.urlopen(f"{server.url}/api/view?filename={wf.I2V_IMAGE}&type=input", timeout=30) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("image/")


def test_i2v_template_loads_in_the_browser_without_a_404(server):
    """Opened by URL (`/?template=<name>&source=<pack>`, what the template browser loads) in headless Chromium."""
    if chromium() is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium): the browser check of the template "
                    "is skipped; test_i2v_template_opens_an_image_a_fresh_comfyui_has still checks the image")
    loaded = ("(window.app?.graph?._nodes || []).some(n => n.type === 'VideoCrafterImageEncode') && "
              "window.app.graph._nodes.find(n => n.type === 'LoadImage').widgets[0].value")
    page = open_page(f"{server.url}/?template=videocrafter1_i2v_512&source={PACK}", until=loaded, timeout=240)
    assert page.value == wf.I2V_IMAGE
    assert any(status == 200 and "/view?" in url and f"filename={wf.I2V_IMAGE}" in url
               for status, url in page.responses), page.responses  # the preview was fetched, and found
    # a fresh install has no user files and ComfyUI serves no favicon: the frontend asks anyway and gets 404s
    missing = [(status, url) for status, url in page.responses
               if status == 404 and not any(part in url for part in USER_FILES)]
    assert not missing, missing


# ---- API workflows run to an mp4 ---------------------------------------------------------------------------


def tiny_version(api: dict) -> dict:
    """The API graph with size, frames, steps and decode chunks turned down to what a CPU runs in seconds."""
    graph = json.loads(json.dumps(api))
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "VideoCrafterConditioning":
            inputs.update(width=TINY["width"], height=TINY["height"], frames=TINY["frames"])
        elif node["class_type"] in ("VideoCrafterSampler", "VideoCrafterTurboSampler"):
            inputs["steps"] = TINY["steps"]
        elif node["class_type"] == "VideoCrafterDecode":
            inputs["frames_per_chunk"] = TINY["frames_per_chunk"]
    return graph


@pytest.mark.parametrize("kind", wf.ALL_KINDS)
def test_api_workflow_saves_an_mp4(server, kind):
    api = tiny_version(wf.load(wf.api_path(kind)))
    before = set(server.output_dir.rglob("*.mp4"))
    status, reply = server.post_prompt(api, workflow=wf.load(wf.ui_path(kind)))  # as the frontend sends it
    assert status == 200 and not reply.get("node_errors"), reply
    entry = server.wait(reply["prompt_id"], timeout=RUN_TIMEOUT)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    save_id = next(key for key, node in api.items() if node["class_type"] == "SaveVideo")
    items = [item for value in entry["outputs"][save_id].values() if isinstance(value, list) for item in value
             if isinstance(item, dict) and "filename" in item]
    assert len(items) == 1, entry["outputs"]
    path = server.output_file(items[0])
    new = set(server.output_dir.rglob("*.mp4")) - before
    assert new == {path} and path.parent == server.output_dir / "video" and path.name.startswith(kind), (new, path)
    frames, width, height = mp4_info(path)
    assert (frames, width, height) == (TINY["frames"], TINY["width"], TINY["height"])
