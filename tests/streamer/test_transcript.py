"""Utterance transcripts: who spoke, when (from the audio) and what, written as they end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from duplex.model.tokenizer import EOT, PAD
from duplex.streamer.transcript import Transcript, VoiceActivity

FS = 320


def _tone(n: int, level: float = 0.1) -> np.ndarray:
    return (level * np.sin(np.arange(n * FS) * 0.2)).astype(np.float32)


def test_utterances_take_their_times_from_the_audio_and_end_at_eot():
    """The model writes 'hi there' at frames 10-17 (EOT at 18) and speaks frames 12-30; the user
    speaks frames 40-60 and their transcript arrives at 44-52."""
    out = io.StringIO()
    tr = Transcript(50.0, out)
    model_text = {10 + i: c for i, c in enumerate("hi there")}
    user_text = {44 + i: c for i, c in enumerate("ada ")}
    n = 120
    for f in range(n):
        pcm_out = _tone(1)[:FS] if 12 <= f < 30 else np.zeros(FS, np.float32)
        pcm_in = _tone(1, 0.05)[:FS] if 40 <= f < 60 else np.zeros(FS, np.float32) + 1e-4
        text = model_text.get(f, "")
        tokens = [0] * 8 + [EOT if f == 18 else (ord(text) if text else PAD), PAD]
        tr.frame(f, pcm_in, pcm_out, text, user_text.get(f, ""), tokens)
        if f == 40:
            # The model's line was written (and flushed) when its speech had ended.
            assert [json.loads(x)["speaker"] for x in out.getvalue().splitlines()] == ["model"]
    tr.close()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == tr.lines
    model, user = lines
    assert model == {"speaker": "model", "start": 0.24, "end": 0.6, "text": "hi there"}
    assert user["speaker"] == "user" and user["text"] == "ada"
    assert user["start"] == pytest.approx(0.8, abs=0.021)
    assert user["end"] == pytest.approx(1.2, abs=0.021)


def test_an_unfinished_utterance_is_not_written_until_it_ends(tmp_path):
    path = tmp_path / "t.jsonl"
    tr = Transcript(50.0, path)
    for f in range(30):
        tr.frame(f, np.zeros(FS), _tone(1)[:FS], "a" if f < 20 else "", "", None)
    assert path.read_text() == ""
    for f in range(30, 120):
        tr.frame(f, np.zeros(FS), np.zeros(FS), "", "", None)
    # A second without text closed it; the line is whole and on disk.
    assert json.loads(path.read_text())["text"] == "a" * 20
    tr.close()


def test_voice_activity_follows_the_noise_floor():
    vad = VoiceActivity()
    rng = np.random.default_rng(0)
    noise = [0.01 * rng.standard_normal(FS).astype(np.float32) for _ in range(50)]
    assert not any(vad(x) for x in noise[10:])
    assert vad(noise[0] + _tone(1, 0.2)[:FS])


def test_oracle_loop_transcript_matches_the_script():
    """Through the real engine with the scripted oracle: every user request and model answer
    is one line, with the script's words, at the script's times."""
    from duplex import codecs
    from duplex.apps import eval_talk as E
    from duplex.data import dialogue as G
    from duplex.data import domain as D
    from duplex.streamer.engine import Engine

    codec, offline = codecs.load("default"), codecs.load("default")
    bank = G.WordBank(codec.sample_rate)
    rng = np.random.default_rng(2)
    tl = G.Timeline(bank, rng, G.user_voice(rng, "eval"), "eval", "pairs", G.Augment())
    tl.request("tell_name")
    tl.request("arithmetic")
    d = tl.render()
    model = E.ScriptedLM()
    with Engine(model, codec, slots=1) as engine:
        (heard,) = E.run_dialogues(engine, [d], scripted=model, script_codec=offline)
    lines = heard.transcript
    assert [x["speaker"] for x in lines] == ["user", "model", "user", "model"]
    reqs = [e for e in d.events if e["kind"] == "request"]
    for e, u, m in zip(reqs, lines[::2], lines[1::2], strict=True):
        assert u["text"] == e["text"] and m["text"] == e["answer"]
        assert D.normalize(u["text"]) == D.normalize(e["text"])
        assert abs(u["start"] - e["start"]) < 0.06 and abs(u["end"] - e["end"]) < 0.1
        # Model speech: its script's times plus one frame of acoustic delay.
        assert abs(m["start"] - e["reply_start"] - 0.02) < 0.06
        assert abs(m["end"] - e["reply_end"] - 0.02) < 0.1
