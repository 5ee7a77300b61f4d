"""A state file is untrusted input: every value is checked before a slot changes.

Each crafted file here has a valid checksum (as an attacker who edits their own saved state
can always make) and is loaded into an engine that already steps another session. The file
must be refused with a `StateFileError`, and the other session must go on exactly as it would
alone; a file that is accepted must step without failing. The property test explores values
the named cases do not think of.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.engine import Engine, SamplingConfig
from duplex.streamer.statefile import StateFileError, StateKeys
from tests.streamer.test_statefile import rewrite, split

FS = 320


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return load("tiny"), SmallCodec(SmallCodecConfig()).eval()


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> bytes:
    """A real state file: a session after six frames and some typed text."""
    model, codec = parts
    path = tmp_path_factory.mktemp("state") / "s.dstate"
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=3))
        s.type_text("hello there")
        for i in range(6):
            eng.step({s: _frame(i)})
        eng.save_session(s, path)
    return path.read_bytes()


def _frame(i: int) -> np.ndarray:
    t = np.arange(FS) / 16000 + i * FS / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _solo_tokens(parts, n: int) -> list[list[int]]:
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=9))
        return [eng.step({s: _frame(i)})[s].tokens_out for i in range(n)]


@pytest.fixture(scope="module")
def solo(parts) -> list[list[int]]:
    return _solo_tokens(parts, 8)


def _tensor(header: dict, name: str) -> dict:
    (e,) = [e for e in header["tensors"] if e["name"] == name]
    return e


def _poke(payload: bytes, header: dict, name: str, values: list) -> bytes:
    """The payload with tensor `name`'s leading values replaced (same dtype and size)."""
    e = _tensor(header, name)
    dtype = {"int64": np.int64, "float32": np.float32, "uint8": np.uint8}[e["dtype"]]
    raw = np.frombuffer(payload, np.uint8, e["nbytes"], e["offset"]).view(dtype).copy()
    raw[: len(values)] = values
    return payload[: e["offset"]] + raw.tobytes() + payload[e["offset"] + e["nbytes"] :]


def _meta(**changes):
    def change(header: dict, payload: bytes) -> tuple[dict, bytes]:
        header["meta"].update(changes)
        return header, payload

    return change


def _plain(key: str, value):
    def change(header: dict, payload: bytes) -> tuple[dict, bytes]:
        header["meta"]["model_plain"][f"backbone.reader/{key}"] = value
        return header, payload

    return change


def _values(name: str, values: list):
    def change(header: dict, payload: bytes) -> tuple[dict, bytes]:
        return header, _poke(payload, header, name, values)

    return change


def _resize_history(n: int):
    """Declare a history of n ids (with the bytes to match: a genuine-looking long state)."""

    def change(header: dict, payload: bytes) -> tuple[dict, bytes]:
        e = _tensor(header, "model/backbone.reader/ids.0")
        extra = np.zeros(n - e["shape"][0], np.int64).tobytes()
        e["shape"], e["nbytes"] = [n], n * 8
        # Appended at the end of the payload, so no other offset moves.
        e["offset"] = len(payload)
        header["meta"]["model_plain"]["backbone.reader/lengths"] = [n]
        old = np.frombuffer(payload, np.uint8, e["nbytes"] - len(extra), 0)
        return header, payload + old.tobytes()[: n * 8 - len(extra)] + extra

    return change


SWA = "model/backbone.blocks.6"
CRAFTED = {
    # The attacks of issue 18: each made the next batched step raise.
    "prev_text out of range": _meta(prev_text=10**6),
    "prev_text negative": _meta(prev_text=-1),
    "prev_user_text out of range": _meta(prev_user_text=300),
    "pending_c0 out of range": _meta(pending_c0=[4096]),
    "pending_c0 too long": _meta(pending_c0=[1] * 50),
    "pending_c0 not a list": _meta(pending_c0="abc"),
    "frame not a number": _meta(frame="seven"),
    "frame a float": _meta(frame=6.5),
    "frame negative": _meta(frame=-5),
    "frame a bool": _meta(frame=True),
    "huge position offset": _plain("offsets", [1 << 70]),
    "negative position offset": _plain("offsets", [-3]),
    "offset a string": _plain("offsets", ["5"]),
    "lengths not a list": _plain("lengths", 6),
    "prev_audio out of range": _values("session/prev_audio", [10**9]),
    "prev_audio negative": _values("session/prev_audio", [-7]),
    "rng state garbage": _values("session/rng", [255] * 5056),
    "typed bytes out of range": _meta(typed=[1000]),
    "typed not bytes": _meta(typed=["a"]),
    "typed backlog too long": _meta(typed=[65] * (1 << 17)),
    "text_bytes too long": _meta(text_bytes=[0xE2] * 50),
    "transcript not a string": _meta(transcript=["x"]),
    "sampling temperature NaN-like": _meta(
        sampling={
            "temperature": "nan",
            "top_k": 5,
            "text_temperature": 1,
            "text_top_k": 5,
            "seed": 0,
        }
    ),
    "sampling top_k huge": _meta(
        sampling={
            "temperature": 1,
            "top_k": 1 << 70,
            "text_temperature": 1,
            "text_top_k": 5,
            "seed": 0,
        }
    ),
    "sampling extra field": _meta(
        sampling={
            "temperature": 1,
            "top_k": 5,
            "text_temperature": 1,
            "text_top_k": 5,
            "seed": 0,
            "evil": 1,
        }
    ),
    "sampling seed negative": _meta(
        sampling={"temperature": 1, "top_k": 5, "text_temperature": 1, "text_top_k": 5, "seed": -1}
    ),
    "model_plain not an object": _meta(model_plain=[1]),
    "missing frame": lambda h, p: (
        {**h, "meta": {k: v for k, v in h["meta"].items() if k != "frame"}},
        p,
    ),
    "NaN in a recurrent state": _values("model/backbone.blocks.0.layer/recurrent", [np.nan]),
    "inf in a codec history": _values("codec/decoder.layers.0/history", [np.inf]),
    "huge float in a state": _values("model/backbone.blocks.0.layer/conv", [3e38]),
    "attention position huge": _values(f"{SWA}/pos", [1 << 62]),
    "attention key position negative": _values(f"{SWA}/kpos", [-(1 << 62)]),
    "history id outside the vocabulary": _values("model/backbone.reader/ids.0", [10**6]),
    "history longer than allowed": _resize_history(5000),
    "unknown tensor": lambda h, p: (
        {**h, "tensors": [*h["tensors"], {**_tensor(h, "session/prev_audio"), "name": "evil/x"}]},
        p,
    ),
}


def _load_beside_another(parts, blob: bytes, tmp_path, max_tokens: int = 1000):
    """Step one session, load `blob` into a second slot, step both. Returns (tokens of the
    first session, error or None)."""
    model, codec = parts
    path = tmp_path / "crafted.dstate"
    path.write_bytes(blob)
    with Engine(model, codec, slots=2) as eng:
        eng.max_state_tokens = max_tokens
        good = eng.join(SamplingConfig(seed=9))
        got = [eng.step({good: _frame(0)})[good].tokens_out]
        error = None
        try:
            other = eng.join(state=path)
        except StateFileError as e:
            error, other = e, None
        assert len(eng.sessions) == (1 if other is None else 2)
        for i in range(1, 8):
            frames = {good: _frame(i)}
            if other is not None:
                frames[other] = _frame(i + 3)
            got.append(eng.step(frames)[good].tokens_out)
    return got, error


def test_an_untouched_rewrite_loads_and_steps(parts, saved, solo, tmp_path) -> None:
    header, payload = split(saved)
    got, error = _load_beside_another(parts, rewrite(header, payload), tmp_path)
    assert error is None
    assert got == solo


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_state_is_refused_and_harms_no_one(parts, saved, solo, tmp_path, case) -> None:
    header, payload = split(saved)
    header, payload = CRAFTED[case](header, payload)
    got, error = _load_beside_another(parts, rewrite(header, payload), tmp_path)
    assert isinstance(error, StateFileError), f"{case}: accepted"
    assert got == solo, f"{case}: the other session changed"


def test_history_at_the_limit_loads(parts, saved, tmp_path) -> None:
    header, payload = split(saved)
    header, payload = _resize_history(1000)(header, payload)
    _, error = _load_beside_another(parts, rewrite(header, payload), tmp_path, max_tokens=1000)
    assert error is None
    _, error = _load_beside_another(parts, rewrite(header, payload), tmp_path, max_tokens=999)
    assert "longer than this engine allows" in str(error)


def test_signature_required_when_asked(parts, saved, tmp_path) -> None:
    model, codec = parts
    keys = StateKeys([b"k" * 32])
    with Engine(model, codec, slots=1) as eng:
        eng.state_keys, eng.require_signed_states = keys, True
        s = eng.join(SamplingConfig(seed=1))
        eng.step({s: _frame(0)})
        signed = eng.save_session(s, tmp_path / "signed.dstate")
        eng.leave(s)
        eng.join(state=signed)
    unsigned = tmp_path / "unsigned.dstate"
    unsigned.write_bytes(saved)
    with Engine(model, codec, slots=1) as eng:
        eng.state_keys, eng.require_signed_states = keys, True
        with pytest.raises(StateFileError, match="not signed"):
            eng.join(state=unsigned)
        assert not eng.sessions


# Values a JSON field could hold, biased to the edges that matter.
_VALUE = st.one_of(
    st.integers(-(1 << 65), 1 << 65),
    st.sampled_from([0, 1, 7, 255, 256, 259, 260, 520, -1, 1 << 40, (1 << 40) + 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.lists(st.integers(-300, 5000), max_size=6),
)
_FIELDS = st.sampled_from(
    [
        "frame",
        "prev_text",
        "prev_user_text",
        "pending_c0",
        "typed",
        "text_bytes",
        "user_bytes",
        "transcript",
        "plain:lengths",
        "plain:offsets",
        "sampling:temperature",
        "sampling:top_k",
        "sampling:text_top_k",
        "sampling:seed",
    ]
)
_TENSORS = st.sampled_from(
    [
        "session/prev_audio",
        f"{SWA}/pos",
        f"{SWA}/kpos",
        "model/backbone.reader/ids.0",
        "model/backbone.blocks.0.layer/recurrent",
        "codec/decoder.layers.11/tail",
    ]
)
_NUMBER = st.one_of(
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.sampled_from([0, -1, 255, 256, 519, 520, 1 << 40, np.nan, np.inf, 1e7]),
    st.floats(width=32),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    meta=st.lists(st.tuples(_FIELDS, _VALUE), max_size=3),
    values=st.lists(st.tuples(_TENSORS, _NUMBER), max_size=3),
)
def test_property_nothing_accepted_can_fail_a_later_step(
    parts, saved, solo, tmp_path, meta, values
) -> None:
    """Any edit to meta fields or tensor values: refused with a StateFileError, or loaded
    and then stepped beside another session, which stays exactly as it is alone."""
    header, payload = split(saved)
    header = json.loads(json.dumps(header))
    for name, value in meta:
        if name.startswith("plain:"):
            header["meta"]["model_plain"][f"backbone.reader/{name[6:]}"] = value
        elif name.startswith("sampling:"):
            header["meta"]["sampling"][name[9:]] = value
        else:
            header["meta"][name] = value
    for name, value in values:
        e = _tensor(header, name)
        if e["dtype"] == "int64" and not isinstance(value, int):
            continue
        if e["dtype"] == "float32" and isinstance(value, int) and abs(value) > 1 << 60:
            continue
        payload = _poke(payload, header, name, [value])
    got, _ = _load_beside_another(parts, rewrite(header, payload), tmp_path)
    assert got == solo


def test_talk_refuses_a_crafted_state_without_a_traceback(tmp_path) -> None:
    import soundfile as sf

    import duplex.codecs
    from duplex.codecs.train import save_weights

    codec_file = tmp_path / "codec.safetensors"
    torch.manual_seed(0)
    save_weights(SmallCodec(SmallCodecConfig()), codec_file, {"note": "random weights for tests"})
    # A state of the model and codec `duplex talk` will load, then edited.
    with Engine(load("tiny"), duplex.codecs.load(str(codec_file)), slots=1) as eng:
        s = eng.join(SamplingConfig(seed=1))
        eng.step({s: _frame(0)})
        good = eng.save_session(s, tmp_path / "good.dstate")
    header, payload = split(good.read_bytes())
    header, payload = CRAFTED["prev_text out of range"](header, payload)
    bad = tmp_path / "bad.dstate"
    bad.write_bytes(rewrite(header, payload))
    wav = tmp_path / "in.wav"
    sf.write(wav, np.concatenate([_frame(i) for i in range(10)]), 16000, subtype="PCM_16")
    r = subprocess.run(
        [
            *(sys.executable, "-m", "duplex", "talk", "--model", "tiny"),
            *("--codec", str(codec_file)),
            *("--state", str(bad), "--input", str(wav)),
            *("--output", str(tmp_path / "out.wav"), "--headless"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "prev_text must be a text token" in r.stderr
