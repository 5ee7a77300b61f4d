"""Guided window attention (GWA): read a few windows of the whole history at constant cost.

Two parts (the method, with equations, is in docs/gwa.md):

- `WindowReader` (host side, one per model): keeps each stream's history as a `TokenLog` of ids
  plus an `NgramIndex`, and for every position t finds k candidate places to read: the local
  window (the newest ids) and, for each indexed n-gram order, the most recent earlier positions
  where the n-gram ending at t occurred. It returns each candidate's window of ids (W ids around
  the anchor, never past t), the window-relative offsets, and per-candidate features (slot, how
  many ids before the anchor match the current suffix, and the digits of the anchor's absolute
  position). Work per position: O(k·(W + max_walk·m)), independent of the history length.
- `GuidedWindowAttention` (the layer, one per GWA read in the backbone): re-embeds the window ids
  with the model's token embedding plus window-relative position and candidate features, and
  attends from the current hidden state over all k·W window slots plus a "read nothing" slot,
  with an output gate. Candidate features enter the keys, so the softmax mixes windows by learned
  scores and the loss trains the choice of window.

Training runs the reader over a whole sequence at once (its lookups only ever see earlier
positions), so all T reads are one batched tensor: no recurrence. Streaming appends each chunk to
the log and reads exactly the same windows, so both forms give the same outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duplex.kernels.gwa import gather_window_proj, window_attend_factored
from duplex.model.ngram_index import NgramIndex, NgramIndexConfig, match_keys
from duplex.model.token_log import TokenLog, id_dtype
from duplex.streaming import StreamingModule, StreamState


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

    def __post_init__(self) -> None:
        self.orders = tuple(sorted((int(m) for m in self.orders), reverse=True))
        if self.win_before < 1 or self.win_after < 0:
            raise ValueError("need win_before >= 1 and win_after >= 0")

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


class History:
    """One stream's id log and index. Host memory only; grows with the stream."""

    def __init__(self, cfg: GWAReadConfig, spill_dir: str | os.PathLike | None = None) -> None:
        self.cfg = cfg
        self.log = TokenLog(id_dtype(cfg.vocab_size), cfg.ram_tokens, spill_dir, "ids.bin")
        self.index = NgramIndex(self.log, cfg.index_config(), spill_dir)
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
        """Host bytes held for this stream (log + index)."""
        return self.log.nbytes() + self.index.nbytes()

    def append(self, ids: np.ndarray) -> None:
        self.log.append(ids)
        self.index.update()

    def truncate(self, n: int) -> None:
        self.log.truncate(n)
        self.index.truncate(n)

    def read(self, ts: np.ndarray) -> dict[str, np.ndarray]:
        """Candidates and windows for positions `ts` [N] (already appended): numpy arrays."""
        ts = np.asarray(ts, dtype=np.int64)
        return {name: v[0] for name, v in read_histories([self], ts[None]).items()}

    def close(self) -> None:
        self.log.close()
        self.index.close()


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
    same[:, :, 0] = False
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


def _gather_rows(histories: list[History], *positions: np.ndarray) -> list[np.ndarray]:
    """Log entries at each of `positions` ([R, ...], row r read from stream r's log, `fill` 0
    outside it), with one gather per stream for all of them."""
    R = len(histories)
    flat = np.concatenate([p.reshape(R, -1) for p in positions], axis=1)
    values = np.stack([h.log.gather(row) for h, row in zip(histories, flat)])
    cuts = np.cumsum([p[0].size for p in positions])[:-1]
    return [v.reshape(p.shape) for v, p in zip(np.split(values, cuts, axis=1), positions)]


class _HistoryRef:
    """A stream's history plus the length this state has seen.

    Snapshots (`get_state`) copy only the length: the log is append-only, so restoring a snapshot
    truncates the shared log back to that length on the next step. Restoring an older snapshot
    therefore discards what came after it (one timeline per stream).
    """

    def __init__(
        self, history: History, length: int, last_read: dict[str, np.ndarray] | None = None
    ) -> None:
        self.history = history
        self.length = length
        # With a skipped id: the read of the newest stored position ([1, 1, ...] arrays).
        self.last_read = last_read
        if last_read is None and length > 0 and history.cfg.skip_id >= 0:
            self.last_read = read_histories([history], np.array([[length - 1]]))

    def __deepcopy__(self, memo: dict) -> _HistoryRef:
        return _HistoryRef(self.history, self.length, self.last_read)

    def sync(self) -> History:
        if len(self.history) != self.length:
            self.history.truncate(self.length)
        return self.history


@dataclass
class WindowReaderState(StreamState):
    """Per-stream histories (host) and absolute position offsets."""

    rows: list[_HistoryRef] = field(default_factory=list)

    def reset_rows(self, rows: torch.Tensor, fresh: StreamState) -> None:
        """Rows where `rows` is True start an empty history (a new session in that slot)."""
        for b, r in enumerate(torch.as_tensor(rows, dtype=torch.bool).tolist()):
            if r:
                self.rows[b].history.close()
                self.rows[b] = fresh.rows[b]

    def select_rows(self, rows: torch.Tensor) -> WindowReaderState:
        """Rows `rows` as views (history + length): cheap; materialised by `to_saved`."""
        picked = [
            _HistoryRef(self.rows[i].history, self.rows[i].length, self.rows[i].last_read)
            for i in rows.tolist()
        ]
        return WindowReaderState(
            batch_size=len(picked), exec_mask=self.exec_mask[rows].clone(), rows=picked
        )

    def assign_rows(self, rows: torch.Tensor, src: StreamState) -> None:
        """Give rows `rows` copies of `src`'s histories (never shared between slots)."""
        for i, r in enumerate(rows.tolist()):
            ref = src.rows[i]
            copy = History(ref.history.cfg)
            copy.offset = ref.history.offset
            copy.append(ref.history.log.read(0, ref.length))
            self.rows[r].history.close()
            self.rows[r] = _HistoryRef(copy, ref.length, ref.last_read)

    def moved_rows(self, rows: torch.Tensor, fresh: StreamState) -> WindowReaderState:
        """Histories move (no copy, no re-indexing: a restream costs nothing per token)."""
        keep = rows.tolist()
        for i, r in enumerate(keep):
            fresh.rows[i].history.close()
            fresh.rows[i] = self.rows[r]
        for r, ref in enumerate(self.rows):
            if r not in keep:
                ref.history.close()
        return fresh

    def to_saved(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Each row's ids as a tensor "ids.<row>", with lengths and position offsets."""
        tensors = {
            f"ids.{i}": torch.from_numpy(ref.history.log.read(0, ref.length).astype(np.int64))
            for i, ref in enumerate(self.rows)
        }
        plain = {
            "lengths": [ref.length for ref in self.rows],
            "offsets": [ref.history.offset for ref in self.rows],
        }
        return tensors, plain

    def from_saved(self, tensors: dict[str, torch.Tensor], plain: dict) -> WindowReaderState:
        """Rebuild histories (log + index) from saved ids; validated before anything changes."""
        n = len(self.rows)
        lengths = plain.get("lengths")
        offsets = plain.get("offsets")
        if not isinstance(lengths, list) or len(lengths) != n or len(offsets or []) != n:
            raise ValueError(f"saved reader state must describe {n} rows")
        if set(tensors) != {f"ids.{i}" for i in range(n)}:
            raise ValueError(f"saved reader state has tensors {sorted(tensors)}")
        vocab = self.rows[0].history.cfg.vocab_size if n else 0
        rows = []
        for i, ref in enumerate(self.rows):
            ids = tensors[f"ids.{i}"]
            if ids.dim() != 1 or ids.numel() != lengths[i]:
                raise ValueError(f"saved ids of row {i} do not match its length {lengths[i]}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(f"saved ids of row {i} fall outside the vocabulary")
            h = History(ref.history.cfg)
            h.offset = int(offsets[i])
            h.append(ids.numpy())
            rows.append(_HistoryRef(h, len(h)))
        return WindowReaderState(batch_size=n, exec_mask=torch.ones(n, dtype=torch.bool), rows=rows)


def _to_read(arrays: dict[str, np.ndarray], device: torch.device) -> WindowRead:
    """Batch-first numpy reads [B, T, ...] as a WindowRead on `device`."""

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name]).to(device)

    return WindowRead(
        ids=tensor("ids"),
        mask=tensor("mask"),
        match=tensor("match"),
        digits=tensor("digits"),
        valid=tensor("valid"),
    )


class WindowReader(StreamingModule):
    """Finds the windows every GWA layer reads. Holds no parameters."""

    def __init__(self, cfg: GWAReadConfig, spill_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.spill_dir = spill_dir
        # Histories move between rows (`restream`), so their folders are named per stream.
        self._streams = itertools.count()

    def _new_history(self, row: int) -> History:
        folder = None
        if self.spill_dir is not None:
            folder = os.path.join(self.spill_dir, f"stream{next(self._streams)}")
        return History(self.cfg, folder)

    def init_state(self, batch_size: int) -> WindowReaderState:
        return WindowReaderState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            rows=[_HistoryRef(self._new_history(b), 0) for b in range(batch_size)],
        )

    def parallel(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> WindowRead:
        """Reads for every position of whole sequences ids [B, T] (training / offline)."""
        B, T = ids.shape
        arr = ids.detach().cpu().numpy()
        out = self._empty_read(B, T)
        for b in range(B):
            kept = arr[b][arr[b] != self.cfg.skip_id]
            if kept.size == 0:
                continue
            h = History(dataclasses.replace(self.cfg, ram_tokens=kept.size + 1))
            h.offset = 0 if offsets is None else int(offsets[b])
            h.append(kept)
            got = read_histories([h], np.arange(kept.size)[None])
            h.close()
            self._spread(out, b, got, self._last_kept(arr[b], 0))
        return _to_read(out, ids.device)

    def _last_kept(self, ids: np.ndarray, before: int) -> np.ndarray:
        """For each of ids [T] (appended to a log of `before` stored ids): the log position of
        the newest stored id at or before it (-1: none yet)."""
        return before + np.cumsum(ids != self.cfg.skip_id) - 1

    @staticmethod
    def _spread(
        out: dict[str, np.ndarray], b: int, got: dict[str, np.ndarray], last: np.ndarray
    ) -> None:
        """Row b's read at every step t: the read of log position last[t] (none where it is
        -1). `got` holds the reads of log positions max(last[0], 0) onwards, [1, N, ...]."""
        base = max(int(last[0]), 0) if last.size else 0
        has = last >= 0
        for name in out:
            out[name][b, has] = got[name][0, last[has] - base]

    def step(self, ids: torch.Tensor) -> WindowRead:
        """Append ids [B, T] to each stream's history and return their reads.

        Rows whose exec mask is False append nothing and read nothing (their outputs are not
        used; their history stays as it was).
        """
        st = self._require_streaming()
        B, T = ids.shape
        if st.batch_size != B:
            raise ValueError(f"reader streams {st.batch_size} rows, got {B}")
        arr = ids.detach().cpu().numpy()
        rows = np.flatnonzero(st.exec_mask.cpu().numpy())
        if rows.size == B:
            return _to_read(self._append_and_read(rows, arr), ids.device)
        out = self._empty_read(B, T)
        if rows.size:
            got = self._append_and_read(rows, arr)
            for name, v in out.items():
                v[rows] = got[name]
        return _to_read(out, ids.device)

    def _append_and_read(self, rows: np.ndarray, arr: np.ndarray) -> dict[str, np.ndarray]:
        """Append arr[b] [T] to the history of each row b in `rows`, then read all of them."""
        st = self._require_streaming()
        T = arr.shape[1]
        if self.cfg.skip_id < 0:
            histories, starts = [], []
            for b in rows:
                ref = st.rows[b]
                h = ref.sync()
                starts.append(len(h))
                h.append(arr[b])
                ref.length = len(h)
                histories.append(h)
            ts = np.array(starts, dtype=np.int64)[:, None] + np.arange(T)
            return read_histories(histories, ts)
        out = self._empty_read(len(rows), T)
        # Append every row first, then read the new positions of rows that stored the same
        # number of ids in one batched call (a streaming step: the rows that heard a byte).
        lasts, starts, groups = [], [], {}
        for i, b in enumerate(rows):
            ref = st.rows[b]
            h = ref.sync()
            starts.append(len(h))
            lasts.append(self._last_kept(arr[b], len(h)))
            h.append(arr[b][arr[b] != self.cfg.skip_id])
            ref.length = len(h)
            if len(h) > starts[i]:
                groups.setdefault(len(h) - starts[i], []).append(i)
        fresh: dict[int, dict[str, np.ndarray]] = {}
        for n, members in groups.items():
            histories = [st.rows[rows[i]].history for i in members]
            ts = np.array([starts[i] for i in members])[:, None] + np.arange(n)
            got = read_histories(histories, ts)
            for j, i in enumerate(members):
                fresh[i] = {k: v[j : j + 1] for k, v in got.items()}
        for i, b in enumerate(rows):
            ref, n0, last = st.rows[b], starts[i], lasts[i]
            parts = [fresh[i]] if i in fresh else []
            if n0 > 0 and last[0] < n0:
                # Steps before this chunk's first stored id read the newest earlier one, whose
                # read is kept (the exact unigram table only answers the last update's ids).
                parts.insert(0, ref.last_read)
            if not parts:
                continue
            got = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[-1]}
            ref.last_read = {k: v[:, -1:].copy() for k, v in got.items()}
            self._spread(out, i, got, last)
        return out

    def _empty_read(self, B: int, T: int) -> dict[str, np.ndarray]:
        """What rows that read nothing get (zeros), [B, T, ...]."""
        k, W, P = self.cfg.n_candidates, self.cfg.window, self.cfg.pos_digits
        return {
            "ids": np.zeros((B, T, k, W), dtype=np.int64),
            "mask": np.zeros((B, T, k, W), dtype=bool),
            "match": np.zeros((B, T, k), dtype=np.int64),
            "digits": np.zeros((B, T, k, P), dtype=np.int64),
            "valid": np.zeros((B, T, k), dtype=bool),
        }

    def set_offsets(self, offsets: list[int]) -> None:
        """Absolute position of each stream's first id (what `position` features report)."""
        st = self._require_streaming()
        for ref, off in zip(st.rows, offsets, strict=True):
            ref.history.offset = int(off)

    def host_bytes(self) -> int:
        """Host bytes of all streams' histories (log + index)."""
        st = self._require_streaming()
        return sum(ref.history.nbytes() for ref in st.rows)

    def lengths(self) -> list[int]:
        st = self._require_streaming()
        return [ref.length for ref in st.rows]


@dataclass
class GWAConfig:
    """Sizes of one GWA layer."""

    d_model: int
    n_heads: int = 2
    head_dim: int = 32


class GuidedWindowAttention(nn.Module):
    """One GWA read: x [B, T, d] and the reader's windows -> y [B, T, d].

    Stateless: everything it needs across steps is in the reader's history, so its streaming form
    is its parallel form applied to the new positions' windows.
    """

    def __init__(self, cfg: GWAConfig, read: GWAReadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.read_cfg = read
        d, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, H * D, bias=False)
        self.v_proj = nn.Linear(d, H * D, bias=False)
        self.gate_proj = nn.Linear(d, H * D)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # Window features: window-relative offset, candidate slot, matched length, anchor digits.
        self.rel = nn.Parameter(torch.randn(read.window, d) * 0.02)
        self.slot = nn.Parameter(torch.randn(read.n_candidates, d) * 0.02)
        self.match = nn.Parameter(torch.randn(read.max_match + 1, d) * 0.02)
        self.digits = nn.Parameter(torch.randn(read.pos_digits, read.pos_base, d) * 0.02)
        self.null_k = nn.Parameter(torch.zeros(H, D))
        self.null_v = nn.Parameter(torch.zeros(H, D))

    def forward(self, x: torch.Tensor, read: WindowRead, embedding: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; read from the WindowReader; embedding [V, d] the model's token table."""
        B, T, _ = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        k_n, W = read.ids.shape[2], read.ids.shape[3]
        P = self.read_cfg.pos_digits
        # meta: [B, T, k, d] per-candidate features
        place = torch.arange(P, device=x.device)
        # meta: [B, T, k, d] per-candidate features (slot, matched length)
        meta = self.slot[None, None] + self.match[read.match]
        # The anchor's position digits are extra slots of its window ("where I looked" as
        # readable items): dig: [B, T, k, P, d], one embedding per (place, digit value).
        dig = self.digits[place, read.digits]
        # keys and values are linear in (token + offset + candidate): project each part once.
        # tok_k: [B, T, k, W + P, H, D]
        tok_k = gather_window_proj(embedding, self.k_proj.weight, read.ids)
        tok_v = gather_window_proj(embedding, self.v_proj.weight, read.ids)
        tok_k = torch.cat([tok_k, self.k_proj(dig)], dim=3).reshape(B, T, k_n, W + P, H, D)
        tok_v = torch.cat([tok_v, self.v_proj(dig)], dim=3).reshape(B, T, k_n, W + P, H, D)
        rel_k = F.pad(self.k_proj(self.rel), (0, 0, 0, P)).reshape(W + P, H, D)
        rel_v = F.pad(self.v_proj(self.rel), (0, 0, 0, P)).reshape(W + P, H, D)
        meta_k = self.k_proj(meta).reshape(B, T, k_n, H, D)
        meta_v = self.v_proj(meta).reshape(B, T, k_n, H, D)
        # mask: [B, T, k, W + P]; digit slots are readable wherever the candidate is valid
        mask = torch.cat([read.mask, read.valid[..., None].expand(B, T, k_n, P)], dim=-1)
        mask = mask & read.valid[..., None]
        q = self.q_proj(x).reshape(B, T, H, D)
        o = window_attend_factored(
            q, tok_k, tok_v, rel_k, rel_v, meta_k, meta_v, mask, self.null_k, self.null_v
        )
        o = o.reshape(B, T, H * D) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(o)
