"""The shared streaming base: state lifecycle, exec masks, row resets, snapshot/restore."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from duplex.streaming import StreamingModule, StreamState, keep_masked


@dataclasses.dataclass
class _SumState(StreamState):
    total: torch.Tensor


class RunningSum(StreamingModule):
    """Streams a cumulative sum over time: the simplest stateful module."""

    def init_state(self, batch_size: int) -> _SumState:
        return _SumState(
            batch_size, torch.ones(batch_size, dtype=torch.bool), torch.zeros(batch_size, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, T, 3]
        out = x.cumsum(1)
        st = self.stream_state
        if st is None:
            return out
        out = out + st.total[:, None]
        st.total = keep_masked(out[:, -1], st.total, st.exec_mask)
        return out


class Pair(StreamingModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = RunningSum()
        self.b = RunningSum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_streamed_equals_offline_in_chunks() -> None:
    m = Pair()
    x = torch.randn(2, 20, 3)
    ref = m(x)
    for chunk in (1, 3, 7):
        with m.streaming(2):
            got = torch.cat([m(x[:, i : i + chunk]) for i in range(0, 20, chunk)], 1)
        torch.testing.assert_close(got, ref)
    assert not m.is_streaming and not m.a.is_streaming


def test_exec_mask_freezes_rows() -> None:
    m = Pair()
    x = torch.randn(2, 4, 3)
    with m.streaming(2):
        m(x)
        before = m.get_state()
        m.set_exec_mask(torch.tensor([True, False]))
        m(x)
        after = m.get_state()
    assert torch.equal(after["a"].total[1], before["a"].total[1])
    assert not torch.equal(after["a"].total[0], before["a"].total[0])


def test_snapshot_restore_and_reset_rows() -> None:
    m = Pair()
    x = torch.randn(2, 5, 3)
    with m.streaming(2):
        m(x)
        snap = m.get_state()
        y1 = m(x)
        m.set_state(snap)
        y2 = m(x)
        torch.testing.assert_close(y1, y2)
        m.reset_rows(torch.tensor([False, True]))
        st = m.get_state()
        assert torch.count_nonzero(st["a"].total[1]) == 0
        assert torch.count_nonzero(st["a"].total[0]) > 0


def test_misuse_is_a_clear_error() -> None:
    m = Pair()
    with pytest.raises(RuntimeError, match="not streaming"):
        m.get_state()
    with m.streaming(2):
        with pytest.raises(RuntimeError, match="already streaming"):
            m.start_streaming(2)
        with pytest.raises(ValueError, match="exec mask"):
            m.set_exec_mask(torch.ones(3, dtype=torch.bool))
        with pytest.raises(ValueError, match="does not match"):
            m.set_state({"a": m.a.stream_state})
    with pytest.raises(ValueError):
        m.start_streaming(0)
