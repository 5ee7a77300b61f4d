"""Hashed n-gram index over a token log: "where did the n-gram that ends here occur before?".

This is what lets guided window attention jump anywhere in an unbounded history at constant cost:
a fixed state cannot remember where N arbitrary items are (that needs N·log2(n) bits), but an
index that grows with the log can, and it lives on the host next to the log.

Layout, per n-gram order m: a bucket table `head[2**bits]` (the last position whose m-gram hashed
to that bucket) and a chain `prev[t]` (the previous position in the same bucket as position t),
stored as an append-only int32 array that spills to disk like the log. Appending a token costs
O(1) per order; a lookup walks at most `max_walk` chain links, verifying each candidate against
the log (hash collisions are filtered, never returned), so it costs O(max_walk · m) whatever the
history length. The table doubles when the load passes `max_load` entries per bucket (amortised
O(1) per token: the chains are rebuilt from the log). Host memory: 4 bytes per token per order for
the chains plus about 4/max_load .. 8/max_load bytes per token per order for the tables.

Weak point, by construction: with a bounded walk, an n-gram whose bucket is flooded by more recent
entries of other n-grams (skewed data, a tiny table) can be missed. Random ids at the default load
see ~max_load entries per bucket, so misses need > max_walk / max_load collisions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from duplex.model.token_log import TokenLog

_MUL = np.uint64(0x9E3779B97F4A7C15)
_STEP = np.uint64(0xBF58476D1CE4E5B9)


@dataclass
class NgramIndexConfig:
    """Which n-gram orders to index, and how many candidates a lookup returns per order.

    With `unigram_vocab` > 0, order 1 is indexed exactly by id (a table of that many heads) and
    keeps only the most recent occurrence of each id: one candidate, no chain, so it costs no
    host bytes per token. Its lookups must be of positions appended by the last `update()`.
    """

    orders: tuple[int, ...] = (1, 2, 4)
    per_order: int = 2
    max_walk: int = 8
    init_bits: int = 12
    max_load: int = 4
    ram_tokens: int = 1 << 22
    unigram_vocab: int = 0
    # > 0: ids are matched by id % key_modulo, so ids that differ only by a side feature kept
    # in the high part (who said a byte) count as the same key.
    key_modulo: int = 0

    def __post_init__(self) -> None:
        self.orders = tuple(int(m) for m in self.orders)
        if not self.orders or min(self.orders) < 1:
            raise ValueError(f"orders must be >= 1, got {self.orders}")
        if self.per_order < 1 or self.max_walk < self.per_order:
            raise ValueError("need 1 <= per_order <= max_walk")


def ngram_hashes(ids: np.ndarray, m: int) -> np.ndarray:
    """64-bit hash of the m-gram ending at each position of `ids` [n] (first m-1 are unused)."""
    return ngram_hashes_orders(ids, (m,))[m]


def ngram_hashes_orders(ids: np.ndarray, orders: Iterable[int]) -> dict[int, np.ndarray]:
    """`ngram_hashes(ids, m)` for every m in `orders`, in one pass.

    The hash of order m is the state after the first m rounds of the same recurrence, so all
    orders come from the rounds of the largest one instead of rehashing per order.
    """
    wanted = set(orders)
    n = ids.shape[0]
    x = ids.astype(np.uint64) + np.uint64(1)
    h = np.zeros(n, dtype=np.uint64)
    out = {}
    for i in range(max(wanted, default=0)):
        # Round i: h = (h ^ ids shifted right by i, zero-filled) * _STEP + (i + 1), in place.
        if i < n:
            h[i:] ^= x[: n - i]
        h *= _STEP
        h += np.uint64(i + 1)
        if i + 1 in wanted:
            out[i + 1] = h.copy()
    return out


def match_keys(ids: np.ndarray, modulo: int) -> np.ndarray:
    """The keys n-grams are matched by: the ids themselves, or ids % modulo when modulo > 0."""
    return ids % modulo if modulo > 0 else ids


def _bucket(h: np.ndarray, bits: int) -> np.ndarray:
    return ((h * _MUL) >> np.uint64(64 - bits)).astype(np.int64)


class NgramIndex:
    """The index of one token log. Call `update()` after appending to the log."""

    def __init__(
        self,
        log: TokenLog,
        cfg: NgramIndexConfig | None = None,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.log = log
        self.cfg = cfg or NgramIndexConfig()
        self._spill_dir = spill_dir
        self.n = 0
        self.bits = [self.cfg.init_bits for _ in self.cfg.orders]
        self.head = [np.full(self._table_size(oi), -1, dtype=np.int32) for oi in self._ois()]
        self.prev: list[TokenLog | None] = [
            None if self.last_only(oi) else self._new_chain(m)
            for oi, m in enumerate(self.cfg.orders)
        ]
        # Last-only orders: chain links of the positions of the last update, [start, start + n).
        self._recent: list[tuple[int, np.ndarray]] = [
            (0, np.zeros(0, np.int64)) for _ in self._ois()
        ]

    def _ois(self) -> range:
        return range(len(self.cfg.orders))

    def last_only(self, oi: int) -> bool:
        """Whether order `oi` keeps only the most recent occurrence (exact unigram table)."""
        return self.cfg.orders[oi] == 1 and self.cfg.unigram_vocab > 0

    def slots(self, oi: int) -> int:
        """Candidates a lookup can return for order `oi`."""
        return 1 if self.last_only(oi) else self.cfg.per_order

    def _table_size(self, oi: int) -> int:
        return self.cfg.unigram_vocab if self.last_only(oi) else 1 << self.bits[oi]

    def _new_chain(self, m: int) -> TokenLog:
        return TokenLog(np.int32, self.cfg.ram_tokens, self._spill_dir, name=f"prev{m}.bin")

    def nbytes(self) -> int:
        """Host bytes of the index (tables + chains, RAM buffers counted at capacity)."""
        return sum(h.nbytes for h in self.head) + sum(
            p.nbytes() for p in self.prev if p is not None
        )

    def _insert(self, ois: Sequence[int], start: int, stop: int) -> None:
        """Index positions [start, stop) of the orders `orders[oi]` for oi in `ois`.

        The ids are read and hashed once for all those orders (a streaming step indexes one or a
        few ids, so per-order reads and hashing would dominate its cost).
        """
        orders = self.cfg.orders
        lo = max(0, start - (max(orders[oi] for oi in ois) - 1))
        ids = match_keys(self.log.read(lo, stop), self.cfg.key_modulo)
        hashes = ngram_hashes_orders(ids, [orders[oi] for oi in ois if not self.last_only(oi)])
        for oi in ois:
            m = orders[oi]
            if self.last_only(oi):
                b = ids[start - lo :].astype(np.int64)
            else:
                b = _bucket(hashes[m][start - lo :], self.bits[oi])
            self._link(oi, start, b)

    def _link(self, oi: int, start: int, b: np.ndarray) -> None:
        """Chain positions [start, start + len(b)) of order `oi` into their buckets `b`."""
        m = self.cfg.orders[oi]
        pos = np.arange(start, start + b.shape[0], dtype=np.int64)
        has = pos >= m - 1
        prev = np.full(pos.shape[0], -1, dtype=np.int64)
        if pos.shape[0] == 1:
            # One new position (a streaming step): the sort below reduces to "link to the
            # bucket's head, then become the head".
            if has[0]:
                prev[0] = self.head[oi][b[0]]
                self.head[oi][b[0]] = start
        elif has.any():
            bp, pp = b[has], pos[has]
            order = np.argsort(bp, kind="stable")
            bs, ps = bp[order], pp[order]
            first = np.ones(bs.shape[0], dtype=bool)
            first[1:] = bs[1:] != bs[:-1]
            links = np.empty_like(ps)
            links[first] = self.head[oi][bs[first]].astype(np.int64)
            links[~first] = ps[:-1][~first[1:]]
            last = np.ones(bs.shape[0], dtype=bool)
            last[:-1] = first[1:]
            self.head[oi][bs[last]] = ps[last]
            out = np.empty_like(links)
            out[order] = links
            prev[has] = out
        if self.last_only(oi):
            self._recent[oi] = (start, prev)
        else:
            self.prev[oi].append(prev)

    def _rehash(self, oi: int, bits: int) -> None:
        """Grow order `oi`'s table to 2**bits buckets and rebuild its chains from the log."""
        self.prev[oi].close()
        self.prev[oi] = self._new_chain(self.cfg.orders[oi])
        self.bits[oi] = bits
        self.head[oi] = np.full(1 << bits, -1, dtype=np.int32)
        step = 1 << 20
        for s in range(0, self.n, step):
            self._insert([oi], s, min(self.n, s + step))

    def update(self) -> None:
        """Index every log entry appended since the last call."""
        stop = len(self.log)
        if stop == self.n:
            return
        self._insert(self._ois(), self.n, stop)
        self.n = stop
        need = self.bits_for(self.n)
        for oi in range(len(self.cfg.orders)):
            if need > self.bits[oi] and not self.last_only(oi):
                self._rehash(oi, need)

    def bits_for(self, n: int) -> int:
        """Table size (log2) for n entries: a function of n alone, so any chunking of the same
        history ends with the same tables."""
        bits = self.cfg.init_bits
        while n > self.cfg.max_load << bits:
            bits += 1
        return bits

    def truncate(self, n: int) -> None:
        """Forget positions >= n (call after `log.truncate(n)`); heads walk back down the chains."""
        if n > self.n:
            raise ValueError(f"index holds {self.n} positions, cannot truncate to {n}")
        for oi in range(len(self.cfg.orders)):
            head = self.head[oi]
            if self.last_only(oi):
                self._unigram_rollback(oi, n)
                continue
            stale = np.nonzero(head >= n)[0]
            while stale.size:
                head[stale] = self.prev_links(oi, head[stale])
                stale = stale[head[stale] >= n]
            self.prev[oi].truncate(n)
        self.n = n

    def _unigram_rollback(self, oi: int, n: int) -> None:
        """Point each id whose head is >= n at its last occurrence before n, scanning the log
        backwards (O(distance to those occurrences): restoring an old snapshot is not free)."""
        head = self.head[oi]
        stale = np.nonzero(head >= n)[0]
        head[stale] = -1
        want = np.zeros(head.shape[0], dtype=bool)
        want[stale] = True
        stop, step = n, 1 << 20
        while want.any() and stop > 0:
            start = max(0, stop - step)
            ids = match_keys(self.log.read(start, stop).astype(np.int64), self.cfg.key_modulo)
            # last occurrence in this block of each id: reversed first occurrence
            rev = ids[::-1]
            uniq, first = np.unique(rev, return_index=True)
            pick = want[uniq]
            head[uniq[pick]] = stop - 1 - first[pick]
            want[uniq[pick]] = False
            stop = start
        self._recent[oi] = (n, np.zeros(0, np.int64))

    def prev_links(self, oi: int, positions: np.ndarray) -> np.ndarray:
        """Chain links of order `oi` at `positions` (int64, -1 for none)."""
        return self.prev[oi].gather(positions, fill=-1).astype(np.int64)

    def lookup(self, ends: np.ndarray) -> np.ndarray:
        """Earlier occurrences of the n-grams ending at positions `ends` [N] (all < self.n).

        Returns anchors [N, len(orders), per_order] (int64): for each order, the most recent
        positions p < t whose m-gram (ids[p-m+1..p]) equals the one ending at t, newest first;
        -1 where fewer exist (or the walk of `max_walk` links found fewer).
        """
        ts = np.asarray(ends, dtype=np.int64).reshape(-1)
        if ts.size and ts.max() >= self.n:
            raise IndexError("lookup of a position that is not indexed yet")
        R = self.cfg.per_order
        out = np.full((ts.shape[0], len(self.cfg.orders), R), -1, dtype=np.int64)
        for oi, m in enumerate(self.cfg.orders):
            if self.last_only(oi):
                start, links = self._recent[oi]
                if ts.size and (ts.min() < start or ts.max() >= start + links.shape[0]):
                    raise IndexError("exact unigram lookups must be of the last update's positions")
                out[:, oi, 0] = links[ts - start]
                continue
            # want: [N, m] the m-gram ending at each t; candidates are compared in one gather.
            back = np.arange(m, dtype=np.int64)
            mod = self.cfg.key_modulo
            want = match_keys(self.log.gather(ts[:, None] - back), mod)
            cur = self.prev_links(oi, ts)
            count = np.zeros(ts.shape[0], dtype=np.int64)
            for _ in range(self.cfg.max_walk):
                live = (cur >= 0) & (count < R)
                if not live.any():
                    break
                idx = np.nonzero(live)[0]
                c = cur[idx]
                eq = (match_keys(self.log.gather(c[:, None] - back), mod) == want[idx]).all(axis=1)
                hit = idx[eq]
                out[hit, oi, count[hit]] = cur[hit]
                count[hit] += 1
                cur[idx] = self.prev_links(oi, c)
        return out

    def close(self) -> None:
        for p in self.prev:
            if p is not None:
                p.close()


class IdChain:
    """Every occurrence of every id, newest first: "where did id x occur before t?".

    What a predicted lookup asks (a key the model proposes, not the current suffix). Layout: a
    table `head[vocab]` (the newest position of each id) and a chain `prev[t]` (the previous
    position of the id at t), an append-only int32 array that spills with the log: 4 bytes per
    token plus 4 bytes per vocabulary entry. Exact (indexed by id, no hashing), so a walk of R
    links returns the R newest occurrences; lookups cost O(R + log L) for a chunk of L ids.

    Lookups are of positions appended by the last `update()` (a training sequence, a prefill
    chunk, a decode step): positions in it are found by a sorted copy of that chunk, earlier
    ones through the chain.
    """

    def __init__(
        self,
        log: TokenLog,
        vocab: int,
        ram_tokens: int = 1 << 22,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.log = log
        # int32 like the chain (positions past 2**31 need both wider): 4 bytes per id of the
        # vocabulary, 32 KB at 8192 (int64 made it 64 KB, 0.06 B/id at 1M ids).
        self.head = np.full(vocab, -1, dtype=np.int32)
        self.prev = TokenLog(np.int32, ram_tokens, spill_dir, name="occ.bin")
        self.n = 0
        # The last update: its first position and its (id, position) pairs sorted, as one key
        # id * (L + 1) + (position - since) per entry.
        self.since = 0
        self._sorted = np.zeros(0, dtype=np.int64)

    def nbytes(self) -> int:
        """Host bytes: the chain (4 per token) and the head table."""
        return self.prev.nbytes() + self.head.nbytes

    def update(self) -> None:
        """Chain every log entry appended since the last call."""
        start, stop = self.n, len(self.log)
        ids = self.log.read(start, stop).astype(np.int64)
        L = ids.shape[0]
        order = np.argsort(ids, kind="stable")
        sid, spos = ids[order], start + order
        # first: the first in-chunk occurrence of each id links to the head before the chunk
        first = np.ones(L, dtype=bool)
        first[1:] = sid[1:] != sid[:-1]
        links = np.empty(L, dtype=np.int64)
        links[first] = self.head[sid[first]]
        links[~first] = spos[:-1][~first[1:]]
        last = np.ones(L, dtype=bool)
        last[:-1] = first[1:]
        self.head[sid[last]] = spos[last]
        prev = np.empty(L, dtype=np.int64)
        prev[order] = links
        self.prev.append(prev)
        self.since, self.n = start, stop
        self._sorted = sid * (L + 1) + (spos - start)

    def truncate(self, n: int) -> None:
        """Forget positions >= n (after `log.truncate(n)`): heads walk back down the chain."""
        stale = np.nonzero(self.head >= n)[0]
        while stale.size:
            self.head[stale] = self.prev.gather(self.head[stale], fill=-1).astype(np.int64)
            stale = stale[self.head[stale] >= n]
        self.prev.truncate(n)
        self.n = self.since = n
        self._sorted = np.zeros(0, dtype=np.int64)

    def lookup(self, keys: np.ndarray, ts: np.ndarray, per_key: int) -> np.ndarray:
        """The `per_key` newest positions p < t with ids[p] == key, newest first (-1: fewer).

        keys: [N, K] ids; ts: [N] positions of the last update -> [N, K, per_key] int64.
        """
        keys = np.asarray(keys, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        N, K = keys.shape
        if ts.size and (ts.min() < self.since or ts.max() >= self.n):
            raise IndexError("id lookups must be of the last update's positions")
        L = self.n - self.since
        sorted_ = self._sorted
        # newest in-chunk occurrence before t: the entry just below (key, t - since)
        want = keys * (L + 1) + (ts[:, None] - self.since)
        i = np.searchsorted(sorted_, want, side="left") - 1
        got = np.where(i >= 0, sorted_[np.maximum(i, 0)], -1)
        inside = (i >= 0) & (got // (L + 1) == keys)
        cur = np.where(inside, self.since + got % (L + 1), -1)
        # otherwise: the newest occurrence before the chunk, the chain link of the id's first
        # in-chunk occurrence, or the head when the id is not in the chunk at all
        j = np.searchsorted(sorted_, keys * (L + 1), side="left")
        gj = np.where(j < sorted_.size, sorted_[np.minimum(j, max(sorted_.size - 1, 0))], -1)
        in_chunk = (j < sorted_.size) & (gj // (L + 1) == keys) if sorted_.size else j < 0
        first = self.since + np.where(in_chunk, gj % (L + 1), 0)
        before = np.where(
            in_chunk,
            self.prev.gather(first, fill=-1).astype(np.int64),
            self.head[np.clip(keys, 0, self.head.size - 1)],
        )
        valid_key = (keys >= 0) & (keys < self.head.size)
        cur = np.where(inside, cur, before)
        cur = np.where(valid_key, cur, -1)
        out = np.full((N, K, per_key), -1, dtype=np.int64)
        for r in range(per_key):
            out[..., r] = cur
            live = cur >= 0
            cur = np.where(live, self.prev.gather(np.where(live, cur, 0), fill=-1), -1)
            cur = cur.astype(np.int64)
        return out

    def close(self) -> None:
        self.prev.close()
