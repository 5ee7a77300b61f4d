"""The token log: appends, reads and gathers agree with a plain array across the RAM/disk split."""

from __future__ import annotations

import numpy as np
import pytest

from duplex.model.token_log import TokenLog, id_dtype


def test_spill_to_disk_and_back(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 8192, size=10_000).astype(np.int64)
    log = TokenLog(np.uint16, ram_tokens=777, spill_dir=tmp_path)
    i = 0
    while i < ref.size:
        n = int(rng.integers(1, 2000))
        log.append(ref[i : i + n])
        i += n
    assert len(log) == ref.size
    assert log.n_disk > 0 and log.n_disk % 777 == 0
    assert log.path is not None and log.path.stat().st_size == log.n_disk * 2
    np.testing.assert_array_equal(log.read(0, ref.size), ref)
    pos = rng.integers(-5, ref.size + 5, size=5000)
    got = log.gather(pos, fill=0)
    want = np.where((pos >= 0) & (pos < ref.size), ref[np.clip(pos, 0, ref.size - 1)], 0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(log.read(700, 800), ref[700:800])


def test_gather_before_and_after_the_first_spill():
    rng = np.random.default_rng(3)
    ref = rng.integers(-1000, 1000, size=300)
    log = TokenLog(np.int32, ram_tokens=200)
    log.append(ref[:150])
    pos = rng.integers(-5, 160, size=(7, 9))
    inside = (pos >= 0) & (pos < 150)
    want = np.where(inside, ref[np.clip(pos, 0, 149)], -1)
    # all in RAM (the fast path), then the same positions once part of the log is on disk
    got = log.gather(pos, fill=-1)
    assert got.dtype == np.int32 and got.shape == pos.shape
    np.testing.assert_array_equal(got, want)
    log.append(ref[150:])
    assert log.n_disk == 200
    np.testing.assert_array_equal(log.gather(pos, fill=-1), np.where(pos >= 0, ref[pos], -1))
    np.testing.assert_array_equal(log.read(190, 230), ref[190:230])


def test_truncate_inside_file_and_ram(tmp_path):
    ref = np.arange(5000) % 60000
    log = TokenLog(np.int32, ram_tokens=1000, spill_dir=tmp_path)
    log.append(ref)
    log.truncate(4500)
    np.testing.assert_array_equal(log.read(0, 5000), ref[:4500])
    log.truncate(2345)
    assert len(log) == 2345 and log.n_disk == 2345
    log.append(np.full(3000, 7))
    want = np.concatenate([ref[:2345], np.full(3000, 7)])
    np.testing.assert_array_equal(log.read(0, len(log)), want)
    with pytest.raises(ValueError):
        log.truncate(len(log) + 1)


def test_set_overwrites_disk_and_ram(tmp_path):
    log = TokenLog(np.int32, ram_tokens=10, spill_dir=tmp_path)
    log.append(np.arange(35))
    log.set(np.array([3, 31]), np.array([-1, -2]))
    got = log.read(0, 35)
    assert got[3] == -1 and got[31] == -2 and got[4] == 4


def test_dtype_choice_and_bytes():
    assert id_dtype(8192) == np.uint16
    assert id_dtype(70000) == np.int32
    log = TokenLog(np.uint16, ram_tokens=100)
    log.append(np.arange(250))
    assert log.nbytes() == 250 * 2
    with pytest.raises(ValueError):
        log.append(np.array([-3]))
    log.close()
