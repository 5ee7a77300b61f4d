"""State files: round trip, and every rejection case leaves the target unchanged."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from duplex.streamer.statefile import (
    MAGIC,
    StateFileError,
    fingerprint,
    load_state,
    read_header,
    save_state,
)
from tests.test_streaming import Pair


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
        data[-40] ^= 0xFF
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
