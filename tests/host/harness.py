"""A real ComfyUI server for host tests: start it on loopback with the pack and tiny checkpoints, talk to it.

Usage (pytest puts `tests/host/` on `sys.path`, as it has no `__init__.py`)::

    import pytest
    from harness import require_comfyui
    require_comfyui()                      # module-level skip, with the reason, without COMFYUI_PATH
    from harness import comfy_server, mp4_info
    from vc_model.config import tiny_config

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        base = tmp_path_factory.mktemp("comfy_base")
        with comfy_server(base, {"tiny.safetensors": tiny_config()}) as srv:
            yield srv

    def test_something(server):
        status, reply = server.post_prompt(graph)            # POST /prompt -> (http status, json)
        entry = server.wait(reply["prompt_id"], timeout=60)   # /history entry once finished (bounded)
        outputs = server.run_ok(graph)                        # both, asserting success -> entry["outputs"]
        path = server.output_file(outputs["8"]["images"][0])  # under server.output_dir

`comfy_server(base, checkpoints)` writes each checkpoint (`{file name: ModelConfig or state dict}`; a
ModelConfig becomes `vc_model.random_state_dict(config, seed=7)`; `.safetensors` names are written with
safetensors, other names as an official-style `{"state_dict": ...}` torch pickle) into
`base/models/videocrafter/`, links the pack into `base/custom_nodes/`, starts
`main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <base> --fp32-text-enc
--preview-method latent2rgb --disable-auto-launch` from COMFYUI_PATH with COMFYUI_PYTHON (default: the
interpreter running pytest) and OMP_NUM_THREADS=1 unless set, waits until it answers (bounded), yields a
`Server`, and stops the whole process group afterwards. Anything else the tests need (input images,
foreign checkpoints) can be written into `base` before the call (`prepare_base` makes the folders).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK_DIR_NAME = "comfyui-videocrafter"
START_TIMEOUT = 180
RUN_TIMEOUT = 240
SKIP_REASON = ("COMFYUI_PATH is not set: the ComfyUI host tests need a ComfyUI v0.8.0 checkout "
               "(COMFYUI_PATH=/path/to/ComfyUI, optionally COMFYUI_PYTHON=its python)")


def require_comfyui() -> None:
    """Skip the calling test module (visibly, with the reason) when COMFYUI_PATH is not set."""
    if not COMFYUI_PATH:
        import pytest

        pytest.skip(SKIP_REASON, allow_module_level=True)


# ---- files -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(path: Path, weights, seed: int = 7) -> None:
    """Write a checkpoint: `weights` is a state dict or a ModelConfig (-> random weights, official layout)."""
    import torch

    if not isinstance(weights, Mapping):
        import vc_model

        weights = vc_model.random_state_dict(weights, seed=seed)
    tensors = {k: v.contiguous() for k, v in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".safetensors", ".sft"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, str(path))


def write_image(path: Path, width: int = 120, height: int = 72) -> Path:
    """A smooth RGB gradient PNG (deterministic), e.g. an I2V start image."""
    import torch
    from PIL import Image

    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = torch.stack([xs, ys, 1 - xs * ys], dim=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()).save(path)
    return path


def prepare_base(base: Path, checkpoints: Mapping | None = None, seed: int = 7) -> Path:
    """Make the folders of a ComfyUI base directory, link the pack, write the checkpoints; idempotent."""
    base = Path(base)
    for folder in ("models/videocrafter", "models/checkpoints", "custom_nodes", "input", "output"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.is_symlink():
        os.symlink(ROOT, link)
    for name, weights in (checkpoints or {}).items():
        write_checkpoint(base / "models" / "videocrafter" / name, weights, seed=seed)
    return base


def mp4_info(path: Path) -> tuple[int, int, int]:
    """(decoded frame count, width, height) of a video file's first video stream."""
    import av

    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        stream = container.streams.video[0]
        return frames, stream.codec_context.width, stream.codec_context.height


def error_message(entry: dict) -> str:
    """'NodeType: message' of a failed /history entry (or its status as JSON)."""
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return f"{data['node_type']}: {data['exception_message']}"
    return json.dumps(entry["status"])[:2000]


# ---- execution events -------------------------------------------------------------------------------


class ExecutionWatcher:
    """Records ComfyUI's "executing" events ({prompt id: [node ids in order]}) from its websocket.

    A minimal stdlib websocket client (text frames from the server are unmasked; nothing is sent but the
    handshake), read on a daemon thread so no event is missed between two looks. Start it before queueing
    the prompts it should see; `wait_node` then returns once a prompt has started a given node."""

    def __init__(self, port: int, client_id: str):
        import base64
        import threading

        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(1)
            if not chunk:
                raise AssertionError("ComfyUI closed the websocket during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")
        self._sock.settimeout(None)
        self.started: dict[str, list[str]] = {}
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                first, second = self._exact(2)
                length = second & 0x7F
                if length == 126:
                    length = int.from_bytes(self._exact(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._exact(8), "big")
                payload = self._exact(length)
                if first & 0x0F != 1:  # only text frames carry JSON events
                    continue
                message = json.loads(payload)
                data = message.get("data") or {}
                if message.get("type") == "executing" and data.get("node") is not None:
                    with self._changed:
                        self.started.setdefault(data.get("prompt_id"), []).append(str(data["node"]))
                        self._changed.notify_all()
        except (EOFError, OSError, ValueError):
            return

    def wait_node(self, prompt_id: str, node_id: str, timeout: float = 120) -> None:
        """Block until `prompt_id` has started node `node_id`."""
        with self._changed:
            if not self._changed.wait_for(lambda: node_id in self.started.get(prompt_id, []), timeout):
                raise AssertionError(f"prompt {prompt_id} did not reach node {node_id} within {timeout} s "
                                     f"(started: {self.started.get(prompt_id)})")

    def close(self) -> None:
        self._sock.close()


# ---- server ------------------------------------------------------------------------------------------


class Server:
    """A running ComfyUI: `url`, `base` (its base directory), `output_dir`, `input_dir`, `log`, `process`."""

    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path):
        self.base, self.port, self.process, self.log = Path(base), port, process, Path(log)
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = "vc-host-tests"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def request(self, path: str, body=None, timeout: float = 30):
        """GET (body None) or POST JSON -> (http status, decoded JSON or None). HTTP errors are returned."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                text = reply.read()
                return reply.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text or b"null")
            except ValueError:
                return error.code, text.decode(errors="replace")

    def object_info(self, node: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/<node> -> that node's entry."""
        status, info = self.request("/object_info" if node is None else f"/object_info/{node}", timeout=60)
        assert status == 200, f"/object_info answered {status}: {info}"
        return info if node is None else info[node]

    def post_prompt(self, graph: dict, workflow: dict | None = None):
        """POST /prompt with an API-format graph (optionally the UI workflow as extra_pnginfo) -> (status, reply)."""
        body = {"prompt": graph, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.request("/prompt", body)

    queue = post_prompt

    def history(self, prompt_id: str | None = None) -> dict:
        """GET /history/<id> ({} until the entry appears) or the whole /history."""
        _, reply = self.request("/history" if prompt_id is None else f"/history/{prompt_id}")
        return reply or {}

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        """Poll /history until the prompt finished (success or error) -> its entry; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            history = self.history(prompt_id)
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = RUN_TIMEOUT) -> dict:
        """Queue (asserting it is accepted without node errors) and wait -> the /history entry."""
        status, reply = self.post_prompt(graph)
        assert status == 200 and not reply.get("node_errors"), f"rejected ({status}): {reply}"
        return self.wait(reply["prompt_id"], timeout)

    def run_ok(self, graph: dict, timeout: float = RUN_TIMEOUT) -> dict:
        """`run`, asserting success -> the entry's `outputs` ({node id: ui output})."""
        entry = self.run(graph, timeout)
        assert entry["status"]["status_str"] == "success", f"{error_message(entry)}\n{self.log_tail()}"
        return entry["outputs"]

    def watch(self) -> ExecutionWatcher:
        """A websocket watcher of this server's "executing" events for our prompts (see ExecutionWatcher)."""
        return ExecutionWatcher(self.port, self.client_id)

    def interrupt(self, prompt_id: str | None = None) -> int:
        """POST /interrupt (global, or only that prompt) -> http status."""
        return self.request("/interrupt", {} if prompt_id is None else {"prompt_id": prompt_id})[0]

    def output_file(self, item: dict) -> Path:
        """Path of one saved file from a ui output item ({filename, subfolder, type})."""
        folder = self.input_dir if item.get("type") == "input" else self.output_dir
        return folder / item.get("subfolder", "") / item["filename"]

    def upload_image(self, path: Path, name: str | None = None, overwrite: bool = True) -> str:
        """POST /upload/image (multipart) -> the name to use in LoadImage."""
        boundary = uuid.uuid4().hex
        name = name or Path(path).name
        parts = [
            (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode() + Path(path).read_bytes() + b"\r\n",
            (f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\n'
             f"{'true' if overwrite else 'false'}\r\n").encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        req = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=30) as reply:
            answer = json.loads(reply.read())
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@contextmanager
def comfy_server(base: Path, checkpoints: Mapping | None = None, extra_args: tuple[str, ...] = (),
                 start_timeout: float = START_TIMEOUT, seed: int = 7) -> Iterator[Server]:
    """Start ComfyUI on a free loopback port with `base` as base directory (see the module docstring)."""
    if not COMFYUI_PATH:
        raise RuntimeError(SKIP_REASON)
    base = prepare_base(base, checkpoints, seed=seed)
    port = free_port()
    log = base / "server.log"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add overhead, more so on a busy machine
    command = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
               str(base), "--fp32-text-enc", "--preview-method", "latent2rgb", "--disable-auto-launch",
               *extra_args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    server = Server(base, port, process, log)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited while starting ({process.returncode}):\n{server.log_tail()}")
            try:
                if server.request("/system_stats", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not answer within {start_timeout} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)
        shutil.rmtree(base / "custom_nodes", ignore_errors=True)
