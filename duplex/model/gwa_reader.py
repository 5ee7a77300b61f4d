"""GWA reader: the streaming module that owns every stream's history and produces the reads.

`WindowReader` has two forms with the same outputs: `parallel(ids)` builds a history per row of
whole sequences and reads every position at once (training: no recurrence), and `step(ids)`
appends a chunk to each stream's history (kept in `WindowReaderState`) and reads the new
positions. Snapshots copy only lengths (the log is append-only), so they are cheap.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from duplex.model.gwa_history import (
    GWAReadConfig,
    History,
    KeyFinder,
    WindowRead,
    _empty_arrays,
    read_histories,
)
from duplex.streaming import StreamingModule, StreamState


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


def _to_read(
    arrays: dict[str, np.ndarray], device: torch.device, finder: KeyFinder | None = None
) -> WindowRead:
    """Batch-first numpy reads [B, T, ...] as a WindowRead on `device`."""

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name]).to(device)

    return WindowRead(
        ids=tensor("ids"),
        mask=tensor("mask"),
        match=tensor("match"),
        digits=tensor("digits"),
        valid=tensor("valid"),
        finder=finder,
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
        # With predicted lookups the layers query the histories after this read, so they stay
        # open (in RAM: sized to the sequence, they never spill) as long as the read is used.
        kept_open: list[History | None] = [None] * B
        for b in range(B):
            kept = arr[b][arr[b] != self.cfg.skip_id]
            if kept.size == 0:
                continue
            h = History(dataclasses.replace(self.cfg, ram_tokens=kept.size + 1))
            h.offset = 0 if offsets is None else int(offsets[b])
            h.append(kept)
            got = read_histories([h], np.arange(kept.size)[None])
            if self.cfg.lookup_keys:
                kept_open[b] = h
            else:
                h.close()
            self._spread(out, b, got, self._last_kept(arr[b], 0))
        finder = None
        if self.cfg.lookup_keys:
            # skip_id is -1 here (the config refuses lookups otherwise): step t reads position t
            finder = KeyFinder(self.cfg, kept_open, np.tile(np.arange(T), (B, 1)))
        return _to_read(out, ids.device, finder)

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
            return _to_read(self._append_and_read(rows, arr), ids.device, self._finder(rows, T))
        out = self._empty_read(B, T)
        if rows.size:
            got = self._append_and_read(rows, arr)
            for name, v in out.items():
                v[rows] = got[name]
        return _to_read(out, ids.device, self._finder(rows, T))

    def _finder(self, rows: np.ndarray, T: int) -> KeyFinder | None:
        """After a step: the key finder over the histories of the rows that stepped (the T new
        positions of each are the last T of its log; other rows find nothing)."""
        if not self.cfg.lookup_keys:
            return None
        st = self._require_streaming()
        B = st.batch_size
        histories: list[History | None] = [None] * B
        ts = np.full((B, T), -1, dtype=np.int64)
        for b in rows:
            h = st.rows[b].history
            histories[b] = h
            ts[b] = len(h) - T + np.arange(T)
        return KeyFinder(self.cfg, histories, ts)

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
        empty = _empty_arrays(self.cfg, B, T, self.cfg.n_candidates)
        return {name: v for name, v in empty.items() if name != "anchors"}

    def set_offsets(self, offsets: list[int]) -> None:
        """Absolute position of each stream's first id (what `position` features report)."""
        st = self._require_streaming()
        for ref, off in zip(st.rows, offsets, strict=True):
            ref.history.offset = int(off)

    def host_bytes(self) -> int:
        """Host bytes of all streams' histories (log + index)."""
        st = self._require_streaming()
        return sum(ref.history.nbytes() for ref in st.rows)

    def extend_history(self, row: int, ids: np.ndarray) -> None:
        """Append ids [n] to one stream's history without reading them, as steps would store
        them (skipped ids left out): a benchmark grows a log to an hour this way instead of
        stepping 180,000 frames. The newest stored position's read is refreshed, since the
        next step without a stored id reads it."""
        st = self._require_streaming()
        ref = st.rows[row]
        h = ref.sync()
        if self.cfg.skip_id >= 0:
            ids = ids[ids != self.cfg.skip_id]
        h.append(np.asarray(ids, dtype=np.int64))
        st.rows[row] = _HistoryRef(h, len(h))

    def lengths(self) -> list[int]:
        st = self._require_streaming()
        return [ref.length for ref in st.rows]
