"""The Gated DeltaNet layer: streaming equals offline, causality, exec masks, snapshot/restore."""

from __future__ import annotations

import pytest
import torch

from duplex.model.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetState
from tests.kernels.gdn_helpers import single_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _layer(dtype=torch.float64, seed=0, **kw) -> GatedDeltaNet:
    torch.manual_seed(seed)
    cfg = GatedDeltaNetConfig(d_model=40, n_heads=2, head_dim=16, **kw)
    return GatedDeltaNet(cfg).to(dtype)


def _x(B, T, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 40, generator=gen, dtype=torch.float64).to(dtype)


def _close(a, b, tol):
    err = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    assert err <= tol, f"relative RMS error {err} > {tol}"


def test_shapes_and_state():
    layer = _layer(torch.float32)
    y, st = layer(_x(3, 10, torch.float32))
    assert y.shape == (3, 10, 40)
    assert isinstance(st, GatedDeltaNetState)
    assert st.recurrent.shape == (3, 2, 16, 16) and st.recurrent.dtype == torch.float32
    assert st.conv.shape == (3, 3, 3 * 32)
    assert layer.state_bytes(1) == (2 * 16 * 16 + 3 * 96) * 4


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_streaming_equals_offline(chunk):
    layer = _layer()
    x = _x(2, 150)
    y_ref, st_ref = layer(x)
    with layer.streaming(2):
        ys = [layer(x[:, i : i + chunk])[0] for i in range(0, 150, chunk)]
        st = layer.stream_state
    _close(torch.cat(ys, 1), y_ref, 1e-10)
    _close(st.recurrent, st_ref.recurrent, 1e-10)
    _close(st.conv, st_ref.conv, 1e-12)


def test_streaming_equals_offline_float32():
    layer = _layer(torch.float32)
    x = _x(2, 100, torch.float32)
    y_ref, _ = layer(x)
    with layer.streaming(2):
        ys = [layer(x[:, i : i + 1])[0] for i in range(100)]
    _close(torch.cat(ys, 1), y_ref, 1e-5)


@pytest.mark.parametrize("prefill", [1, 5, 64, 97])
def test_prefill_then_steps(prefill):
    layer = _layer()
    x = _x(1, 120)
    y_ref, _ = layer(x)
    y1, st = layer(x[:, :prefill])
    ys = [y1]
    for t in range(prefill, 120):
        y_t, st = layer(x[:, t : t + 1], st)
        ys.append(y_t)
    _close(torch.cat(ys, 1), y_ref, 1e-10)


def test_explicit_state_is_not_modified():
    layer = _layer()
    _, st = layer(_x(1, 20))
    saved = st.clone()
    layer(_x(1, 5, seed=2), st)
    assert torch.equal(st.recurrent, saved.recurrent) and torch.equal(st.conv, saved.conv)


def test_causality():
    """Changing future inputs never changes past outputs."""
    layer = _layer()
    x = _x(1, 90)
    x2 = x.clone()
    x2[:, 60:] = _x(1, 30, seed=9)
    y, _ = layer(x)
    y2, _ = layer(x2)
    assert torch.equal(y[:, :60], y2[:, :60])
    assert not torch.allclose(y[:, 60:], y2[:, 60:])
    y_prefix, _ = layer(x[:, :60])
    _close(y_prefix, y[:, :60], 1e-12)


def test_exec_mask_rows_evolve_independently():
    """Each row, stepped only where its mask is True, matches running that row alone."""
    layer = _layer()
    B, T = 3, 40
    x = _x(B, T)
    gen = torch.Generator().manual_seed(5)
    masks = torch.rand(T, B, generator=gen) < 0.6
    masks[:, 2] = True
    masks[3, 0] = False
    with layer.streaming(B):
        outs = []
        for t in range(T):
            layer.set_exec_mask(masks[t])
            outs.append(layer(x[:, t : t + 1])[0])
        final = layer.stream_state
    for b in range(B):
        steps = masks[:, b].nonzero().flatten()
        y_solo, st_solo = layer(x[b : b + 1, steps])
        y_batched = torch.cat([outs[t][b : b + 1] for t in steps.tolist()], 1)
        _close(y_batched, y_solo, 1e-10)
        _close(final.recurrent[b : b + 1], st_solo.recurrent, 1e-10)
        _close(final.conv[b : b + 1], st_solo.conv, 1e-12)


def test_masked_rows_keep_state_exactly():
    layer = _layer()
    with layer.streaming(2):
        layer(_x(2, 9))
        before = layer.stream_state.clone()
        layer.set_exec_mask(torch.tensor([False, True]))
        layer(_x(2, 3, seed=4))
        after = layer.stream_state
    assert torch.equal(after.recurrent[0], before.recurrent[0])
    assert torch.equal(after.conv[0], before.conv[0])
    assert not torch.equal(after.recurrent[1], before.recurrent[1])


def test_snapshot_restore_continues_identically():
    layer = _layer()
    x = _x(2, 50)
    with layer.streaming(2):
        layer(x[:, :20])
        snap = layer.get_state()
        y_a = torch.cat([layer(x[:, t : t + 1])[0] for t in range(20, 50)], 1)
        layer.set_state(snap)
        y_b = torch.cat([layer(x[:, t : t + 1])[0] for t in range(20, 50)], 1)
        layer.set_state(snap)
        y_c, _ = layer(x[:, 20:])
    assert torch.equal(y_a, y_b)
    _close(y_c, y_a, 1e-10)


def test_reset_rows_returns_a_row_to_start():
    layer = _layer()
    x = _x(2, 30)
    with layer.streaming(2):
        layer(x[:, :10])
        layer.reset_rows(torch.tensor([True, False]))
        y, _ = layer(x[:, 10:])
    y_fresh, _ = layer(x[:1, 10:])
    y_cont, _ = layer(x[1:])
    _close(y[:1], y_fresh, 1e-10)
    _close(y[1:], y_cont[:, 10:], 1e-10)


def test_gradients_reach_every_parameter():
    layer = _layer(torch.float32)
    y, st = layer(_x(2, 70, torch.float32))
    (y.pow(2).mean() + st.recurrent.pow(2).mean()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_state_size_does_not_grow():
    layer = _layer(torch.float32)
    _, st_short = layer(_x(1, 3, torch.float32))
    _, st_long = layer(_x(1, 500, torch.float32))
    assert st_short.recurrent.shape == st_long.recurrent.shape
    assert st_short.conv.shape == st_long.conv.shape


def test_bad_inputs():
    layer = _layer()
    with pytest.raises(ValueError, match="x"):
        layer(torch.zeros(2, 5, 41, dtype=torch.float64))
    _, st = layer(_x(2, 4))
    with pytest.raises(ValueError, match="batch size"):
        layer(_x(3, 4), st)
    with pytest.raises(ValueError, match="head_dim"):
        GatedDeltaNetConfig(d_model=8, head_dim=0)
