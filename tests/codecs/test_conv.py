"""Streaming primitives: streamed output equals offline output, and prefixes give prefixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duplex.codecs.conv import (
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingLSTM,
    StreamingSequential,
)


def _stream(module: nn.Module, x: torch.Tensor, step: int, chunk: int) -> torch.Tensor:
    """Feed x [B, C, T] in chunks of `chunk * step` samples through a streaming module."""
    outs = []
    with module.streaming(x.shape[0]):
        for s in range(0, x.shape[-1], chunk * step):
            outs.append(module(x[..., s : s + chunk * step]))
    return torch.cat(outs, dim=-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


@pytest.mark.parametrize("k,s,d", [(7, 1, 1), (3, 1, 4), (8, 4, 1), (4, 4, 1), (5, 2, 1)])
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_conv_stream_equals_offline(k: int, s: int, d: int, chunk: int) -> None:
    torch.manual_seed(k * 100 + s * 10 + d)
    conv = StreamingConv1d.from_conv1d(nn.Conv1d(3, 5, k, stride=s, dilation=d))
    x = torch.randn(2, 3, s * 21)
    off = conv(x)
    assert off.shape == (2, 5, 21)
    assert _rel(_stream(conv, x, s, chunk), off) < 1e-6


@pytest.mark.parametrize("k,s", [(8, 4), (4, 4), (16, 8), (3, 1)])
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_convtr_stream_equals_offline(k: int, s: int, chunk: int) -> None:
    torch.manual_seed(k + s)
    ct = nn.ConvTranspose1d(4, 3, k, stride=s)
    m = StreamingConvTranspose1d(ct, 3, k, s, bias=ct.bias)
    x = torch.randn(2, 4, 19)
    off = m(x)
    assert off.shape == (2, 3, 19 * s)
    assert _rel(_stream(m, x, 1, chunk), off) < 1e-6


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_lstm_stream_equals_offline(chunk: int) -> None:
    torch.manual_seed(0)
    m = StreamingLSTM(nn.LSTM(6, 6, 2), skip=True)
    x = torch.randn(3, 6, 23)
    assert _rel(_stream(m, x, 1, chunk), m(x)) < 1e-6


def test_stack_prefix_gives_prefix() -> None:
    torch.manual_seed(1)
    m = StreamingSequential(
        StreamingConv1d.from_conv1d(nn.Conv1d(1, 4, 8, stride=4)),
        StreamingLSTM(nn.LSTM(4, 4, 1)),
        StreamingConvTranspose1d(nn.ConvTranspose1d(4, 1, 8, stride=4), 1, 8, 4),
    )
    x = torch.randn(2, 1, 4 * 30)
    full = m(x)
    for n in (1, 5, 17):
        assert torch.allclose(m(x[..., : 4 * n]), full[..., : 4 * n], atol=1e-6)
    # changing the future leaves the past untouched
    y = x.clone()
    y[..., 4 * 10 :] = torch.randn_like(y[..., 4 * 10 :])
    assert torch.allclose(m(y)[..., : 4 * 10], full[..., : 4 * 10], atol=1e-6)
    assert not torch.allclose(m(y), full)


def test_exec_mask_keeps_state() -> None:
    torch.manual_seed(2)
    conv = StreamingConv1d.from_conv1d(nn.Conv1d(1, 2, 5, stride=1))
    x = torch.randn(2, 1, 12)
    with conv.streaming(2):
        conv(x[..., :4])
        conv.set_exec_mask(torch.tensor([True, False]))
        conv(torch.randn(2, 1, 4))
        conv.set_exec_mask(torch.tensor([True, True]))
        out = conv(x[..., 4:8])
    # row 1 skipped the middle chunk: it continues as if that chunk never came
    ref = conv(torch.cat([x[1:, :, :4], x[1:, :, 4:8]], dim=-1))[..., 4:]
    assert torch.allclose(out[1:], ref, atol=1e-6)


def test_bad_length_raises() -> None:
    conv = StreamingConv1d.from_conv1d(nn.Conv1d(1, 2, 8, stride=4))
    with pytest.raises(ValueError, match="multiple of stride"):
        conv(torch.randn(1, 1, 10))
    with pytest.raises(ValueError, match="padding=0"):
        StreamingConv1d.from_conv1d(nn.Conv1d(1, 2, 3, padding=1))


@pytest.mark.parametrize("chunk", [1, 3])
def test_gemm_paths_equal_module_paths(chunk: int) -> None:
    # weight-normed convs (as in EnCodec): the GEMM path must use the hook-computed weights
    torch.manual_seed(3)
    wn = torch.nn.utils.weight_norm
    conv = wn(nn.Conv1d(3, 4, 5, stride=2, dilation=1))
    ct = wn(nn.ConvTranspose1d(4, 2, 6, stride=2))
    with torch.no_grad():
        conv.weight_g.mul_(1.7)
        ct.weight_g.mul_(0.6)
    plain = StreamingSequential(
        StreamingConv1d(conv, 3, 5, 2), StreamingConvTranspose1d(ct, 2, 6, 2, bias=ct.bias)
    ).eval()
    fast = StreamingSequential(
        StreamingConv1d(conv, 3, 5, 2, gemm=conv),
        StreamingConvTranspose1d(ct, 2, 6, 2, bias=ct.bias, gemm=ct),
    ).eval()
    x = torch.randn(2, 3, 2 * 17)
    with torch.no_grad():
        off = plain(x)
        a = _stream(plain, x, 2, chunk)
        b = _stream(fast, x, 2, chunk)
    assert _rel(a, off) < 1e-6
    assert _rel(b, off) < 1e-6


@pytest.mark.parametrize("kind", ["conv", "convtr", "lstm"])
def test_each_primitive_prefix_gives_prefix(kind: str) -> None:
    torch.manual_seed(4)
    if kind == "conv":
        m: nn.Module = StreamingConv1d.from_conv1d(nn.Conv1d(2, 3, 6, stride=2, dilation=1))
        step_in, step_out = 2, 1
    elif kind == "convtr":
        ct = nn.ConvTranspose1d(2, 3, 6, stride=2)
        m = StreamingConvTranspose1d(ct, 3, 6, 2, bias=ct.bias)
        step_in, step_out = 1, 2
    else:
        m = StreamingLSTM(nn.LSTM(2, 2, 2))
        step_in, step_out = 1, 1
    x = torch.randn(2, 2, step_in * 20)
    full = m(x)
    for n in (1, 6, 13):
        assert torch.allclose(m(x[..., : step_in * n]), full[..., : step_out * n], atol=1e-6)
