"""Streaming building blocks shared by both codecs: causal conv, transposed conv, LSTM.

Each wraps an existing module that computes the plain (stateless) operation, so the same weights
serve offline and streaming use, and EnCodec's own modules can be wrapped without copying them.

Streaming rules (Moshi-style):
- A causal convolution keeps the last `k_eff - stride` input samples (k_eff = (k - 1) * dilation
  + 1) and prepends them to the next input. Offline, those samples are zeros at the start, so
  offline output equals streamed output exactly, whatever the chunking.
- A transposed convolution keeps the last `k - stride` output samples (a partial sum still waiting
  for the next input's contribution) and adds them to the next output. Its bias is added only when
  a sample is emitted, so it is counted once.
- An LSTM carries (h, c).
Rows whose exec mask is False compute, then keep their old state (`keep_masked`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duplex.streaming import StreamingModule, StreamState, keep_masked


def conv1d_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    dilation: int = 1,
) -> torch.Tensor:
    """Unpadded 1-d convolution as one matrix product (im2col).

    Why: on a CPU, PyTorch's convolution falls back to slow generic kernels for the short inputs
    of frame-by-frame streaming (a few time steps), several times slower than this product.
    x [B, C_in, L], weight [C_out, C_in, k] -> [B, C_out, (L - k_eff) // stride + 1].
    """
    c_out, c_in, k = weight.shape
    k_eff = (k - 1) * dilation + 1
    # [B, C_in, T, k_eff] -> taps [B, C_in, T, k] -> [B, T, C_in * k]
    cols = x.unfold(-1, k_eff, stride)[..., ::dilation]
    B, _, T, _ = cols.shape
    cols = cols.permute(0, 2, 1, 3).reshape(B, T, c_in * k)
    # [B, T, C_out] -> [B, C_out, T]
    y = cols @ weight.reshape(c_out, c_in * k).t()
    if bias is not None:
        y = y + bias
    return y.transpose(1, 2)


class FastConv1d(nn.Conv1d):
    """nn.Conv1d (padding 0, groups 1) that runs as a matrix product in eval mode.

    Training keeps PyTorch's convolution (fast for long inputs and backward); evaluation, where
    streaming feeds a few steps at a time, uses `conv1d_gemm`. Same parameters, same state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.groups != 1 or self.padding not in (0, (0,)):
            return super().forward(x)
        return conv1d_gemm(x, self.weight, self.bias, self.stride[0], self.dilation[0])


@dataclass
class ConvState(StreamState):
    """Input history of a causal convolution: [B, C_in, k_eff - stride]."""

    history: torch.Tensor


class StreamingConv1d(StreamingModule):
    """Causal 1-d convolution around `conv`, a module computing an unpadded convolution.

    `gemm`, when given, is the plain nn.Conv1d inside `conv` (e.g. under a weight-norm hook);
    streaming in eval mode then computes it as a matrix product, which is several times faster on
    a CPU for the few time steps of a frame.

    Input length must be a multiple of `stride`; output length is input length // stride.
    """

    def __init__(
        self,
        conv: nn.Module,
        in_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        gemm: nn.Conv1d | None = None,
    ) -> None:
        super().__init__()
        self.conv = conv
        # Optional: the plain nn.Conv1d inside `conv`, run as a matrix product when streaming in
        # eval mode (short inputs; see conv1d_gemm). Its output must equal `conv`'s.
        self.gemm = gemm
        self._weight: torch.Tensor | None = None
        self.in_channels = in_channels
        self.stride = stride
        self.k_eff = (kernel_size - 1) * dilation + 1
        if self.k_eff < stride:
            raise ValueError(f"kernel {self.k_eff} shorter than stride {stride} is not supported")
        self.pad = self.k_eff - stride

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d) -> StreamingConv1d:
        """Wrap an `nn.Conv1d` created with padding=0."""
        if conv.padding not in (0, (0,)):
            raise ValueError("the wrapped Conv1d must have padding=0: the wrapper pads causally")
        return cls(conv, conv.in_channels, conv.kernel_size[0], conv.stride[0], conv.dilation[0])

    def init_state(self, batch_size: int) -> ConvState:
        self._weight = None
        p = next(iter(self.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        dt = p.dtype if p is not None else torch.float32
        return ConvState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            history=torch.zeros(batch_size, self.in_channels, self.pad, device=dev, dtype=dt),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C_in, T] -> [B, C_out, T // stride]
        if x.shape[-1] % self.stride:
            raise ValueError(
                f"input length {x.shape[-1]} is not a multiple of stride {self.stride}"
            )
        st = self.stream_state
        if st is None:
            return self.conv(F.pad(x, (self.pad, 0)))
        assert isinstance(st, ConvState)
        # [B, C_in, pad + T]
        buf = torch.cat([st.history.to(x.dtype), x], dim=-1)
        if self.gemm is not None and not self.training:
            c = self.gemm
            if self._weight is None:
                # forward pre-hooks compute parametrised weights (EnCodec's weight norm); weights
                # do not change in eval mode, so once per streaming session is enough
                for hook in c._forward_pre_hooks.values():
                    hook(c, (buf,))
                self._weight = c.weight.detach().clone()
            y = conv1d_gemm(buf, self._weight, c.bias, self.stride, c.dilation[0])
        else:
            y = self.conv(buf)
        if self.pad:
            st.history = keep_masked(buf[..., buf.shape[-1] - self.pad :], st.history, st.exec_mask)
        return y


@dataclass
class ConvTrState(StreamState):
    """Partial output of a transposed convolution not yet complete: [B, C_out, k - stride]."""

    tail: torch.Tensor


class StreamingConvTranspose1d(StreamingModule):
    """Causal transposed convolution around `convtr` (a module computing the full output).

    `convtr(x)` for x [B, C_in, T] must return [B, C_out, (T - 1) * stride + kernel_size],
    including `bias` if given (it is subtracted from the overlapping parts and added once at
    emission). Output length is T * stride: the last `kernel_size - stride` samples wait in the
    state for the next input (offline, they are dropped, as EnCodec's causal trim does).
    """

    def __init__(
        self,
        convtr: nn.Module,
        out_channels: int,
        kernel_size: int,
        stride: int,
        bias: torch.Tensor | None = None,
        gemm: nn.ConvTranspose1d | None = None,
    ) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel {kernel_size} shorter than stride {stride} is not supported")
        self.convtr = convtr
        # Optional: the plain nn.ConvTranspose1d inside `convtr`, run as a matrix product plus
        # overlap-add when streaming in eval mode (see StreamingConv1d.gemm).
        self.gemm = gemm
        self._weight: torch.Tensor | None = None
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self._bias_ref = [bias]

    @property
    def bias(self) -> torch.Tensor | None:
        return self._bias_ref[0]

    def init_state(self, batch_size: int) -> ConvTrState:
        self._weight = None
        p = next(iter(self.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        dt = p.dtype if p is not None else torch.float32
        n = self.kernel_size - self.stride
        return ConvTrState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            tail=torch.zeros(batch_size, self.out_channels, n, device=dev, dtype=dt),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C_in, T] -> [B, C_out, T * stride]
        T = x.shape[-1]
        n_out = T * self.stride
        st = self.stream_state
        if st is None:
            return self.convtr(x)[..., :n_out]
        assert isinstance(st, ConvTrState)
        b = self.bias
        if self.gemm is not None and not self.training:
            y = self._gemm_no_bias(x)
        else:
            y = self.convtr(x)
            if b is not None:
                y = y - b.view(1, -1, 1)
        n = self.kernel_size - self.stride
        if n:
            y = torch.cat([y[..., :n] + st.tail.to(y.dtype), y[..., n:]], dim=-1)
            st.tail = keep_masked(y[..., n_out:], st.tail, st.exec_mask)
        out = y[..., :n_out]
        if b is not None:
            out = out + b.view(1, -1, 1)
        return out

    def _gemm_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        c = self.gemm
        assert c is not None
        if self._weight is None:
            # parametrised weights (weight norm) are computed by forward pre-hooks; fixed in eval
            for hook in c._forward_pre_hooks.values():
                hook(c, (x,))
            self._weight = c.weight.detach().clone()
        w = self._weight
        c_in, c_out, k = w.shape
        T = x.shape[-1]
        # [B, T, C_in] @ [C_in, C_out * k] -> [B, T, C_out * k] -> [B, C_out * k, T]
        cols = (x.transpose(1, 2) @ w.reshape(c_in, c_out * k)).transpose(1, 2)
        L = (T - 1) * self.stride + k
        # overlap-add the T pieces of length k at hop `stride` -> [B, C_out, L]
        out = F.fold(cols, output_size=(1, L), kernel_size=(1, k), stride=(1, self.stride))
        return out[:, :, 0]


@dataclass
class LSTMState(StreamState):
    """Carried LSTM state, batch-first: h, c [B, num_layers, H]."""

    h: torch.Tensor
    c: torch.Tensor


class StreamingLSTM(StreamingModule):
    """Runs `lstm` (an `nn.LSTM`, time-first) on [B, C, T] input, carrying (h, c) when streaming.

    With `skip`, the input is added to the output (EnCodec's SLSTM does this).
    """

    def __init__(self, lstm: nn.LSTM, skip: bool = True) -> None:
        super().__init__()
        if lstm.batch_first or lstm.bidirectional:
            raise ValueError("StreamingLSTM needs a time-first, unidirectional nn.LSTM")
        self.lstm = lstm
        self.skip = skip

    def init_state(self, batch_size: int) -> LSTMState:
        p = next(iter(self.lstm.parameters()))
        shape = (batch_size, self.lstm.num_layers, self.lstm.hidden_size)
        return LSTMState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            h=torch.zeros(shape, device=p.device, dtype=p.dtype),
            c=torch.zeros(shape, device=p.device, dtype=p.dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, T] -> [T, B, C]
        xt = x.permute(2, 0, 1)
        st = self.stream_state
        if st is None:
            y, _ = self.lstm(xt)
        else:
            assert isinstance(st, LSTMState)
            # state [B, L, H] -> [L, B, H]
            hc = (st.h.transpose(0, 1).contiguous(), st.c.transpose(0, 1).contiguous())
            # oneDNN's LSTM costs ~10 ms per call on a single time step (it re-lays out the
            # weights); PyTorch's native kernel takes well under 1 ms there.
            with warnings.catch_warnings():
                # the flags context warns about TF32 on Intel GPUs, irrelevant here
                warnings.simplefilter("ignore", UserWarning)
                with torch.backends.mkldnn.flags(enabled=False):
                    y, (h, c) = self.lstm(xt, hc)
            st.h = keep_masked(h.transpose(0, 1), st.h, st.exec_mask)
            st.c = keep_masked(c.transpose(0, 1), st.c, st.exec_mask)
        if self.skip:
            y = y + xt
        # [T, B, C] -> [B, C, T]
        return y.permute(1, 2, 0)


class StreamingSequential(StreamingModule):
    """Applies its children in order; a container so `streaming()` reaches them all."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
