"""`duplex connect`: its TUI against a real server on 127.0.0.1, and client-side recordings
that `duplex replay --check` re-runs token for token on a local copy of the model."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from textual.widgets import Log, Static

from duplex.apps import connect as connect_cmd
from duplex.apps import protocol as P
from duplex.apps.remote_feed import RemoteFeed
from duplex.apps.replay import replay
from duplex.apps.serve import DuplexServer
from duplex.apps.tui import DuplexApp, TalkOptions
from duplex.codecs import load as load_codec
from duplex.model.duplex_lm import load
from duplex.streamer.recording import Recording
from tests.apps.terminal import REPO, Terminal, duplex_env
from tests.apps.test_serve import running as serving
from tests.apps.test_tui import quit_time

# Hot text sampling, so the random tiny model writes into the transcript.
SAMPLING = {"seed": 5, "text_temperature": 1.5, "text_top_k": 0}


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return load("tiny"), load_codec("default")


@pytest.fixture
def wav(tmp_path) -> Path:
    p = tmp_path / "in.wav"
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    x = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(p, x.astype(np.float32), 16000, subtype="PCM_16")
    return p


@contextlib.asynccontextmanager
async def running(parts) -> AsyncIterator[DuplexServer]:
    # A queue deep enough that a loaded machine drops nothing.
    async with serving(parts, queue_frames=256, sampling=SAMPLING) as server:
        yield server


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    connect_cmd.add_arguments(p)
    return p.parse_args(list(argv))


def _config(args: argparse.Namespace) -> connect_cmd.ConnectConfig:
    return connect_cmd.ConnectConfig(
        url=args.url,
        text=args.text,
        tail_seconds=args.tail,
        record=args.record,
        load_state=args.load_state,
        save_state=args.save_state,
    )


def _check(directory: Path) -> Recording:
    """The recording replays locally with every token equal; returns it."""
    rec = Recording.load(directory)
    assert rec.frames and all(ev["tokens_out"] for ev in rec.frames)
    frames, mismatch, _ = replay(directory, verbose=False)
    assert frames == len(rec.frames) and mismatch is None, f"first mismatch at {mismatch}"
    return rec


async def test_headless_record_with_typing_and_a_loaded_state_replays_exactly(
    parts, tmp_path, wav, capsys
) -> None:
    state, rec1, rec2 = tmp_path / "s.dstate", tmp_path / "first", tmp_path / "second"
    async with running(parts) as server:
        url = f"ws://127.0.0.1:{server.port}/"
        args = _args(url, "--input", str(wav), "--text", "hello there", "--tail", "0.2")
        args.record, args.save_state = str(rec1), str(state)
        assert await connect_cmd._main(_config(args), args) == 0
        # A second conversation continues from the saved state.
        args = _args(url, "--input", str(wav), "--tail", "0.2", "--text", "again")
        args.record, args.load_state = str(rec2), str(state)
        assert await connect_cmd._main(_config(args), args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.count("[record]") == 2, captured.err
    first = _check(rec1)
    # 2 s of input plus 0.2 s of tail at 50 frames/s, all answered.
    assert len(first.frames) == 110
    assert [c["text"] for c in first.controls if c["kind"] == "type"] == ["hello there"]
    assert first.header["source"] == "connect" and first.header["config"]["sampling"] == {
        **first.header["config"]["sampling"],
        **SAMPLING,
    }
    second = _check(rec2)
    # It starts where the saved state left off, from the state it loaded.
    assert (rec2 / "initial.dstate").read_bytes() == state.read_bytes()
    assert second.frames[0]["i"] == 110
    assert not (tmp_path / "second-1").exists()


async def test_a_tampered_client_recording_fails_the_check(parts, tmp_path, wav) -> None:
    rec = tmp_path / "rec"
    async with running(parts) as server:
        args = _args(f"ws://127.0.0.1:{server.port}/", "--input", str(wav), "--tail", "0")
        args.record = str(rec)
        assert await connect_cmd._main(_config(args), args) == 0
    lines = (rec / "events.jsonl").read_text().splitlines()
    ev = json.loads(lines[40])
    ev["tokens_out"][0] = (ev["tokens_out"][0] + 1) % 256
    lines[40] = json.dumps(ev)
    (rec / "events.jsonl").write_text("\n".join(lines) + "\n")
    _, mismatch, _ = replay(rec, verbose=False)
    assert ev["t"] == "frame" and mismatch == ev["i"]


async def _until(pilot, cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.1)


async def test_tui_against_a_server_every_key_and_recorded_segments(parts, tmp_path) -> None:
    long_wav = tmp_path / "long.wav"
    t = np.arange(16000 * 30) / 16000
    sf.write(long_wav, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    state, rec = tmp_path / "tui.dstate", tmp_path / "rec"
    async with running(parts) as server:
        url = f"ws://127.0.0.1:{server.port}/"
        args = _args(url, "--input", str(long_wav), "--output", str(tmp_path / "o.wav"))
        args.record = str(rec)
        feed = RemoteFeed(_config(args), args)
        app = DuplexApp(feed, TalkOptions(str(state), title="duplex connect test"))
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: feed.client.c.received > 40)
            await pilot.pause(0.3)
            assert "".join(app.query_one("#model", Log).lines).strip()
            latency = str(app.query_one("#latency_text", Static).render())
            assert "sent -> answer" in latency and "round trip" in latency
            assert "session" in str(app.query_one("#facts", Static).render())

            await pilot.press("f2")
            await _until(pilot, lambda: feed.muted)
            await pilot.pause(0.3)
            await pilot.press("f2")
            await _until(pilot, lambda: not feed.muted)

            await pilot.click("#typed")
            await pilot.press(*"hi", "enter")
            await _until(pilot, lambda: "> hi" in "".join(app.query_one("#you", Log).lines))

            await pilot.press("f3")
            await _until(pilot, lambda: feed.paused)
            sent = feed.client.c.sent
            await pilot.pause(0.5)
            assert feed.client.c.sent == sent
            await pilot.press("f3")
            await _until(pilot, lambda: feed.client.c.sent > sent + 5)

            await pilot.press("f5")
            await _until(pilot, lambda: state.is_file())
            assert state.read_bytes().startswith(P.STATE_MAGIC)
            await pilot.press("f7")
            await _until(pilot, lambda: (tmp_path / "rec-1" / "events.jsonl").is_file())
            await _until(pilot, lambda: Recording.load(tmp_path / "rec-1").frames)
            await pilot.press("f6")
            await _until(pilot, lambda: (tmp_path / "rec-2" / "initial.dstate").is_file())
            await _until(pilot, lambda: len(Recording.load(tmp_path / "rec-2").frames) > 5)
            # Ctrl+Q quits at once, though the server shares this event loop (a quit that
            # blocks the loop while joining the feed took 5 s: the server could not answer).
            took = await quit_time(pilot)
            assert took < 2, f"Ctrl+Q took {took:.1f} s"
        feed.join(10)
        assert not feed.is_alive() and feed.exit_code == 0
    first = _check(rec)
    assert [c["text"] for c in first.controls if c["kind"] == "type"] == ["hi "]
    silent = [i for i, _ in enumerate(first.frames) if not first.input_frame(i).any()]
    assert silent, "muted frames are recorded as the silence that was sent"
    _check(tmp_path / "rec-1")
    third = _check(tmp_path / "rec-2")
    # The loaded state was saved after the first segment's frames.
    assert third.frames[0]["i"] > 40


@pytest.mark.slow
def test_tmux_connect_shows_the_remote_session_and_records_it(tmp_path, wav) -> None:
    """`duplex connect` in a real terminal against a real `duplex serve` process."""
    server = subprocess.Popen(
        [sys.executable, "-m", "duplex", "serve", "--port", "0", "--max-sessions", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=duplex_env(),
    )
    rec = tmp_path / "rec"
    try:
        line = server.stdout.readline()
        assert line, server.stderr.read()
        port = json.loads(line)["port"]
        args = ["connect", f"ws://127.0.0.1:{port}", "--input", str(wav)]
        args += ["--output", str(tmp_path / "out.wav"), "--record", str(rec)]
        args += ["--text", "zebra", "--tail", "30"]
        with Terminal(args) as term:
            screen = term.wait_for(
                lambda s: "sent -> answer" in s and "round trip" in s and "recv" in s
            )
            assert "duplex connect ws://127.0.0.1" in screen, screen
            assert "You" in screen and "Model" in screen and "Latency" in screen, screen
            assert "sent -> answer" in screen and "round trip" in screen, screen
            status, took = term.quit()
            assert status == 0, f"Ctrl+Q did not quit cleanly (status {status})\n{term.screen()}"
            assert took < 5, f"Ctrl+Q took {took:.1f} s to quit"
    finally:
        server.terminate()
        server.wait(timeout=30)
    recording = _check(rec)
    assert [c["text"] for c in recording.controls if c["kind"] == "type"] == ["zebra"]


async def test_a_frame_whose_send_the_connection_lost_is_sent_on_the_next_one() -> None:
    """The connection drops during the third frame's send: the next connection starts with that
    frame, so the two together carry every frame once, in order (a reconnect loses no audio;
    the null-sink restart test once counted 99 of 100 when the drop hit a send)."""
    from types import SimpleNamespace

    from websockets.exceptions import ConnectionClosedError

    from duplex.apps.connect_config import ConnectConfig
    from duplex.apps.remote_client import Client

    frames = [np.full(4, 0.1 * (k + 1), np.float32) for k in range(5)]

    class Source:
        paced_by_device = False

        def __init__(self) -> None:
            self.left = list(frames)

        async def read(self, loop):
            return self.left.pop(0) if self.left else None

    class Wire:
        def __init__(self, fail_at: int | None) -> None:
            self.fail_at, self.calls, self.got = fail_at, 0, []

        async def send(self, data: bytes) -> None:
            self.calls += 1
            if self.calls == self.fail_at:
                raise ConnectionClosedError(None, None)
            self.got.append(data)

        async def close(self, code: int, reason: str) -> None:
            pass

    client = Client(ConnectConfig(url="ws://127.0.0.1:1/"), None)
    client.hello = SimpleNamespace(frame_size=4, frame_rate=1000.0)
    client.source = Source()
    client.last_audio = 0.0
    first, second = Wire(fail_at=3), Wire(fail_at=None)
    await client._send(first)
    assert len(first.got) == 2 and not client.input_done
    await client._send_frames(second)
    want = [P.encode(P.Audio(k, P.pcm_to_int16(f)), "client") for k, f in enumerate(frames)]
    assert first.got + second.got == want
    assert client.c.sent == 5
