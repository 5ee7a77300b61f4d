"""`--transcript FILE` on talk, replay and connect: whole JSON lines, the same conversation the
same lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from duplex.apps import connect as connect_cmd
from duplex.apps.cli import main
from duplex.streamer.recording import Recording
from tests.apps.test_connect import SAMPLING, _args, _config, parts, running  # noqa: F401


def _lines(path: Path) -> list[dict]:
    out = [json.loads(x) for x in path.read_text().splitlines()]
    for x in out:
        assert set(x) == {"speaker", "start", "end", "text"}
        assert x["speaker"] in ("user", "model") and 0 <= x["start"] <= x["end"] and x["text"]
    return out


def _wav(path: Path) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    x = 0.3 * np.sin(2 * np.pi * 150 * t) * (t % 1.0 < 0.6) + 0.01 * rng.standard_normal(t.size)
    sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")
    return path


def _speech_wav(path: Path) -> Path:
    """A spoken request with silence after it: the shipped model transcribes speech, not a buzz."""
    from duplex.data.speech import Voice, synthesize

    x = synthesize("what is two plus three", Voice("en-us-nyc", "klatt5")).audio
    sr = 16000
    x = np.concatenate([np.zeros(sr // 4, np.float32), x, np.zeros(sr * 4, np.float32)])
    sf.write(path, x, sr, subtype="PCM_16")
    return path


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_talk_and_its_replay_write_the_same_lines(tmp_path):
    wav = _speech_wav(tmp_path / "in.wav")
    a, b, rec = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "rec"
    hot = ["--text-temperature", "1.5", "--text-top-k", "0", "--seed", "3"]
    assert (
        main(
            [
                "talk",
                "--input",
                str(wav),
                "--output",
                str(tmp_path / "o.wav"),
                "--headless",
                "--transcript",
                str(a),
                "--record",
                str(rec),
                *hot,
            ]
        )
        == 0
    )
    lines = _lines(a)
    model = [x for x in lines if x["speaker"] == "model"]
    assert model and any(x["speaker"] == "user" for x in lines)
    # Every piece of text the model wrote (as recorded frame by frame) is in its lines, in order;
    # only the whitespace at utterance edges differs.
    recorded = "".join(ev.get("text", "") for ev in Recording.load(rec).frames)
    assert _squash("".join(x["text"] for x in model)) == _squash(recorded)
    assert main(["replay", str(rec), "--headless", "--transcript", str(b)]) == 0
    assert _lines(b) == lines


async def test_connect_writes_the_lines_of_the_remote_session(parts, tmp_path):  # noqa: F811
    wav = _wav(tmp_path / "in.wav")
    out = tmp_path / "t.jsonl"
    async with running(parts) as server:
        args = _args(
            f"ws://127.0.0.1:{server.port}/",
            "--input",
            str(wav),
            "--tail",
            "0.5",
            "--transcript",
            str(out),
        )
        args.record = str(tmp_path / "rec")
        cfg = _config(args)
        cfg.transcript = args.transcript
        assert await connect_cmd._main(cfg, args) == 0
    lines = _lines(out)
    model = "".join(x["text"] for x in lines if x["speaker"] == "model")
    assert model
    # The client's own recording holds every TEXT message it received.
    events = [json.loads(x) for x in (tmp_path / "rec" / "events.jsonl").read_text().splitlines()]
    recorded = "".join(ev.get("text", "") for ev in events if ev.get("t") == "frame")
    assert _squash(model) == _squash(recorded)


def test_connect_with_a_missing_token_file_is_a_clear_error(capsys):
    assert main(["connect", "ws://127.0.0.1:9/", "--token-file", "/nonexistent/tok"]) == 2
    err = capsys.readouterr().err
    assert "cannot read /nonexistent/tok" in err and "Traceback" not in err


def test_talk_errors_never_print_control_characters(tmp_path, capsys):
    bad = tmp_path / "evil\x1b[2Jname.dstate"
    bad.write_bytes(b"not a state")
    assert (
        main(["talk", "--state", str(bad), "--input", str(_wav(tmp_path / "i.wav")), "--headless"])
        == 2
    )
    err = capsys.readouterr().err
    assert "\x1b" not in err and "duplex talk:" in err
