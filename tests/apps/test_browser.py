"""The page `duplex serve` answers at `/`, in a real browser: headless chromium whose fake
microphone plays a spoken WAV, driven over the DevTools protocol (tests/apps/browser.py).

The server is the real one (in-process, real websockets on 127.0.0.1) around the shipped
model and codec, so what the page shows is a real conversation: the model's words, the user's
words as the model heard them, the latency panel. The assertions read what the page itself
keeps (`window.duplex`) and what it shows (the DOM), so a page that stopped rendering fails too.

The server here lets a session queue two minutes of the page's audio (`--queue-frames`) instead
of its ten frames: on this 2-core machine, chromium beside the server and the shipped model and
codec leave the server about two thirds of real time (measured: with ten frames it dropped half
the page's input, the model heard fragments of the requests and often said nothing for a
minute; with the queue it drops none and answers within about 15 s). What this test checks is
the page; whether the server keeps up is `benchmarks/serve_load.py`'s question.
A screenshot of the phone-sized page is kept as benchmarks/results/web_page.png.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from duplex.apps.server import DuplexServer, ServeConfig
from tests.apps.browser import Page, chromium, find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (scripts/sysdeps.sh installs it)"
)

ROOT = Path(__file__).resolve().parents[2]
WAV = ROOT / "duplex" / "assets" / "hello.wav"
SHOT = ROOT / "benchmarks" / "results" / "web_page.png"
TOKEN = "s3cret"
# Two minutes of 20 ms frames (see the module doc).
QUEUE_FRAMES = 6000


@pytest.fixture(scope="module")
def parts():
    from duplex.streamer.conversation import ConversationConfig, load_parts

    torch.set_num_threads(1)
    return load_parts(ConversationConfig("default", "default"))


@contextlib.asynccontextmanager
async def serving(parts, port: int = 0) -> AsyncIterator[DuplexServer]:
    from duplex.streamer.engine import Engine

    model, codec = parts
    cfg = ServeConfig(
        port=port,
        max_sessions=2,
        token=TOKEN,
        ping_interval=None,
        model_name="default",
        queue_frames=QUEUE_FRAMES,
    )
    with Engine(model, codec, slots=cfg.max_sessions) as engine:
        server = DuplexServer(engine, cfg)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


async def start(page: Page, port: int, query: str) -> None:
    await page.goto(f"http://127.0.0.1:{port}/?{query}")
    await page.js("document.getElementById('start').click()")


def text(id_: str) -> str:
    return f"document.getElementById('{id_}').textContent"


async def test_page_talks_types_saves_and_loads(parts) -> None:
    async with serving(parts) as server, chromium(WAV) as page:
        await start(page, server.port, f"token={TOKEN}&wire=opus")
        await page.until("duplex.connected", what="HELLO")
        assert await page.js("duplex.wire") == "opus", await page.js("duplex.opusFallback")
        # Frames flow both ways: the page sends its microphone, the server answers each frame.
        await page.until("duplex.sent > 50 && duplex.received > 50", 60, "frames both ways")
        conn = next(iter(server.conns))
        assert conn.opus_out is not None and conn.opus_in is not None
        assert conn.lane.frames_in > 50
        # The latency panel fills: frame sent -> answer, round trip, server step.
        await page.until(
            f"{text('lat-frame')} !== '–' && {text('lat-rtt')} !== '–'"
            f" && {text('lat-server')}.includes('step')",
            30,
            "the latency panel",
        )
        # The model hears the spoken request (its transcript of the user) and answers in words.
        await page.until("duplex.userText.trim().length > 3", 60, "the user's transcript")
        await page.until("duplex.modelText.trim().length > 3", 150, "the model's words")
        assert conn.lane.dropped == 0
        assert await page.js(text("model-text")) == await page.js("duplex.modelText")
        # Typed text reaches the model: the server says at which frame it enters, and it comes
        # back in the model's own transcript of the user's text stream.
        await page.js(
            "document.getElementById('type-text').value = 'hello there';"
            "document.getElementById('type-form').requestSubmit()"
        )
        await page.until("duplex.typed.length === 1", 30, "the typed event")
        await page.until("duplex.userText.includes('hello there')", 30, "typed text in the model")
        # Save the state (a signed STATE the page offers as a download), load it back.
        await page.js("document.getElementById('save').click()")
        await page.until("duplex.statesSaved === 1", 30, "STATE")
        await page.js("duplex.loadState(duplex.lastState)")
        await page.until("duplex.events.some(e => e.event === 'state_loaded')", 30, "state_loaded")
        assert await page.js("duplex.errors.length") == 0, await page.js("duplex.errors")
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(SHOT)
    assert SHOT.stat().st_size > 10_000


async def test_wrong_token_is_refused_visibly(parts) -> None:
    async with serving(parts) as server, chromium(WAV) as page:
        await start(page, server.port, "token=wrong")
        await page.until(f"{text('error')}.includes('wrong or missing token')", 30, "the refusal")
        assert await page.js("document.getElementById('error').hidden") is False
        assert await page.js("duplex.running") is False
        assert await page.js(text("status")) == "refused"
        assert not server.conns


async def test_page_reconnects_after_the_server_restarts(parts) -> None:
    async with chromium(WAV) as page:
        async with serving(parts) as first:
            port = first.port
            await start(page, port, f"token={TOKEN}&wire=pcm")
            await page.until("duplex.connected && duplex.received > 20", 60, "PCM frames")
            assert next(iter(first.conns)).opus_in is None
            before = await page.js("duplex.session")
        await page.until("!duplex.connected", 10, "the page to see the server go")
        async with serving(parts, port) as second:
            await page.until("duplex.connected && duplex.session !== " + repr(before), 60)
            received = await page.js("duplex.received")
            await page.until(f"duplex.received > {received + 20}", 60, "frames after")
            assert await page.js("duplex.reconnects") >= 1
            assert len(second.conns) == 1
        await asyncio.sleep(0)
