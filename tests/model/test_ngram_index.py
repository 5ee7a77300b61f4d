"""The n-gram index returns exactly what a brute-force scan of the history returns."""

from __future__ import annotations

import numpy as np

from duplex.model.ngram_index import NgramIndex, NgramIndexConfig, _bucket, ngram_hashes
from duplex.model.token_log import TokenLog


def brute(ids: np.ndarray, t: int, m: int, R: int) -> list[int]:
    if t < m - 1:
        return []
    gram = ids[t - m + 1 : t + 1]
    out = []
    for p in range(t - 1, m - 2, -1):
        if np.array_equal(ids[p - m + 1 : p + 1], gram):
            out.append(p)
            if len(out) == R:
                break
    return out


def check(index: NgramIndex, ids: np.ndarray, ts: np.ndarray) -> None:
    got = index.lookup(ts)
    for j, t in enumerate(ts):
        for oi, m in enumerate(index.cfg.orders):
            want = brute(ids, int(t), m, index.cfg.per_order)
            row = [int(x) for x in got[j, oi] if x >= 0]
            assert row == want, (int(t), m, row, want)


def test_matches_brute_force_with_rehash_and_spill(tmp_path):
    rng = np.random.default_rng(1)
    # Small alphabet so n-grams repeat often; a tiny table forces rehashes; a tiny RAM buffer
    # forces the chains to spill. max_walk is large so bounded walks never truncate here.
    ids = rng.integers(0, 6, size=3000)
    cfg = NgramIndexConfig(
        orders=(1, 2, 3), per_order=3, max_walk=10_000, init_bits=2, max_load=2, ram_tokens=500
    )
    log = TokenLog(np.uint16, ram_tokens=400, spill_dir=tmp_path)
    index = NgramIndex(log, cfg, spill_dir=tmp_path)
    i = 0
    while i < ids.size:
        n = int(rng.integers(1, 300))
        log.append(ids[i : i + n])
        index.update()
        i += n
    assert index.bits[0] > 2 and log.n_disk > 0 and index.prev[0].n_disk > 0
    check(index, ids, rng.integers(0, ids.size, size=300))


def test_bounded_walk_returns_only_true_matches():
    """A walk of `max_walk` chain links returns the true matches among those links, newest
    first: a prefix of the brute-force answer, cut short only where the walk ran out."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 5, size=4000)
    cfg = NgramIndexConfig(orders=(2, 4), per_order=2, max_walk=4, init_bits=3, max_load=64)
    log = TokenLog(np.uint16)
    index = NgramIndex(log, cfg)
    log.append(ids)
    index.update()
    ts = np.arange(3400, 4000)
    got = index.lookup(ts)
    for oi, m in enumerate(cfg.orders):
        # The chain of t: every earlier position whose m-gram falls in t's bucket, newest first.
        bucket = _bucket(ngram_hashes(ids, m), index.bits[oi])
        found = cut = 0
        for j, t in enumerate(ts):
            row = [int(x) for x in got[j, oi] if x >= 0]
            want = brute(ids, int(t), m, cfg.per_order)
            assert row == want[: len(row)], (int(t), m, row, want)
            chain = np.flatnonzero(bucket[m - 1 : t] == bucket[t])[::-1] + m - 1
            gram = ids[t - m + 1 : t + 1]
            walked = [
                int(p) for p in chain[: cfg.max_walk] if (ids[p - m + 1 : p + 1] == gram).all()
            ]
            assert row == walked[: cfg.per_order], (int(t), m, row, walked)
            found += len(row)
            cut += len(row) < len(want)
        # Both orders find plenty (an index that returns nothing fails here), and the bound
        # cuts some walks short.
        assert found > len(ts) // 4 and cut > 0, (m, found, cut)


def test_truncate_equals_fresh_index(tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 8, size=2000)
    cfg = NgramIndexConfig(orders=(1, 2), per_order=2, max_walk=1000, init_bits=4)
    log = TokenLog(np.uint16, ram_tokens=300, spill_dir=tmp_path)
    index = NgramIndex(log, cfg, spill_dir=tmp_path)
    log.append(ids)
    index.update()
    log.truncate(1100)
    index.truncate(1100)
    tail = rng.integers(0, 8, size=500)
    log.append(tail)
    index.update()
    full = np.concatenate([ids[:1100], tail])
    check(index, full, np.arange(0, full.size, 7))


def test_exact_unigram_keeps_the_last_occurrence_and_rolls_back(tmp_path):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 30, size=3000)
    cfg = NgramIndexConfig(orders=(2, 1), per_order=2, max_walk=1000, unigram_vocab=30)
    log = TokenLog(np.uint16, ram_tokens=700, spill_dir=tmp_path)
    index = NgramIndex(log, cfg, spill_dir=tmp_path)
    assert index.slots(1) == 1 and index.prev[1] is None
    i = 0
    while i < ids.size:
        n = int(rng.integers(1, 200))
        log.append(ids[i : i + n])
        index.update()
        got = index.lookup(np.arange(i, min(i + n, ids.size)))
        for j, t in enumerate(range(i, min(i + n, ids.size))):
            assert [int(x) for x in got[j, 0] if x >= 0] == brute(ids, t, 2, 2)
            assert [int(x) for x in got[j, 1] if x >= 0] == brute(ids, t, 1, 1)
        i += n
    # a restore to an earlier length recovers each id's last occurrence before it
    log.truncate(1234)
    index.truncate(1234)
    tail = rng.integers(0, 30, size=100)
    log.append(tail)
    index.update()
    full = np.concatenate([ids[:1234], tail])
    got = index.lookup(np.arange(1234, 1334))
    for j, t in enumerate(range(1234, 1334)):
        assert [int(x) for x in got[j, 1] if x >= 0] == brute(full, t, 1, 1)
        assert [int(x) for x in got[j, 0] if x >= 0] == brute(full, t, 2, 2)
