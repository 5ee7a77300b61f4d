"""A real browser for tests: Debian's chromium, headless, driven over the DevTools protocol.

Nothing is downloaded: the browser is the system's (`scripts/sysdeps.sh` installs it), and the
DevTools client is a few lines over `websockets`, which duplex already needs. The microphone is
chromium's fake capture device playing a WAV file (it loops), and permission prompts are
answered yes, so a page's getUserMedia gets that file as a real MediaStream through the same
audio stack a person's microphone goes through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The system's chromium, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class PageError(AssertionError):
    """A script in the page threw, or the page did not get where a test waited for it to go."""


class Page:
    """One browser tab over a DevTools websocket: evaluate scripts, wait, take screenshots."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            fut = self.pending.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"].get("args", [])
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in args)
                )
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])

    async def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict:
        """One DevTools command; its result, or PageError with the browser's message."""
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        msg = await asyncio.wait_for(fut, timeout)
        if "error" in msg:
            raise PageError(f"{method}: {msg['error']}")
        return msg["result"]

    async def js(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a script in the page (awaited if it is a promise)."""
        res = await self.call(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in res:
            raise PageError(f"{expression!r} threw: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete' && !!window.duplex", what="load")

    async def until(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Poll a script until it is truthy (every 100 ms): wait for an event, not a guess."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.js("JSON.stringify(window.duplex || null).slice(0, 1500)")
                raise PageError(
                    f"timed out after {timeout:g} s waiting for {what or expression}; "
                    f"page state: {state}; console: {self.console[-10:]}"
                )
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        res = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(res["data"]))


@contextlib.asynccontextmanager
async def chromium(
    wav: Path, width: int = 412, height: int = 915, binary: str | None = None
) -> AsyncIterator[Page]:
    """A headless chromium whose microphone plays `wav`; yields its one tab."""
    from websockets.asyncio.client import connect

    exe = binary or find_chromium()
    if exe is None:
        raise RuntimeError("no chromium found: run scripts/sysdeps.sh (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="duplex-chromium-"))
    argv = [
        exe,
        "--headless=new",
        # Tests run as root in CI, where chromium's sandbox cannot start.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--mute-audio",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port in 60 s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        target = next(t for t in targets if t["type"] == "page")
        async with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            page = Page(ws)
            await page.call("Runtime.enable")
            await page.call("Page.enable")
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=True,
            )
            try:
                yield page
            finally:
                page.reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
