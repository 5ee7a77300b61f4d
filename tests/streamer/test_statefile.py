"""State files: round trip, and every rejection case leaves the target unchanged.

State files are untrusted input, and their SHA-256 checksum is no protection (anyone can
recompute it), so the damaged files here come in two kinds: ones the checksum catches, and
crafted ones with a valid checksum over a bad header or tensor index, which only the header and
bounds checks can catch. `rewrite` makes the second kind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.streamer.statefile import (
    MAGIC,
    StateFileError,
    StateKeys,
    fingerprint,
    load_state,
    read_header,
    save_state,
)
from tests.test_streaming import Pair

_PREFIX = struct.Struct("<8sII")


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a version 2 state file's bytes, unchecked."""
    _, _, hlen = _PREFIX.unpack_from(data)
    body = data[: -(32 + 48)]
    return json.loads(body[16 : 16 + hlen]), body[16 + hlen :]


def rewrite(
    header: dict | bytes, payload: bytes, keys: StateKeys | None = None, version: int = 2
) -> bytes:
    """A state file with this header and payload and a valid checksum (and signature)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = _PREFIX.pack(MAGIC, version, len(hb)) + hb + payload
    out = body + hashlib.sha256(body).digest()
    if version == 1:
        return out
    if keys is None:
        return out + bytes(48)
    mac = keys.signer()
    mac.update(body)
    return out + keys.signing_id + mac.digest()


def test_round_trip(tmp_path) -> None:
    tensors = {
        "a": torch.randn(2, 3),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.tensor([True, False]),
        "d": torch.randn(4, dtype=torch.float64),
        "e": torch.tensor(3.5),
    }
    p = save_state(tmp_path / "s.dstate", tensors, {"frames": 12, "note": "hi"}, "m1", "c1")
    got, meta = load_state(p, "m1", "c1")
    assert meta == {"frames": 12, "note": "hi"}
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    assert read_header(p)["model_fingerprint"] == "m1"


def test_empty_tensors_round_trip(tmp_path) -> None:
    # A session saved before its first frame holds empty tensors (no history yet), some with
    # stride 0, as a slice of an expanded tensor has.
    tensors = {
        "ids": torch.zeros(0, dtype=torch.int64),
        "strided": torch.zeros(1, dtype=torch.int64).expand(3)[:0],
        "x": torch.randn(2, 0, 3),
        "y": torch.ones(2),
    }
    assert tensors["strided"].stride() == (0,)
    got, _ = load_state(save_state(tmp_path / "e.dstate", tensors, {}, "m", "c"), "m", "c")
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)


def test_stream_rows_round_trip_through_a_file(tmp_path) -> None:
    m = Pair()
    x = torch.randn(3, 5, 3)
    with m.streaming(3):
        m(x)
        t, plain = m.save_rows(torch.tensor([2]))
        ref = m(x)[2]
    save_state(tmp_path / "x", t, {"plain": plain}, "m", "c")
    t2, meta = load_state(tmp_path / "x")
    with m.streaming(2):
        m.load_rows(torch.tensor([1]), t2, meta["plain"])
        got = m(x[1:3])[1]
    torch.testing.assert_close(got, ref)


def test_wrong_model_or_codec_is_rejected(tmp_path) -> None:
    p = save_state(tmp_path / "s", {"a": torch.ones(2)}, {}, "model-A", "codec-A")
    with pytest.raises(StateFileError, match="different model"):
        load_state(p, "model-B", "codec-A")
    with pytest.raises(StateFileError, match="different codec"):
        load_state(p, "model-A", "codec-B")


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip_payload", "flip_header", "bad_magic", "empty", "version", "garbage"],
)
def test_corrupt_files_are_clear_errors(tmp_path, damage: str) -> None:
    p = save_state(tmp_path / "s", {"a": torch.randn(100)}, {"k": 1}, "m", "c")
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_payload":
        data[-(32 + 48 + 8)] ^= 0xFF
    elif damage == "flip_header":
        data[20] ^= 0x01
    elif damage == "bad_magic":
        data[:8] = b"NOTSTATE"
    elif damage == "empty":
        data = bytearray()
    elif damage == "version":
        data[8] = 99
    elif damage == "garbage":
        data = bytearray(os.urandom(500))
    p.write_bytes(bytes(data))
    with pytest.raises(StateFileError):
        load_state(p, "m", "c")


def _entry(header: dict) -> dict:
    return header["tensors"][0]


# Each case: a change to the header (or the raw header bytes) of a valid file, checksum valid.
CRAFTED = {
    "not an object": lambda h: [1, 2],
    "no tensors": lambda h: {k: v for k, v in h.items() if k != "tensors"},
    "tensors not a list": lambda h: {**h, "tensors": {"a": 1}},
    "entry not an object": lambda h: {**h, "tensors": ["a"]},
    "unknown dtype": lambda h: _set(h, dtype="complex128"),
    "dtype not a string": lambda h: _set(h, dtype=["float32"]),
    "shape not a list": lambda h: _set(h, shape=100),
    "negative dim": lambda h: _set(h, shape=[-100]),
    "float dim": lambda h: _set(h, shape=[100.0]),
    "bool dim": lambda h: _set(h, shape=[True] * 100),
    "too many dims": lambda h: _set(h, shape=[1] * 40 + [100]),
    "shape larger than bytes": lambda h: _set(h, shape=[200]),
    "huge shape, zero bytes": lambda h: _set(h, shape=[1 << 24, 1 << 10], nbytes=0),
    "huge shape, no payload": lambda h: _set(h, shape=[16_000_000], nbytes=0, offset=0),
    "nbytes past the end": lambda h: _set(h, shape=[1000], nbytes=4000),
    "negative offset": lambda h: _set(h, offset=-8),
    "offset past the end": lambda h: _set(h, offset=1 << 40),
    "string offset": lambda h: _set(h, offset="0"),
    "no name": lambda h: {**h, "tensors": [{k: v for k, v in _entry(h).items() if k != "name"}]},
    "repeated name": lambda h: {**h, "tensors": [_entry(h), _entry(h)]},
    "meta not an object": lambda h: {**h, "meta": [1]},
    "fingerprint not a string": lambda h: {**h, "model_fingerprint": 7},
    "fingerprint with markup": lambda h: {**h, "model_fingerprint": "[/x]\x1b[2J"},
    "NaN in the header": lambda h: json.dumps(h).replace('"k": 1', '"k": NaN').encode(),
    "header not UTF-8": lambda h: b"\xff\xfe" + json.dumps(h).encode(),
    "header not JSON": lambda h: b"{nope",
    "deeply nested": lambda h: b"[" * 100_000 + b"]" * 100_000,
}


def _set(header: dict, **entry) -> dict:
    return {**header, "tensors": [{**_entry(header), **entry}]}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_files_with_a_valid_checksum_are_clear_errors(tmp_path, case: str) -> None:
    p = save_state(tmp_path / "s", {"a": torch.randn(100)}, {"k": 1}, "m", "c")
    header, payload = split(p.read_bytes())
    # The untouched rewrite loads: what fails below fails for the change alone.
    p.write_bytes(rewrite(header, payload))
    assert torch.equal(load_state(p, "m", "c")[0]["a"].view(-1)[:3], load_state(p)[0]["a"][:3])
    p.write_bytes(rewrite(CRAFTED[case](header), payload))
    with pytest.raises(StateFileError):
        load_state(p, "m", "c")


def test_huge_declared_history_costs_nothing(tmp_path) -> None:
    """A ~1 KB file that declares 16M ids with zero payload bytes is refused without
    allocating them (the loader used to build torch.empty(shape) unchecked)."""
    p = save_state(tmp_path / "s", {"ids": torch.zeros(0, dtype=torch.int64)}, {}, "m", "c")
    header, payload = split(p.read_bytes())
    p.write_bytes(rewrite(_set(header, shape=[16_000_000]), payload))
    code = (
        "import resource, sys\n"
        "from duplex.streamer.statefile import load_state, StateFileError\n"
        "try:\n    load_state(sys.argv[1])\nexcept StateFileError as e:\n    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    before = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    message, rss = r.stdout.strip().splitlines()
    assert "declares shape [16000000] but holds 0 bytes" in message
    base = int(before.stdout.strip().splitlines()[-1])
    assert int(rss) - base < 50_000, f"loading grew the process by {int(rss) - base} KB"


def test_signed_states_verify_only_with_their_key(tmp_path) -> None:
    key_a, key_b = StateKeys([b"a" * 32]), StateKeys([b"b" * 32])
    p = save_state(tmp_path / "s", {"a": torch.ones(3)}, {"v": 1}, "m", "c", keys=key_a)
    load_state(p, keys=key_a, require_signature=True)
    # Without a required signature it is an ordinary state file.
    load_state(p)
    with pytest.raises(StateFileError, match="not signed by this server"):
        load_state(p, keys=key_b, require_signature=True)
    # Rotation: a new first key signs, the old one still verifies.
    rotated = StateKeys([b"c" * 32, b"a" * 32])
    load_state(p, keys=rotated, require_signature=True)
    # An edit with a recomputed checksum is no longer signed.
    header, payload = split(p.read_bytes())
    header["meta"]["v"] = 2
    p.write_bytes(rewrite(header, payload))
    with pytest.raises(StateFileError, match="not signed"):
        load_state(p, keys=key_a, require_signature=True)
    # Signed by the attacker's own key: still not ours.
    p.write_bytes(rewrite(header, payload, keys=key_b))
    with pytest.raises(StateFileError, match="not signed"):
        load_state(p, keys=key_a, require_signature=True)
    # Unsigned version 1 files are read, but never count as signed.
    p.write_bytes(rewrite(header, payload, version=1))
    assert load_state(p)[1] == {"v": 2}
    with pytest.raises(StateFileError, match="not signed"):
        load_state(p, keys=key_a, require_signature=True)


def test_labels_hide_paths(tmp_path) -> None:
    p = tmp_path / "secret-dir" / "x.dstate"
    p.parent.mkdir()
    p.write_bytes(MAGIC + b"junk" * 20)
    with pytest.raises(StateFileError) as info:
        load_state(p, label="the upload")
    assert "secret-dir" not in str(info.value) and "the upload" in str(info.value)


def test_orphaned_temporary_files_are_removed(tmp_path) -> None:
    """A save killed mid-write leaves `.NAME.tmp-PID`; the next save of NAME removes it
    (its writer is gone), but never the temporary file of a writer still running."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".s.tmp-{dead.pid}"
    orphan.write_bytes(b"x" * 1000)
    live = tmp_path / f".s.tmp-{os.getppid()}"
    live.write_bytes(b"y")
    other = tmp_path / f".t.tmp-{dead.pid}"
    other.write_bytes(b"z")
    save_state(tmp_path / "s", {"a": torch.ones(1)}, {}, "m", "c")
    assert not orphan.exists()
    assert live.exists() and other.exists()


_ENTRY_KEYS = st.sampled_from(["name", "dtype", "shape", "offset", "nbytes"])
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.lists(st.tuples(st.integers(0, 2), _ENTRY_KEYS, _JSON), min_size=1, max_size=4),
    payload_cut=st.integers(0, 64),
)
def test_property_tensor_index_never_crashes_or_overallocates(
    tmp_path, changes, payload_cut
) -> None:
    """Whatever a tensor index says (checksum valid), loading is a StateFileError or gives
    tensors that exactly fit the bytes the file holds."""
    tensors = {
        "a": torch.randn(5, 3),
        "b": torch.arange(4, dtype=torch.int64),
        "c": torch.zeros(0, dtype=torch.float32),
    }
    p = save_state(tmp_path / "prop", tensors, {"k": 1}, "m", "c")
    header, payload = split(p.read_bytes())
    for i, key, value in changes:
        header["tensors"][i][key] = value
    payload = payload[: len(payload) - payload_cut]
    p.write_bytes(rewrite(header, payload))
    try:
        got, meta = load_state(p, "m", "c")
    except StateFileError:
        return
    assert meta == {"k": 1}
    total = 0
    for e in header["tensors"]:
        t = got[e["name"]]
        assert list(t.shape) == e["shape"] and t.numel() * t.element_size() == e["nbytes"]
        total += e["nbytes"]
    assert total <= len(payload)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(StateFileError, match="does not exist"):
        load_state(tmp_path / "nope")


def test_mismatched_layout_is_rejected_before_any_change() -> None:
    m = Pair()
    with m.streaming(2):
        m(torch.randn(2, 5, 3))
        t, plain = m.save_rows(torch.tensor([0]))
        before = m.get_state()
        bad = dict(t)
        bad["b/total"] = torch.zeros(9, 9)
        with pytest.raises(ValueError, match="expected"):
            m.load_rows(torch.tensor([1]), bad, plain)
        missing = dict(t)
        del missing["b/total"]
        with pytest.raises(ValueError, match="lacks"):
            m.load_rows(torch.tensor([1]), missing, plain)
        extra = {**t, "c/total": torch.zeros(1, 3)}
        with pytest.raises(ValueError, match="lacks"):
            m.load_rows(torch.tensor([1]), extra, plain)
        after = m.get_state()
    for name in before:
        for k, v in before[name].tensor_fields():
            assert torch.equal(getattr(after[name], k), v)


def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    p = save_state(tmp_path / "s", {"a": torch.ones(3)}, {"v": 1}, "m", "c")
    real_fsync = os.fsync

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="could not write state file"):
        save_state(p, {"a": torch.zeros(3)}, {"v": 2}, "m", "c")
    monkeypatch.setattr(os, "fsync", real_fsync)
    _, meta = load_state(p)
    assert meta == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["s"]
    assert p.read_bytes()[:8] == MAGIC


def test_fingerprint_tracks_weights_and_config() -> None:
    a = torch.nn.Linear(3, 3)
    fa = fingerprint(a, {"d": 3})
    assert fingerprint(a, {"d": 3}) == fa
    assert fingerprint(a, {"d": 4}) != fa
    with torch.no_grad():
        a.weight[0, 0] += 1e-6
    assert fingerprint(a, {"d": 3}) != fa


def test_rows_move_between_batches() -> None:
    m = Pair()
    x = torch.randn(3, 4, 3)
    with m.streaming(3):
        m(x)
        row = m.get_rows(torch.tensor([1]))
        ref = m(x)[1]
    with m.streaming(2):
        m.set_rows(torch.tensor([0]), row)
        got = m(x[1:3])[0]
    torch.testing.assert_close(got, ref)


def test_state_bytes_are_the_file(tmp_path) -> None:
    """A state encoded to bytes is byte for byte what `save_state` writes (but for its time),
    and bytes load like a path: same tensors, same meta, same refusals."""
    from duplex.streamer.statefile import StateKeys, encode_state

    keys = StateKeys([b"k" * 16])
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    meta = {"frame": 3}
    data = encode_state(tensors, meta, "m1", "c1", keys)
    path = save_state(tmp_path / "s.dstate", tensors, meta, "m1", "c1", keys)
    on_disk = path.read_bytes()
    assert read_header(data) == {
        **read_header(on_disk),
        "created_unix": read_header(data)["created_unix"],
    }
    got, got_meta = load_state(data, "m1", "c1", keys=keys, require_signature=True)
    assert got_meta == meta and set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    with pytest.raises(StateFileError, match=r"^the state was saved for a different model"):
        load_state(data, "m2", "c1")
    with pytest.raises(StateFileError, match="corrupt"):
        load_state(data[:-100] + bytes(100), "m1", "c1")
