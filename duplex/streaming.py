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

    def _streaming_children(self) -> Iterator[tuple[str, StreamingModule]]:
        for name, m in self.named_modules():
            if isinstance(m, StreamingModule):
                yield name, m

    def start_streaming(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for _, m in self._streaming_children():
            if m._stream_state is not None:
                raise RuntimeError(f"{type(m).__name__} is already streaming")
            st = m.init_state(batch_size)
            m._stream_state = st if st is not None else _EmptyState.make(batch_size, m)

    def stop_streaming(self) -> None:
        for _, m in self._streaming_children():
            m._stream_state = None

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
        return select_rows(self.get_state(), torch.as_tensor(rows, dtype=torch.long))

    def set_rows(self, rows: torch.Tensor, states: dict[str, StreamState]) -> None:
        """Overwrite batch rows `rows` with a snapshot of that many rows (e.g. from `get_rows`)."""
        self._require_streaming()
        live = {name: m._stream_state for name, m in self._streaming_children()}
        if set(live) != set(states):
            raise ValueError("state does not match this module's streaming layout")
        assign_rows(live, torch.as_tensor(rows, dtype=torch.long), states)


@dataclasses.dataclass
class _EmptyState(StreamState):
    """State of a streaming container that holds no tensors itself (only an exec mask)."""

    @classmethod
    def make(cls, batch_size: int, module: Any) -> _EmptyState:
        return cls(batch_size=batch_size, exec_mask=torch.ones(batch_size, dtype=torch.bool))


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def flatten_states(
    states: dict[str, StreamState],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Turn a `get_state()` snapshot into named tensors plus JSON-able plain fields.

    Tensors are named "module/field"; exec masks are not saved (a restored session runs).
    """
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for mod, st in states.items():
        for f in dataclasses.fields(st):
            if f.name == "exec_mask":
                continue
            v = getattr(st, f.name)
            key = f"{mod}/{f.name}"
            if isinstance(v, torch.Tensor):
                tensors[key] = v
            elif _plain(v):
                plain[key] = v
            else:
                raise TypeError(f"state field {key} of type {type(v).__name__} cannot be saved")
    return tensors, plain


def unflatten_states(
    template: dict[str, StreamState],
    tensors: dict[str, torch.Tensor],
    plain: dict[str, Any],
) -> dict[str, StreamState]:
    """Inverse of `flatten_states`, checked field by field against a live `template`.

    Raises ValueError on any missing, extra or mis-shaped entry, before anything is changed.
    """
    out: dict[str, StreamState] = {}
    seen: set[str] = set()
    for mod, st in template.items():
        new = st.clone()
        for f in dataclasses.fields(st):
            if f.name in ("exec_mask", "batch_size"):
                continue
            key = f"{mod}/{f.name}"
            cur = getattr(st, f.name)
            if isinstance(cur, torch.Tensor):
                if key not in tensors:
                    raise ValueError(f"saved state lacks tensor {key}")
                t = tensors[key]
                if tuple(t.shape) != tuple(cur.shape) or t.dtype != cur.dtype:
                    raise ValueError(
                        f"saved tensor {key} is {tuple(t.shape)} {t.dtype}, "
                        f"expected {tuple(cur.shape)} {cur.dtype}"
                    )
                setattr(new, f.name, t.to(cur.device).clone())
            else:
                if key not in plain:
                    raise ValueError(f"saved state lacks field {key}")
                setattr(new, f.name, copy.deepcopy(plain[key]))
            seen.add(key)
        out[mod] = new
    extra = (set(tensors) | set(plain)) - seen - {k for k in plain if k.endswith("/batch_size")}
    if extra:
        raise ValueError(f"saved state has entries this module lacks: {sorted(extra)[:5]}")
    return out


def select_rows(states: dict[str, StreamState], rows: torch.Tensor) -> dict[str, StreamState]:
    """The batch rows `rows` (index tensor) of every state: a smaller batch of sessions."""
    out = {}
    for mod, st in states.items():
        new = st.clone()
        for f in dataclasses.fields(st):
            v = getattr(st, f.name)
            if isinstance(v, torch.Tensor):
                setattr(new, f.name, v[rows.to(v.device)].clone())
        new.batch_size = int(rows.numel())
        out[mod] = new
    return out


def assign_rows(
    dst: dict[str, StreamState], rows: torch.Tensor, src: dict[str, StreamState]
) -> None:
    """Write the states of a smaller batch `src` into rows `rows` of `dst`, in place."""
    for mod, st in dst.items():
        if mod not in src:
            raise ValueError(f"source state lacks module {mod!r}")
        for name, v in st.tensor_fields():
            s = getattr(src[mod], name)
            v[rows.to(v.device)] = s.to(v.device, v.dtype)
