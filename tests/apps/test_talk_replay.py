"""`duplex talk` on files and `duplex replay --check`, as users run them (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CODEC = os.environ.get("DUPLEX_TEST_CODEC", "default")


def _duplex(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "duplex", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """Two seconds of a chirpy vowel-like signal at 22.05 kHz (resampled by talk)."""
    p = tmp_path_factory.mktemp("audio") / "in.wav"
    sr = 22050
    t = np.arange(2 * sr) / sr
    x = 0.3 * np.sin(2 * np.pi * (120 + 40 * np.sin(3 * t)) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    sf.write(p, x.astype(np.float32), sr, subtype="PCM_16")
    return p


def test_talk_files_then_replay_check(tmp_path, speech) -> None:
    rec = tmp_path / "rec"
    out = tmp_path / "out.wav"
    r = _duplex(
        "talk",
        "--codec",
        CODEC,
        "--input",
        str(speech),
        "--output",
        str(out),
        "--headless",
        "--record",
        str(rec),
        "--text",
        "hello",
        "--tail",
        "0.5",
        "--save-state",
        str(tmp_path / "end.dstate"),
    )
    assert r.returncode == 0, r.stderr
    assert "[stats] frame" in r.stdout and "[done]" in r.stdout
    y, sr = sf.read(out)
    frames = len((rec / "events.jsonl").read_text().splitlines()) - 1
    assert y.size == frames * 320 and sr == 16000
    assert frames == 2 * 50 + 25
    assert np.abs(y).max() > 0
    controls = [json.loads(x) for x in (rec / "events.jsonl").read_text().splitlines()]
    assert controls[0] == {"t": "control", "i": 0, "kind": "type", "text": "hello"}
    r = _duplex("replay", str(rec), "--check", "--output", str(tmp_path / "again.wav"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every token matches" in r.stdout
    again, _ = sf.read(tmp_path / "again.wav")
    np.testing.assert_allclose(again, y, atol=1e-4)

    # Continue from the saved state, recorded; the replay starts from the copied state.
    rec2 = tmp_path / "rec2"
    r = _duplex(
        "talk",
        "--codec",
        CODEC,
        "--state",
        str(tmp_path / "end.dstate"),
        "--input",
        str(speech),
        "--headless",
        "--record",
        str(rec2),
        "--max-seconds",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert (rec2 / "initial.dstate").is_file()
    r = _duplex("replay", str(rec2), "--check")
    assert r.returncode == 0, r.stdout + r.stderr

    # A tampered recording fails the check.
    lines = (rec / "events.jsonl").read_text().splitlines()
    ev = json.loads(lines[10])
    ev["tokens_out"][0] = (ev["tokens_out"][0] + 1) % 256
    lines[10] = json.dumps(ev)
    (rec / "events.jsonl").write_text("\n".join(lines) + "\n")
    r = _duplex("replay", str(rec), "--check")
    assert r.returncode == 1
    assert "first mismatch at frame 9" in r.stdout


def test_killed_talk_leaves_a_replayable_recording(tmp_path, speech) -> None:
    rec = tmp_path / "rec"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "duplex",
            "talk",
            "--codec",
            CODEC,
            "--input",
            str(speech),
            "--headless",
            "--realtime",
            "--record",
            str(rec),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ev = rec / "events.jsonl"
            if ev.exists() and ev.read_text().count("\n") >= 40:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    r = _duplex("replay", str(rec), "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    n = int(r.stdout.split("[replay] ")[-1].split()[0])
    assert 40 <= n < 125


def test_clear_errors(tmp_path, speech) -> None:
    r = _duplex("talk", "--codec", CODEC, "--input", str(tmp_path / "nope.wav"), "--headless")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _duplex("talk", "--model", "nope", "--input", str(speech), "--headless")
    assert r.returncode == 2 and "unknown model" in r.stderr
    bad = tmp_path / "bad.dstate"
    bad.write_bytes(b"garbage" * 100)
    r = _duplex("talk", "--codec", CODEC, "--state", str(bad), "--input", str(speech), "--headless")
    assert r.returncode == 2 and "not a duplex state file" in r.stderr
    r = _duplex("replay", str(tmp_path))
    assert r.returncode == 2 and "not a duplex recording" in r.stderr
    r = _duplex("talk", "--help")
    assert r.returncode == 0 and "--record" in r.stdout and "Examples" in r.stdout
