"""Session recordings: round trip, and a recording cut by kill -9 loads to its last frame."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from duplex.streamer.recording import Recorder, Recording, RecordingError

FS = 160


def _frame(i: int) -> np.ndarray:
    return (np.sin(np.arange(FS) * 0.01 * (i + 1)) * 0.5).astype(np.float32)


def test_round_trip(tmp_path) -> None:
    with Recorder(tmp_path / "r", {"seed": 3, "model": "m"}, 16000, FS) as rec:
        rec.control(0, "text", text="hello")
        for i in range(5):
            rec.frame(i, _frame(i), -_frame(i), tokens_in=[i, i + 1], tokens_out=[7], text="a")
    r = Recording.load(tmp_path / "r")
    assert not r.truncated
    assert r.header["seed"] == 3 and r.header["frame_size"] == FS
    assert [f["tokens_in"] for f in r.frames] == [[i, i + 1] for i in range(5)]
    assert r.controls == [{"t": "control", "i": 0, "kind": "text", "text": "hello"}]
    np.testing.assert_allclose(r.input_frame(2), _frame(2), atol=1 / 32767)
    # The WAVs are ordinary files other tools read.
    wav, sr = sf.read(tmp_path / "r" / "out.wav", dtype="float32")
    assert sr == 16000 and wav.size == 5 * FS
    np.testing.assert_allclose(wav[:FS], -_frame(0), atol=1 / 32767)


def test_refuses_to_overwrite(tmp_path) -> None:
    Recorder(tmp_path / "r", {}, 16000, FS).close()
    with pytest.raises(FileExistsError):
        Recorder(tmp_path / "r", {}, 16000, FS)


def test_not_a_recording(tmp_path) -> None:
    with pytest.raises(RecordingError, match="no header"):
        Recording.load(tmp_path)
    (tmp_path / "header.json").write_text("{broken")
    with pytest.raises(RecordingError, match="unreadable"):
        Recording.load(tmp_path)


def test_torn_last_line_and_short_audio(tmp_path) -> None:
    with Recorder(tmp_path / "r", {}, 16000, FS) as rec:
        for i in range(4):
            rec.frame(i, _frame(i), _frame(i), tokens_out=[i])
    with open(tmp_path / "r" / "events.jsonl", "a") as f:
        f.write('{"t":"frame","i":4,"tok')
    r = Recording.load(tmp_path / "r")
    assert r.truncated and len(r.frames) == 4


WRITER = """
import sys, time, numpy as np
from duplex.streamer.recording import Recorder
rec = Recorder(sys.argv[1], {"seed": 1}, 16000, 160)
i = 0
while True:
    x = np.full(160, (i % 100) / 100.0, dtype=np.float32)
    rec.frame(i, x, -x, tokens_out=[i] * 8, text="w" * (i % 7))
    if i == 200:
        print("ready", flush=True)
    i += 1
"""


def test_kill_9_leaves_a_loadable_recording(tmp_path) -> None:
    out = tmp_path / "rec"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        # Killed while it goes on writing, at whatever point it has reached.
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    r = Recording.load(out)
    n = len(r.frames)
    assert n > 200
    assert [f["i"] for f in r.frames] == list(range(n))
    assert all(f["tokens_out"] == [f["i"]] * 8 for f in r.frames)
    assert r.audio_in.size == n * 160 and r.audio_out.size == n * 160
    for i in (0, n // 2, n - 1):
        np.testing.assert_allclose(r.input_frame(i), (i % 100) / 100.0, atol=1 / 32767)
    header = json.loads(Path(out / "header.json").read_text())
    assert header["seed"] == 1


PAUSED_WRITER = """
import sys, numpy as np
from duplex.streamer.recording import Recorder
rec = Recorder(sys.argv[1], {"seed": 1}, 16000, 160)
for i in range(137):
    x = np.full(160, (i % 100) / 100.0, dtype=np.float32)
    rec.frame(i, x, -x, tokens_out=[i] * 8, text="w")
print("wrote 137", flush=True)
sys.stdin.read()
"""


def test_kill_9_keeps_every_frame_written(tmp_path) -> None:
    """Killed after its last frame (idle, nothing half-written): all of it is on disk."""
    out = tmp_path / "rec"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_WRITER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "wrote 137"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    r = Recording.load(out)
    assert not r.truncated and [f["i"] for f in r.frames] == list(range(137))
    assert r.audio_in.size == r.audio_out.size == 137 * 160
    np.testing.assert_allclose(r.input_frame(136), 0.36, atol=1 / 32767)
