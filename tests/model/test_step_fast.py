"""The one-token streaming paths give the bits of the general ones (issue 12's step cost)."""

from __future__ import annotations

import pytest
import torch

from duplex.model.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, _taps_match_conv
from duplex.streamer.sampling import sample


def test_gdn_one_token_path_equals_general_path_bit_for_bit() -> None:
    if not _taps_match_conv(torch.device("cpu")):
        pytest.skip("this CPU's conv1d does not sum taps by fused multiply-adds")
    torch.manual_seed(0)
    layer = GatedDeltaNet(GatedDeltaNetConfig(d_model=32, n_heads=2, head_dim=16))
    with torch.no_grad():
        layer.conv_weight.normal_()
    state_fast = state_ref = layer.init_state(3)
    for _ in range(6):
        x = torch.randn(3, 1, 32)
        with torch.no_grad():
            y_fast, state_fast = layer(x, state_fast)
        # with gradients on, the layer takes its general path (projections, conv1d, kernel op)
        y_ref, state_ref = layer(x, state_ref)
        assert torch.equal(y_fast, y_ref.detach())
        assert torch.equal(state_fast.recurrent, state_ref.recurrent.detach())
        assert torch.equal(state_fast.conv, state_ref.conv.detach())


def test_gdn_one_token_path_keeps_masked_rows() -> None:
    torch.manual_seed(1)
    layer = GatedDeltaNet(GatedDeltaNetConfig(d_model=32, n_heads=2, head_dim=16))
    state = layer.init_state(2)
    with torch.no_grad():
        _, state = layer(torch.randn(2, 1, 32), state)
        state.exec_mask = torch.tensor([True, False])
        _, new = layer(torch.randn(2, 1, 32), state)
    assert not torch.equal(new.recurrent[0], state.recurrent[0])
    assert torch.equal(new.recurrent[1], state.recurrent[1])
    assert torch.equal(new.conv[1], state.conv[1])


def test_gdn_weight_change_rebuilds_the_fused_projection() -> None:
    torch.manual_seed(2)
    layer = GatedDeltaNet(GatedDeltaNetConfig(d_model=32, n_heads=2, head_dim=16))
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        before = layer(x)[0]
        layer.v_proj.weight.mul_(2.0)
        after = layer(x)[0]
    assert not torch.equal(before, after)
    assert torch.allclose(after, layer(x)[0].detach(), atol=1e-6)


def test_one_row_sample_equals_the_batched_draw() -> None:
    gen = torch.Generator().manual_seed(3)
    V = 40
    temps = torch.tensor([0.8, 0.0, 1.3, 0.5])
    ks = torch.tensor([5, 10, 0, 80])
    for _ in range(50):
        logits = torch.randn(4, V, generator=gen)
        u = torch.rand(4, V, generator=gen)
        batched = sample(logits, temps, ks, u)
        for r in range(4):
            one = sample(logits[r : r + 1], temps[r : r + 1], ks[r : r + 1], u[r : r + 1])
            assert int(one[0]) == int(batched[r])
