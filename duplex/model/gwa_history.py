"""GWA history: one stream's id log and n-gram index, and the read of candidate windows.

`History` is the host-side memory of one stream (a `TokenLog` of ids plus an `NgramIndex`);
`read_histories` turns positions into what a GWA layer attends over: for every position t the
local window and, for each indexed n-gram order, the most recent earlier places where the n-gram
ending at t occurred, each with its window of W ids (never past t), the matched suffix length and
the digits of the anchor's absolute position. Work per position: O(k·(W + max_walk·m)),
independent of the history length. The method is in docs/gwa.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from duplex.model.ngram_index import IdChain, NgramIndex, NgramIndexConfig, match_keys
from duplex.model.token_log import TokenLog, id_dtype


@dataclass
class GWAReadConfig:
    """Where a GWA read may look, and the features it gets about each place.

    Window offsets run from -(win_before - 1) to +win_after around the anchor (offset 0 is the
    last id of the matched n-gram; +1 is the id that followed it, the usual thing to read).
    """

    vocab_size: int = 8192
    orders: tuple[int, ...] = (4, 2, 1)
    per_order: int = 2
    max_walk: int = 32
    win_before: int = 4
    win_after: int = 4
    max_match: int = 8
    pos_digits: int = 6
    pos_base: int = 16
    index_init_bits: int = 12
    index_max_load: int = 4
    ram_tokens: int = 1 << 22
    # An id the log never stores (e.g. the PAD of a 50 Hz text stream, most of its frames): a
    # step with it reads what the last stored id read, so windows hold only real text and a
    # window of W ids spans words, not frames of silence. -1: store every id.
    skip_id: int = -1
    # > 0: n-grams match by id % key_modulo (an id's high part is a side feature, e.g. who
    # said a byte: matched as the same byte, embedded in the window as who said it).
    key_modulo: int = 0
    # Predicted lookups: each GWA layer's lookup head proposes this many ids (the top of its
    # distribution over the vocabulary); the reader returns the `lookup_per_key` newest earlier
    # occurrences of each as extra candidates. 0: suffix candidates only (no id chain is kept).
    lookup_keys: int = 0
    lookup_per_key: int = 2

    def __post_init__(self) -> None:
        self.orders = tuple(sorted((int(m) for m in self.orders), reverse=True))
        if self.win_before < 1 or self.win_after < 0:
            raise ValueError("need win_before >= 1 and win_after >= 0")
        if self.lookup_keys < 0 or self.lookup_per_key < 1:
            raise ValueError("need lookup_keys >= 0 and lookup_per_key >= 1")
        if self.lookup_keys and (self.skip_id >= 0 or self.key_modulo > 0):
            # Both change which log position a step reads; predicted lookups do not model it.
            raise ValueError("predicted lookups need skip_id = -1 and key_modulo = 0")

    @property
    def n_lookups(self) -> int:
        """Extra candidates a layer with a lookup head reads: keys x occurrences per key."""
        return self.lookup_keys * self.lookup_per_key

    @property
    def window(self) -> int:
        """W: ids per window."""
        return self.win_before + self.win_after

    @property
    def n_candidates(self) -> int:
        """k: the local window, per_order candidates for each order >= 2, one for order 1."""
        return 1 + sum(1 if m == 1 else self.per_order for m in self.orders)

    def slot_columns(self) -> np.ndarray:
        """Which columns of the index lookup [orders x per_order] are candidate slots."""
        cols = []
        for oi, m in enumerate(self.orders):
            cols += [oi * self.per_order + r for r in range(1 if m == 1 else self.per_order)]
        return np.array(cols, dtype=np.int64)

    def offsets(self) -> np.ndarray:
        return np.arange(-(self.win_before - 1), self.win_after + 1, dtype=np.int64)

    def index_config(self) -> NgramIndexConfig:
        return NgramIndexConfig(
            orders=self.orders,
            per_order=self.per_order,
            max_walk=self.max_walk,
            init_bits=self.index_init_bits,
            max_load=self.index_max_load,
            ram_tokens=self.ram_tokens,
            unigram_vocab=self.vocab_size,
            key_modulo=self.key_modulo,
        )


@dataclass
class WindowRead:
    """What every GWA layer reads at each position (tensors, batch-first).

    ids: [B, T, k, W] window ids (0 where masked); mask: [B, T, k, W] True where readable;
    match: [B, T, k] matched suffix length (0..max_match); digits: [B, T, k, P] base-`pos_base`
    digits of each anchor's absolute position (least significant first); valid: [B, T, k].
    """

    ids: torch.Tensor
    mask: torch.Tensor
    match: torch.Tensor
    digits: torch.Tensor
    valid: torch.Tensor
    # Answers the predicted keys of layers with a lookup head (None: the config has none).
    finder: KeyFinder | None = None


class History:
    """One stream's id log and index. Host memory only; grows with the stream."""

    def __init__(self, cfg: GWAReadConfig, spill_dir: str | os.PathLike | None = None) -> None:
        self.cfg = cfg
        self.log = TokenLog(id_dtype(cfg.vocab_size), cfg.ram_tokens, spill_dir, "ids.bin")
        self.index = NgramIndex(self.log, cfg.index_config(), spill_dir)
        self.occurrences = (
            IdChain(self.log, cfg.vocab_size, cfg.ram_tokens, spill_dir)
            if cfg.lookup_keys
            else None
        )
        self.offset = 0
        # Constants of every read, built once (a streaming step reads one position per stream).
        k = cfg.n_candidates
        self._slot_columns = cfg.slot_columns()
        self._offsets = cfg.offsets()
        self._back = np.arange(cfg.max_match, dtype=np.int64)
        self._place = cfg.pos_base ** np.arange(cfg.pos_digits, dtype=np.int64)
        # earlier[j, i]: slot i (>= 1) comes before slot j, so j repeating i's anchor is dropped.
        self._earlier = np.tri(k, k, -1, dtype=bool)
        self._earlier[:, 0] = False

    def __len__(self) -> int:
        return len(self.log)

    def nbytes(self) -> int:
        """Host bytes held for this stream (log + index + id chain)."""
        chain = self.occurrences.nbytes() if self.occurrences is not None else 0
        return self.log.nbytes() + self.index.nbytes() + chain

    def append(self, ids: np.ndarray) -> None:
        self.log.append(ids)
        self.index.update()
        if self.occurrences is not None:
            self.occurrences.update()

    def truncate(self, n: int) -> None:
        self.log.truncate(n)
        self.index.truncate(n)
        if self.occurrences is not None:
            self.occurrences.truncate(n)

    def read(self, ts: np.ndarray) -> dict[str, np.ndarray]:
        """Candidates and windows for positions `ts` [N] (already appended): numpy arrays."""
        ts = np.asarray(ts, dtype=np.int64)
        return {name: v[0] for name, v in read_histories([self], ts[None]).items()}

    def close(self) -> None:
        self.log.close()
        self.index.close()
        if self.occurrences is not None:
            self.occurrences.close()


def read_histories(histories: list[History], ts: np.ndarray) -> dict[str, np.ndarray]:
    """`History.read` of R streams (same config) at positions ts [R, N]: arrays [R, N, ...].

    Only the index lookups and one log gather run per stream; everything else runs once over all
    rows, so a batched streaming step (one position per stream) pays numpy's per-call overhead
    once per step rather than once per stream.
    """
    first = histories[0]
    cfg = first.cfg
    ts = np.asarray(ts, dtype=np.int64)
    R, N = ts.shape
    # anchors: [R, N, k]: slot 0 the local window (anchored at t), then orders high to low.
    found = np.stack([h.index.lookup(t).reshape(N, -1) for h, t in zip(histories, ts)])
    anchors = np.empty((R, N, cfg.n_candidates), dtype=np.int64)
    anchors[..., 0] = ts
    anchors[..., 1:] = found[..., first._slot_columns]
    # A candidate (slot >= 2) whose anchor an earlier candidate slot already holds is dropped.
    repeats = (anchors[..., :, None] == anchors[..., None, :]) & first._earlier
    anchors[repeats.any(axis=-1)] = -1
    out = read_windows(histories, ts, anchors)
    # the local slot (0) is the current suffix itself: no match length
    out["match"][:, :, 0] = 0
    return out


def read_windows(histories: list[History], ts: np.ndarray, anchors: np.ndarray) -> dict:
    """Windows and features of candidates `anchors` [R, N, k] (-1: none) read at ts [R, N].

    The one place a window is cut from the log (suffix candidates and predicted lookups share
    it): ids at anchor + offset, readable only inside [0, t]; the matched suffix length; the
    digits of the anchor's absolute position.
    """
    first = histories[0]
    cfg = first.cfg
    valid = anchors >= 0
    # apos: [R, N, k, max_match] and tpos: [R, N, max_match]: positions i back from anchor and t.
    apos = anchors[..., None] - first._back
    tpos = ts[..., None] - first._back
    # windows: [R, N, k, W] positions, readable when inside [0, t]
    pos = anchors[..., None] + first._offsets
    mask = valid[..., None] & (pos >= 0) & (pos <= ts[..., None, None])
    at_anchor, at_t, ids = _gather_rows(histories, apos, tpos, np.where(mask, pos, -1))
    # match: how many ids ending at the anchor equal those ending at t (capped at max_match):
    # the number of leading i (ids i back from both ends) where both exist and are equal.
    same = valid[..., None] & (apos >= 0) & (tpos[..., None, :] >= 0)
    mod = cfg.key_modulo
    same &= match_keys(at_anchor, mod) == match_keys(at_t, mod)[..., None, :]
    match = np.logical_and.accumulate(same, axis=-1).sum(axis=-1, dtype=np.int64)
    offsets = np.array([h.offset for h in histories], dtype=np.int64)
    absolute = np.where(valid, anchors + offsets[:, None, None], 0)
    digits = (absolute[..., None] // first._place) % cfg.pos_base
    return {
        "ids": ids.astype(np.int64),
        "mask": mask,
        "match": match,
        "digits": digits,
        "valid": valid,
        "anchors": anchors,
    }


class KeyFinder:
    """Answers predicted keys: the windows at the newest occurrences of ids a layer proposes.

    Holds the histories a read was made from (row b: `histories[b]`, None for a row that read
    nothing) and, per row, the log position each step read (`ts` [B, T], -1: none). Every
    occurrence returned is before that position, so a lookup never sees the future.
    """

    def __init__(self, cfg: GWAReadConfig, histories: list[History | None], ts: np.ndarray):
        self.cfg = cfg
        self.histories = histories
        self.ts = np.asarray(ts, dtype=np.int64)

    def find(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """keys [B, T, K] ids -> windows of their occurrences, arrays [B, T, K·R, ...] in the
        layout of `read_histories` (key-major: key i's occurrences newest first)."""
        B, T, K = keys.shape
        R = self.cfg.lookup_per_key
        out = _empty_arrays(self.cfg, B, T, K * R)
        for b, h in enumerate(self.histories):
            have = self.ts[b] >= 0
            if h is None or not have.any():
                continue
            ts = self.ts[b][have]
            anchors = h.occurrences.lookup(keys[b][have], ts, R).reshape(1, -1, K * R)
            got = read_windows([h], ts[None], anchors)
            for name, v in out.items():
                v[b, have] = got[name][0]
        return out


def _empty_arrays(cfg: GWAReadConfig, B: int, T: int, k: int) -> dict[str, np.ndarray]:
    """What reads of nothing hold (zeros, all invalid), [B, T, k, ...]."""
    W, P = cfg.window, cfg.pos_digits
    return {
        "ids": np.zeros((B, T, k, W), dtype=np.int64),
        "mask": np.zeros((B, T, k, W), dtype=bool),
        "match": np.zeros((B, T, k), dtype=np.int64),
        "digits": np.zeros((B, T, k, P), dtype=np.int64),
        "valid": np.zeros((B, T, k), dtype=bool),
        "anchors": np.full((B, T, k), -1, dtype=np.int64),
    }


def _gather_rows(histories: list[History], *positions: np.ndarray) -> list[np.ndarray]:
    """Log entries at each of `positions` ([R, ...], row r read from stream r's log, `fill` 0
    outside it), with one gather per stream for all of them."""
    R = len(histories)
    flat = np.concatenate([p.reshape(R, -1) for p in positions], axis=1)
    values = np.stack([h.log.gather(row) for h, row in zip(histories, flat)])
    cuts = np.cumsum([p[0].size for p in positions])[:-1]
    return [v.reshape(p.shape) for v, p in zip(np.split(values, cuts, axis=1), positions)]
