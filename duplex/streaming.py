"""Streaming state shared by every stateful module (codec convolutions, mixer layers, the model).

A module that carries state across calls subclasses `StreamingModule` and defines a state
dataclass (subclass of `StreamState`) holding its tensors, batch-first. `with module.streaming(B):`
creates a fresh state in that module and every streaming module below it and clears them on exit,
so a module outside a streaming block is always stateless and offline.

Batched sessions: each state has an `exec_mask` [B] (bool). Rows whose mask is False must leave
their state untouched on a step (the module computes them, then keeps the old state rows), so
sessions can skip frames or sit idle in a slot. `reset_rows(mask)` returns rows to the initial
state when a new session takes a slot. `get_state()` / `set_state()` snapshot and restore every
state below a module as deep copies; `get_rows()` / `set_rows()` do the same for some rows.

Convention: every tensor field of a state is batch-first, including per-row counters, so rows
can be selected, reset and restored independently. Plain (non-tensor) fields are shared by all
rows and must not change while streaming, or batching would couple sessions.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class StreamState:
    """Base for per-module streaming state. Tensor fields are batch-first: [B, ...]."""

    batch_size: int
    exec_mask: torch.Tensor

    def tensor_fields(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and f.name != "exec_mask":
                yield f.name, v

    def row_bytes(self) -> int:
        """Bytes one row (one session) of this state holds."""
        return sum(t[:1].numel() * t.element_size() for _, t in self.tensor_fields())

    def clone(self) -> StreamState:
        """A deep copy whose tensors share nothing with this state."""
        out = copy.copy(self)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                setattr(out, f.name, v.clone())
            elif isinstance(v, (list, dict)):
                setattr(out, f.name, copy.deepcopy(v))
        return out

    def reset_rows(self, rows: torch.Tensor, fresh: StreamState) -> None:
        """Copy `fresh` (a newly initialised state) into the rows where `rows` [B] is True."""
        for name, v in self.tensor_fields():
            new = getattr(fresh, name)
            keep = rows.view(-1, *([1] * (v.dim() - 1))).to(v.device)
            v.copy_(torch.where(keep, new.to(v.dtype), v))

    def select_rows(self, rows: torch.Tensor) -> StreamState:
        """A new state holding only batch rows `rows` (index tensor), deep-copied."""
        new = self.clone()
        for name, v in self.tensor_fields():
            setattr(new, name, v[rows.to(v.device)].clone())
        new.exec_mask = self.exec_mask[rows.to(self.exec_mask.device)].clone()
        new.batch_size = int(rows.numel())
        return new

    def assign_rows(self, rows: torch.Tensor, src: StreamState) -> None:
        """Write `src` (a state of len(rows) rows) into batch rows `rows` of this state."""
        for name, v in self.tensor_fields():
            v[rows.to(v.device)] = getattr(src, name).to(v.device, v.dtype)

    def moved_rows(self, rows: torch.Tensor, fresh: StreamState) -> StreamState:
        """`fresh` (a new state of any batch size) whose first len(rows) rows take this state's
        rows `rows`; this state is used up (host resources move rather than copy)."""
        n = int(rows.numel())
        for name, v in self.tensor_fields():
            getattr(fresh, name)[:n] = v[rows.to(v.device)]
        return fresh

    def to_saved(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Named tensors and JSON-able plain fields that describe this state (for files)."""
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("exec_mask", "batch_size"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f.name] = v
            elif _plain(v):
                plain[f.name] = v
            else:
                raise TypeError(f"state field {f.name} ({type(v).__name__}) cannot be saved")
        return tensors, plain

    def from_saved(self, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> StreamState:
        """A new state like this one (the template) filled from `to_saved` output.

        Raises ValueError on a missing, extra or mis-shaped entry; this state is not changed.
        """
        new = self.clone()
        seen = set()
        for f in dataclasses.fields(self):
            if f.name in ("exec_mask", "batch_size"):
                continue
            cur = getattr(self, f.name)
            if isinstance(cur, torch.Tensor):
                if f.name not in tensors:
                    raise ValueError(f"saved state lacks tensor {f.name}")
                t = tensors[f.name]
                if tuple(t.shape) != tuple(cur.shape) or t.dtype != cur.dtype:
                    raise ValueError(
                        f"saved tensor {f.name} is {tuple(t.shape)} {t.dtype}, "
                        f"expected {tuple(cur.shape)} {cur.dtype}"
                    )
                setattr(new, f.name, t.to(cur.device).clone())
            else:
                if f.name not in plain:
                    raise ValueError(f"saved state lacks field {f.name}")
                setattr(new, f.name, copy.deepcopy(plain[f.name]))
            seen.add(f.name)
        extra = (set(tensors) | set(plain)) - seen
        if extra:
            raise ValueError(f"saved state has fields this module lacks: {sorted(extra)}")
        return new


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def newest_slots(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [B, n] of each row's newest n entries where valid [B, S] is True, oldest first
    (a row with fewer takes its newest invalid entries, placed before them): what a cache of
    the last n items keeps."""
    S = valid.shape[1]
    order = torch.arange(S, device=valid.device).expand_as(valid)
    score = torch.where(valid, order, order - S)
    return score.topk(n, dim=1).indices.sort(dim=1).values


def keep_masked(new: torch.Tensor, old: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
    """Rows with exec_mask True take `new`, the others keep `old` ([B, ...] tensors)."""
    m = exec_mask.view(-1, *([1] * (new.dim() - 1))).to(new.device)
    return torch.where(m, new, old)


class StreamingModule(nn.Module):
    """A module that can carry state across calls inside `with self.streaming(batch_size):`."""

    def __init__(self) -> None:
        super().__init__()
        self._stream_state: StreamState | None = None

    def init_state(self, batch_size: int) -> StreamState | None:
        """Return the initial state for `batch_size` streams (None: this module holds none)."""
        return None

    @property
    def stream_state(self) -> StreamState | None:
        return self._stream_state

    @property
    def is_streaming(self) -> bool:
        return self._stream_state is not None

    def _streaming_children(self) -> list[tuple[str, StreamingModule]]:
        # Cached while streaming: set_exec_mask runs every frame and named_modules is slow.
        cached = self.__dict__.get("_children_cache")
        if cached is not None:
            return cached
        return [(n, m) for n, m in self.named_modules() if isinstance(m, StreamingModule)]

    def start_streaming(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for _, m in self._streaming_children():
            if m._stream_state is not None:
                raise RuntimeError(f"{type(m).__name__} is already streaming")
            st = m.init_state(batch_size)
            m._stream_state = st if st is not None else _EmptyState.make(batch_size, m)
        self.__dict__["_children_cache"] = self._streaming_children()

    def stop_streaming(self) -> None:
        for _, m in self._streaming_children():
            m._stream_state = None
        self.__dict__.pop("_children_cache", None)

    @contextmanager
    def streaming(self, batch_size: int) -> Iterator[None]:
        """Stream with `batch_size` rows inside the block; state is dropped on exit."""
        self.start_streaming(batch_size)
        try:
            yield
        finally:
            self.stop_streaming()

    def _require_streaming(self) -> StreamState:
        if self._stream_state is None:
            raise RuntimeError(
                f"{type(self).__name__} is not streaming: use `with module.streaming(batch_size):`"
            )
        return self._stream_state

    def set_exec_mask(self, mask: torch.Tensor) -> None:
        """Choose which rows step on the next calls ([B] bool); the others keep their state."""
        st = self._require_streaming()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (st.batch_size,):
            raise ValueError(
                f"exec mask must have shape ({st.batch_size},), got {tuple(mask.shape)}"
            )
        for _, m in self._streaming_children():
            m._stream_state.exec_mask = mask.clone()

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Return the rows where `rows` [B] is True to their initial state (a session joins)."""
        st = self._require_streaming()
        rows = torch.as_tensor(rows, dtype=torch.bool)
        if rows.shape != (st.batch_size,):
            raise ValueError(f"rows must have shape ({st.batch_size},), got {tuple(rows.shape)}")
        for _, m in self._streaming_children():
            fresh = m.init_state(st.batch_size)
            if fresh is not None:
                m._stream_state.reset_rows(rows, fresh)

    def restream(self, rows: torch.Tensor, batch_size: int) -> None:
        """Go on streaming with `batch_size` rows: new row i continues old row rows[i], the
        rows after len(rows) start fresh, the other old rows end. Exec masks reset to all True.

        Why: a batched engine computes every row of its batch each step, so it keeps the batch
        as small as its sessions, restreaming when one joins or leaves.
        """
        self._require_streaming()
        rows = torch.as_tensor(rows, dtype=torch.long)
        if batch_size < max(1, rows.numel()):
            raise ValueError(f"cannot keep {rows.numel()} rows in a batch of {batch_size}")
        for _, m in self._streaming_children():
            fresh = m.init_state(batch_size)
            if fresh is None:
                fresh = _EmptyState.make(batch_size, m)
            m._stream_state = m._stream_state.moved_rows(rows, fresh)

    def get_state(self) -> dict[str, StreamState]:
        """Snapshot of every streaming state below this module (deep copies)."""
        self._require_streaming()
        return {name: m._stream_state.clone() for name, m in self._streaming_children()}

    def set_state(self, state: dict[str, StreamState]) -> None:
        """Restore a snapshot from `get_state` (deep-copied in, so it can be restored again)."""
        mods = dict(self._streaming_children())
        if set(mods) != set(state):
            missing = sorted(set(mods) - set(state))
            extra = sorted(set(state) - set(mods))
            raise ValueError(f"state does not match this module: missing {missing}, extra {extra}")
        for name, m in mods.items():
            m._stream_state = state[name].clone()

    def get_rows(self, rows: torch.Tensor) -> dict[str, StreamState]:
        """Snapshot of some batch rows only (e.g. one session of a batched engine)."""
        self._require_streaming()
        rows = torch.as_tensor(rows, dtype=torch.long)
        return {n: m._stream_state.select_rows(rows) for n, m in self._streaming_children()}

    def set_rows(self, rows: torch.Tensor, states: dict[str, StreamState]) -> None:
        """Overwrite batch rows `rows` with a snapshot of that many rows (e.g. from `get_rows`)."""
        self._require_streaming()
        mods = dict(self._streaming_children())
        if set(mods) != set(states):
            raise ValueError("state does not match this module's streaming layout")
        rows = torch.as_tensor(rows, dtype=torch.long)
        for name, m in mods.items():
            m._stream_state.assign_rows(rows, states[name])

    def save_rows(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Some rows' state as named tensors + plain fields ("module/field"), for a state file."""
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, Any] = {}
        for name, st in self.get_rows(rows).items():
            t, p = st.to_saved()
            tensors.update({f"{name}/{k}": v for k, v in t.items()})
            plain.update({f"{name}/{k}": v for k, v in p.items()})
        return tensors, plain

    def load_rows(
        self, rows: torch.Tensor, tensors: dict[str, torch.Tensor], plain: dict[str, Any]
    ) -> None:
        """Inverse of `save_rows` into rows `rows`. Everything is validated against this
        module's layout before any row changes; a mismatch is a ValueError."""
        template = self.get_rows(rows)
        staged = {}
        claimed: set[str] = set()
        for name, st in template.items():
            pre = f"{name}/"
            t = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
            p = {k[len(pre) :]: v for k, v in plain.items() if k.startswith(pre)}
            t = {k: v for k, v in t.items() if "/" not in k}
            p = {k: v for k, v in p.items() if "/" not in k}
            try:
                staged[name] = st.from_saved(t, p)
            except ValueError as e:
                raise ValueError(f"{name or 'root'}: {e}") from None
            claimed |= {pre + k for k in t} | {pre + k for k in p}
        extra = (set(tensors) | set(plain)) - claimed
        if extra:
            raise ValueError(f"saved state has entries this module lacks: {sorted(extra)[:5]}")
        self.set_rows(rows, staged)


@dataclasses.dataclass
class _EmptyState(StreamState):
    """State of a streaming container that holds no tensors itself (only an exec mask)."""

    @classmethod
    def make(cls, batch_size: int, module: Any) -> _EmptyState:
        return cls(batch_size=batch_size, exec_mask=torch.ones(batch_size, dtype=torch.bool))
