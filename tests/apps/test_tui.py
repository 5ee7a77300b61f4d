"""The TUI through Textual's Pilot on a WAV input, and in a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from textual.widgets import Log, Static

from duplex.apps.tui import DuplexApp, TalkOptions
from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.audio import FileAudio
from duplex.streamer.engine import Engine, SamplingConfig
from duplex.streamer.statefile import read_header
from tests.apps.terminal import REPO, Terminal, duplex_env

CODEC = os.environ.get("DUPLEX_TEST_CODEC", "default")


@pytest.fixture
def wav(tmp_path):
    p = tmp_path / "in.wav"
    t = np.arange(16000 * 30) / 16000
    sf.write(p, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    return p


async def _until(pilot, cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.1)


async def quit_time(pilot, timeout: float = 10.0) -> float:
    """Press Ctrl+Q; the seconds until the app has stopped running."""
    t0 = time.monotonic()
    await pilot.press("ctrl+q")
    while pilot.app.is_running:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"Ctrl+Q did not quit within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_pilot_transcripts_latency_and_every_key(tmp_path, wav) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    codec = SmallCodec(SmallCodecConfig()).eval()
    model = load("tiny")
    state = tmp_path / "s.dstate"
    audio = FileAudio(16000, 320, wav, tmp_path / "out.wav", realtime=True, tail_frames=100)
    # Greedy text so the random model writes something into the model pane.
    sampling = SamplingConfig(seed=1, text_temperature=1.5, text_top_k=0)
    with Engine(model, codec, slots=1) as engine:
        session = engine.join(sampling)
        audio.start()
        app = DuplexApp.local(engine, session, audio, TalkOptions(str(state)))
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: app.worker.session.frame > 30)
            await pilot.pause(0.3)
            assert "".join(app.query_one("#model", Log).lines).strip()
            latency = str(app.query_one("#latency_text", Static).render())
            assert "total" in latency and "p99" in latency
            assert len(app.spark_data) > 5

            # Typing goes to the user's text stream.
            await pilot.click("#typed")
            await pilot.press(*"hi", "enter")
            await _until(pilot, lambda: "> hi" in "".join(app.query_one("#you", Log).lines))

            await pilot.press("f2")
            await _until(pilot, lambda: app.worker.muted)
            await pilot.press("f2")
            await _until(pilot, lambda: not app.worker.muted)

            await pilot.press("f5")
            await _until(pilot, lambda: state.is_file())
            session = app.worker.session
            frame = read_header(state)["meta"]["frame"]
            await _until(pilot, lambda: session.frame > frame + 5)
            await pilot.press("f6")
            await _until(pilot, lambda: "state loaded" in str(app.query_one("#notice").render()))
            # The same session, restored in place, continues from the frame the state was
            # saved at.
            assert f"(frame {frame})" in str(app.query_one("#notice").render())
            assert app.worker.session is session

            await pilot.press("f7")
            await _until(pilot, lambda: "reset" in str(app.query_one("#notice").render()))
            assert app.worker.session is session

            await pilot.press("f3")
            await _until(pilot, lambda: app.worker.paused)
            frozen = app.worker.session.frame
            await pilot.pause(0.5)
            assert app.worker.session.frame == frozen
            await pilot.press("f3")
            await _until(pilot, lambda: app.worker.session.frame > frozen)

            took = await quit_time(pilot)
            assert took < 2, f"Ctrl+Q took {took:.1f} s"
        assert not app.worker.is_alive()


@pytest.mark.slow
def test_tmux_screen_shows_panes_and_latency(tmp_path, wav) -> None:
    args = ["talk", "--codec", CODEC, "--input", str(wav), "--output", str(tmp_path / "out.wav")]
    args += ["--realtime", "--save-state", str(tmp_path / "s.dstate")]
    with Terminal(args) as term:
        screen = term.wait_for(lambda s: "total" in s and "p99" in s and "frames" in s)
        assert "You" in screen and "Model" in screen, screen
        assert "Latency" in screen and "total" in screen, screen
        assert "Levels" in screen and "Session" in screen, screen
        status, took = term.quit()
        assert status == 0, f"Ctrl+Q did not quit cleanly (status {status})\n{term.screen()}"
        assert took < 5, f"Ctrl+Q took {took:.1f} s to quit"


@pytest.mark.slow
def test_tmux_replay_shows_the_recorded_conversation(tmp_path, wav) -> None:
    rec = tmp_path / "rec"
    talk = ["talk", "--codec", CODEC, "--input", str(wav), "--headless", "--record", str(rec)]
    talk += ["--text", "zebra", "--max-seconds", "2"]
    r = subprocess.run(
        [sys.executable, "-m", "duplex", *talk],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=duplex_env(),
    )
    assert r.returncode == 0, r.stderr
    with Terminal(["replay", str(rec)]) as term:
        screen = term.wait_for(lambda s: "zebra" in s and "total" in s)
        assert "duplex replay" in screen and "zebra" in screen, screen
        status, took = term.quit()
        assert status == 0, f"Ctrl+Q did not quit cleanly (status {status})\n{term.screen()}"
        assert took < 5, f"Ctrl+Q took {took:.1f} s to quit"
