"""The engine's session API, used directly: reset, restore (paths, bytes, checked), state bytes,
refusals that change nothing, and the one recording (header and starting state) for every
front end. A restored or reset session is checked against what a fresh engine does, batch-mates
included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from duplex.apps.replay import replay
from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.engine import Engine, SamplingConfig
from duplex.streamer.statefile import StateFileError, load_state


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return load("tiny"), SmallCodec(SmallCodecConfig()).eval()


def _audio(seed: int, frames: int, fs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(fs)).astype(np.float32) for _ in range(frames)]


def _steps(engine: Engine, session, frames) -> list[list[int]]:
    return [engine.step({session: f})[session].tokens_out for f in frames]


def test_reset_is_a_fresh_session_in_the_same_slot(parts) -> None:
    model, codec = parts
    fs = codec.frame_size
    a, b = _audio(1, 8, fs), _audio(2, 12, fs)
    with Engine(model, codec, slots=1) as eng:
        want = _steps(eng, eng.join(SamplingConfig(seed=5)), a)
    with Engine(model, codec, slots=2) as eng:
        other = eng.join(SamplingConfig(seed=7))
        s = eng.join(SamplingConfig(seed=5))
        s.type_text("earlier")
        got_other = []
        for x, y in zip(b[:4], a[:4], strict=True):
            got_other.append(eng.step({other: x, s: y})[other].tokens_out)
        ident = (s.id, s.slot)
        eng.reset(s)
        assert (s.id, s.slot) == ident and s.frame == 0 and not s.typed and not s.transcript
        got = []
        for x, y in zip(b[4:], a, strict=True):
            res = eng.step({other: x, s: y})
            got.append(res[s].tokens_out)
            got_other.append(res[other].tokens_out)
    assert got == want
    with Engine(model, codec, slots=1) as eng:
        # The batch-mate never noticed.
        assert got_other == _steps(eng, eng.join(SamplingConfig(seed=7)), b)


@pytest.mark.parametrize("form", ["bytes", "path", "checked"])
def test_restore_continues_exactly_where_the_state_was_saved(parts, tmp_path, form) -> None:
    model, codec = parts
    fs = codec.frame_size
    x = _audio(3, 16, fs)
    with Engine(model, codec, slots=2) as eng:
        other = eng.join(SamplingConfig(seed=1))
        s = eng.join(SamplingConfig(seed=2))
        s.type_text("hello there")
        _steps(eng, s, x[:6])
        blob = eng.state_bytes(s)
        path = eng.save_session(s, tmp_path / "s.dstate")
        want = _steps(eng, s, x[6:12])
        said = "".join(s.transcript)
        eng.step({other: x[0]})
        state = {"bytes": blob, "path": path, "checked": eng.check_state(blob)}[form]
        eng.restore(s, state)
        assert s.frame == 6 and s.restored
        assert _steps(eng, s, x[6:12]) == want
        assert "".join(s.transcript) == said
    # The file on disk holds the same state as the bytes.
    t1, m1 = load_state(blob)
    t2, m2 = load_state(path)
    assert m1 == m2 and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_a_refused_restore_changes_nothing(parts) -> None:
    """Corrupt bytes, another model's state, a crafted value: each is a StateFileError and the
    session steps on exactly as a twin that was never asked to load anything."""
    model, codec = parts
    fs = codec.frame_size
    x = _audio(4, 10, fs)
    with Engine(model, codec, slots=1) as eng:
        twin = eng.join(SamplingConfig(seed=3))
        want = _steps(eng, twin, x)
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=3))
        got = _steps(eng, s, x[:5])
        good = eng.state_bytes(s)
        bad = [good[:-200] + bytes(200), b"not a state at all"]
        crafted = bytearray(good)
        i = crafted.find(b'"frame": 5')
        crafted[i : i + 10] = b'"frame":-5'
        bad.append(bytes(crafted))
        for blob in bad:
            with pytest.raises(StateFileError):
                eng.restore(s, blob)
        got += _steps(eng, s, x[5:])
    assert got == want
    with (
        Engine(load("small"), codec, slots=1) as other,
        pytest.raises(StateFileError, match="different model"),
    ):
        other.check_state(good)


def test_sessions_that_left_cannot_be_reset_or_restored(parts) -> None:
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        s = eng.join()
        blob = eng.state_bytes(s)
        eng.leave(s)
        with pytest.raises(ValueError, match="not in this engine"):
            eng.reset(s)
        with pytest.raises(ValueError, match="not in this engine"):
            eng.restore(s, blob)


def test_record_writes_the_one_header_and_the_starting_state(parts, tmp_path) -> None:
    """A session restored and then recorded carries its starting state: the recording replays
    on its own, token for token. A reset session's next recording starts at frame 0 with no
    state; a recorder replaced by `record` is closed whole."""
    model, codec = parts
    fs = codec.frame_size
    x = _audio(5, 12, fs)
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=4))
        _steps(eng, s, x[:4])
        blob = eng.state_bytes(s)
        eng.restore(s, blob)
        eng.record(s, tmp_path / "a", model="tiny", codec="x", server_session="abc")
        _steps(eng, s, x[4:])
        s.type_text("typed")
        _steps(eng, s, x[:3])
        eng.reset(s)
        eng.record(s, tmp_path / "b", model="tiny", codec="x")
        _steps(eng, s, x[:2])
    header = json.loads((tmp_path / "a" / "header.json").read_text())
    assert header["config"] == {
        "model": "tiny",
        "codec": "x",
        "sampling": {
            "temperature": 0.8,
            "top_k": 50,
            "text_temperature": 0.7,
            "text_top_k": 25,
            "seed": 4,
            "transcript_temperature": 0.0,
            "speak_temperature": 0.7,
        },
        "state": None,
    }
    assert header["model_fingerprint"] == eng.model_fingerprint
    assert header["server_session"] == "abc" and header["frame_rate"] == eng.frame_rate
    assert (tmp_path / "a" / "initial.dstate").is_file()
    assert not (tmp_path / "b" / "initial.dstate").exists()
    lines = (tmp_path / "a" / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["i"] == 4 and len(lines) == 12
    assert [
        json.loads(ln)["i"] for ln in (tmp_path / "b" / "events.jsonl").read_text().split()
    ] == [
        0,
        1,
    ]


def test_a_recording_of_a_restored_session_replays(parts, tmp_path, monkeypatch) -> None:
    """The recording `record` writes is what `duplex replay --check` needs, nothing more."""
    from duplex.apps import replay as replay_mod

    model, codec = parts
    monkeypatch.setattr(replay_mod, "open_recording", _opener(model, codec))
    fs = codec.frame_size
    x = _audio(6, 14, fs)
    with Engine(model, codec, slots=2) as eng:
        other = eng.join(SamplingConfig(seed=9))
        s = eng.join(SamplingConfig(seed=8, text_temperature=1.5, text_top_k=0))
        _steps(eng, s, x[:5])
        blob = eng.state_bytes(s)
        _steps(eng, s, x[5:9])
        eng.restore(s, blob)
        eng.record(s, tmp_path / "rec", model="tiny", codec="x")
        for f in x[5:]:
            eng.step({s: f, other: f})
    n, mismatch, _ = replay(tmp_path / "rec", verbose=False)
    assert n == 9 and mismatch is None


def _opener(model, codec):
    """`open_recording` with this test's codec (a random SmallCodec has no name to load by)."""
    from duplex.apps.replay import open_recording

    def open_with_parts(directory):
        from duplex.streamer import conversation

        real = conversation.load_parts
        conversation.load_parts = lambda cfg: (model, codec)
        try:
            return open_recording(directory)
        finally:
            conversation.load_parts = real

    return open_with_parts
