"""Open a page in headless Chromium and record what it requested, over the DevTools protocol (aiohttp only).

    from browser import chromium, open_page
    if chromium() is None: pytest.skip(...)
    page = open_page(url, until="window.app?.graph?._nodes?.length > 0", timeout=180)
    page.responses   # [(status, url)] of every HTTP response the page got
    page.value       # the value of `until` once it held (JSON-serialisable)

Used by the host tests to load a workflow template in ComfyUI's frontend as a user would and look for 404s.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from harness import free_port

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class Page:
    responses: list[tuple[int, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # requests that got no response at all
    value: object = None


def open_page(url: str, until: str, timeout: float = 180) -> Page:
    """Load `url`, wait until the JavaScript expression `until` is truthy (then a few seconds more for the
    requests it set off), and return what was recorded. AssertionError if it never holds."""
    executable = chromium()
    assert executable, "no Chromium on PATH"
    port = free_port()
    profile = tempfile.mkdtemp(prefix="vc-chromium-")
    process = subprocess.Popen(
        [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return asyncio.run(_drive(port, url, until, timeout))
    finally:  # Chromium and its helpers: the whole process group it was started in; then its profile
        _stop(process)
        for _ in range(10):  # helpers may still write to the profile for a moment
            shutil.rmtree(profile, ignore_errors=True)
            if not os.path.exists(profile):
                break
            time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            time.sleep(0.5)  # helpers of the group exit after the browser process
        except subprocess.TimeoutExpired:
            continue


async def _drive(port: int, url: str, until: str, timeout: float) -> Page:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        target = None
        while target is None:
            try:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
                    target = next((t for t in await reply.json() if t.get("type") == "page"), None)
            except aiohttp.ClientError:
                pass
            if target is None:
                assert time.monotonic() < deadline, "Chromium did not start"
                await asyncio.sleep(0.5)
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page, pending, counter = Page(), {}, iter(range(1, 1 << 30))

            async def call(method: str, **params):
                number = next(counter)
                pending[number] = asyncio.get_running_loop().create_future()
                await ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
                return await pending[number]

            async def listen():
                async for message in ws:
                    data = json.loads(message.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data.get("result", {}))
                    elif data.get("method") == "Network.responseReceived":
                        response = data["params"]["response"]
                        page.responses.append((response["status"], response["url"]))
                    elif data.get("method") == "Network.loadingFailed":
                        page.failures.append(data["params"].get("errorText", "?"))

            listener = asyncio.create_task(listen())
            try:
                await call("Network.enable")
                await call("Page.enable")
                await call("Page.navigate", url=url)
                while True:
                    result = await call("Runtime.evaluate", expression=f"JSON.stringify(({until}) || null)",
                                        returnByValue=True)
                    value = json.loads(result.get("result", {}).get("value") or "null")
                    if value:
                        page.value = value
                        break
                    assert time.monotonic() < deadline, f"'{until}' never held; responses: {page.responses[-20:]}"
                    await asyncio.sleep(1)
                await asyncio.sleep(5)  # previews and other requests the loaded graph set off
                return page
            finally:
                listener.cancel()
