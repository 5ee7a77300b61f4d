"""The Gated DeltaNet layer: the fixed-state mixer of the duplex model.

Per head the layer keeps a K x V matrix state updated by the gated delta rule (see
duplex.kernels). Around the op: linear projections for q, k, v, the log decay g and the write
strength beta; a short causal depthwise convolution on q, k and v (local context before the
state sees a token); SiLU then L2 normalisation of q and k (keeps the delta rule a contraction,
so the state cannot blow up); a per-head RMSNorm on the output gated by SiLU(x W_gate); an output
projection. The decay follows Mamba-2: g = -exp(A_log) * softplus(x W_a + dt_bias), so g <= 0.

The same layer trains in parallel (chunked kernel, any T) and streams one token at a time with a
state whose size never grows: `forward(x, state)` returns the next state, and inside
`with layer.streaming(B):` it reads and updates `layer.stream_state`, keeping rows whose exec mask
is False untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duplex.kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from duplex.kernels.gated_delta.fused_recurrent import step_heads_first
from duplex.model.tensor_cache import derived
from duplex.streaming import StreamingModule, StreamState, keep_masked


@dataclass
class GatedDeltaNetConfig:
    """Sizes of one Gated DeltaNet layer (K = V = head_dim)."""

    d_model: int
    n_heads: int = 4
    head_dim: int = 64
    conv_size: int = 4
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "head_dim", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")


@dataclass
class GatedDeltaNetState(StreamState):
    """What the layer carries between calls.

    recurrent: [B, H, K, V] the delta-rule state (float32, float64 for a float64 layer).
    conv: [B, conv_size - 1, C] the last conv_size - 1 projected q|k|v inputs (C = 2HK + HV).
    """

    recurrent: torch.Tensor
    conv: torch.Tensor


class GatedDeltaNet(StreamingModule):
    """Multi-head Gated DeltaNet mixer: x [B, T, d_model] -> y [B, T, d_model]."""

    def __init__(self, cfg: GatedDeltaNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, D = cfg.n_heads, cfg.head_dim
        self.key_dim = H * D
        self.value_dim = H * D
        self.q_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        self.a_proj = nn.Linear(cfg.d_model, H, bias=False)
        self.b_proj = nn.Linear(cfg.d_model, H, bias=False)
        self.gate_proj = nn.Linear(cfg.d_model, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        channels = 2 * self.key_dim + self.value_dim
        # Depthwise causal conv over the concatenated q|k|v channels: weight [C, conv_size].
        self.conv_weight = nn.Parameter(torch.empty(channels, cfg.conv_size))
        # Per-head decay rate A in [1, 16] and time-step bias (Mamba-2 initialisation).
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.ones(D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise: decays spread over time scales, conv close to a short average."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.gate_proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.o_proj.weight, gain=2**-2.5)
        bound = 1.0 / math.sqrt(self.cfg.conv_size)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            dt_min, dt_max = 1e-3, 1e-1
            dt = torch.exp(
                torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=1e-4)
            # inverse of softplus, so softplus(dt_bias) = dt at initialisation
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        nn.init.ones_(self.norm_weight)

    def state_bytes(self, batch_size: int = 1) -> int:
        """Bytes of streaming state for `batch_size` rows (constant in context length)."""
        st = self.init_state(batch_size)
        return sum(t.numel() * t.element_size() for _, t in st.tensor_fields())

    def init_state(self, batch_size: int) -> GatedDeltaNetState:
        """Zero state: empty conv history, zero recurrent state."""
        w = self.q_proj.weight
        H, D = self.cfg.n_heads, self.cfg.head_dim
        state_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return GatedDeltaNetState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            recurrent=torch.zeros(batch_size, H, D, D, dtype=state_dtype, device=w.device),
            conv=torch.zeros(
                batch_size,
                self.cfg.conv_size - 1,
                self.conv_weight.shape[0],
                dtype=w.dtype,
                device=w.device,
            ),
        )

    def _check_state(self, state: GatedDeltaNetState, B: int) -> None:
        if not isinstance(state, GatedDeltaNetState):
            raise ValueError(f"state must be a GatedDeltaNetState, got {type(state).__name__}")
        if state.batch_size != B:
            raise ValueError(f"state has batch size {state.batch_size}, x has {B}")

    def forward(
        self, x: torch.Tensor, state: GatedDeltaNetState | None = None
    ) -> tuple[torch.Tensor, GatedDeltaNetState]:
        """Mix x [B, T, d_model] -> (y [B, T, d_model], next state).

        With `state` given, continue from it (the argument is not modified). Inside
        `layer.streaming(B)` with no `state`, read and update `layer.stream_state`. Otherwise start
        from zeros. Rows whose exec_mask is False get outputs but keep their old state.
        """
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"x must be [B, T, {self.cfg.d_model}], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        streaming = state is None and self.is_streaming
        if streaming:
            state = self._require_streaming()
        if state is None:
            state = self.init_state(B)
        self._check_state(state, B)
        H, D = self.cfg.n_heads, self.cfg.head_dim
        if T == 1 and self._fast_ok(x, state):
            return self._step1(x, state, streaming)

        # Short causal depthwise conv over [history | new] projected inputs.
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        # qkv: [B, T, C]; full: [B, conv_size - 1 + T, C]
        full = torch.cat([state.conv.to(qkv.dtype), qkv], dim=1)
        conv_out = F.conv1d(
            full.transpose(1, 2), self.conv_weight[:, None, :], groups=self.conv_weight.shape[0]
        ).transpose(1, 2)
        conv_out = F.silu(conv_out)
        new_conv = full[:, full.shape[1] - (self.cfg.conv_size - 1) :]
        q, k, v = conv_out.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # q, k, v: [B, T, H, D]
        # Under autocast the norm runs in float32 while v stays in the autocast dtype; the kernels
        # take one dtype, so q and k follow v.
        q = F.normalize(q.reshape(B, T, H, D), p=2, dim=-1, eps=1e-6).to(v.dtype)
        k = F.normalize(k.reshape(B, T, H, D), p=2, dim=-1, eps=1e-6).to(v.dtype)
        v = v.reshape(B, T, H, D)
        # g: [B, T, H] (<= 0); beta: [B, T, H] in (0, 1)
        gd = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = -self.A_log.to(gd).exp() * F.softplus(self.a_proj(x).to(gd) + self.dt_bias.to(gd))
        beta = torch.sigmoid(self.b_proj(x).to(gd))
        op = fused_recurrent_gated_delta_rule if T <= 2 else chunk_gated_delta_rule
        o, new_rec = op(q, k, v, g, beta, initial_state=state.recurrent, output_final_state=True)
        # o: [B, T, H, D] -> per-head RMSNorm, gated by SiLU(x W_gate)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * self.norm_weight
        o = o.reshape(B, T, self.value_dim) * F.silu(self.gate_proj(x))
        y = self.o_proj(o)

        mask = state.exec_mask
        new_state = GatedDeltaNetState(
            batch_size=B,
            exec_mask=mask.clone(),
            recurrent=keep_masked(new_rec.to(state.recurrent.dtype), state.recurrent, mask),
            conv=keep_masked(new_conv.to(state.conv.dtype), state.conv, mask),
        )
        if streaming:
            self._stream_state = new_state
        return y, new_state

    # The one-token form below computes what `forward` does, value for value, with fewer ops:
    # per-op overhead, not arithmetic, is the cost of a step at batch 1 (issue 12).

    def _fast_ok(self, x: torch.Tensor, state: GatedDeltaNetState) -> bool:
        return (
            not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and state.conv.dtype == torch.float32
            and state.recurrent.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
            and self.cfg.conv_size > 1
            and _taps_match_conv(x.device)
        )

    def _step_weights(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """(the six input projections as one [C + 2H + HV, d] weight, the S conv taps [C],
        -exp(A_log)), rebuilt whenever a parameter changes (its version or storage)."""
        ps = (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.gate_proj)
        ws = [lin.weight for lin in ps] + [self.conv_weight, self.A_log]

        def make() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
            w_in = torch.cat(ws[:6]).detach()
            taps = self.conv_weight.detach().T.contiguous().unbind(0)
            return w_in, taps, -self.A_log.detach().exp()

        return derived(self, ws, make)

    def _step1(
        self, x: torch.Tensor, state: GatedDeltaNetState, streaming: bool
    ) -> tuple[torch.Tensor, GatedDeltaNetState]:
        """One token x [B, 1, d] without gradients, float32."""
        B = x.shape[0]
        H, D = self.cfg.n_heads, self.cfg.head_dim
        C = 2 * self.key_dim + self.value_dim
        w_in, taps, neg_a = self._step_weights()
        if self._fuse_ok(x, w_in):
            # One matmul for q|k|v, a, b and the gate: the same sums as six separate ones
            qkv, a, b, gate = F.linear(x, w_in).split([C, H, H, self.value_dim], dim=-1)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            a, b, gate = self.a_proj(x), self.b_proj(x), self.gate_proj(x)
        # The depthwise conv at one position: taps summed first to last with fused
        # multiply-adds, the order (and rounding) of the conv kernel (checked once per process).
        hist = state.conv.unbind(1)
        acc = hist[0] * taps[0]
        for j in range(1, len(hist)):
            acc = torch.addcmul(acc, hist[j], taps[j])
        acc = torch.addcmul(acc, qkv[:, 0], taps[-1])
        conv_out = F.silu(acc)
        new_conv = torch.cat([state.conv[:, 1:], qkv], dim=1)
        q, k, v = conv_out.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # One token: [B, 1, H, D] is [B, H, 1, D] in memory, so heads lead without transposes.
        q = F.normalize(q.reshape(B, H, 1, D), p=2, dim=-1, eps=1e-6)
        k = F.normalize(k.reshape(B, H, 1, D), p=2, dim=-1, eps=1e-6)
        v = v.reshape(B, H, 1, D)
        g = neg_a * F.softplus(a + self.dt_bias)
        beta = torch.sigmoid(b)
        o, new_rec = step_heads_first(
            q * D**-0.5,
            k,
            v,
            g.exp().reshape(B, H, 1, 1),
            beta.reshape(B, H, 1, 1),
            state.recurrent,
        )
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * self.norm_weight
        o = o.reshape(B, 1, self.value_dim) * F.silu(gate)
        y = self.o_proj(o)
        mask = state.exec_mask
        if not bool(mask.all()):
            new_rec = keep_masked(new_rec, state.recurrent, mask)
            new_conv = keep_masked(new_conv, state.conv, mask)
        new_state = GatedDeltaNetState(
            batch_size=B, exec_mask=mask.clone(), recurrent=new_rec, conv=new_conv
        )
        if streaming:
            self._stream_state = new_state
        return y, new_state

    def _fuse_ok(self, x: torch.Tensor, w_in: torch.Tensor) -> bool:
        """Whether one matmul over the stacked weights gives the six projections' bits at
        this batch size: the BLAS picks its kernel (and order of sums) by shape, so this is
        decided once per shape on random inputs."""
        key = (x.shape[0], tuple(w_in.shape), x.device.type)
        if key not in _FUSE_OK:
            gen = torch.Generator().manual_seed(0)
            ok = True
            for _ in range(3):
                probe = torch.randn(x.shape, generator=gen).to(x.device)
                parts = (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj)
                sep = torch.cat([p(probe) for p in (*parts, self.gate_proj)], dim=-1)
                ok = ok and bool(torch.equal(F.linear(probe, w_in), sep))
            _FUSE_OK[key] = ok
        return _FUSE_OK[key]


_FUSE_OK: dict[tuple, bool] = {}
_TAPS_OK: dict[str, bool] = {}


def _taps_match_conv(device: torch.device) -> bool:
    """Whether summing conv taps by `addcmul` gives conv1d's bits on this device (both use
    fused multiply-adds in tap order on CPUs with FMA); decided once on random data."""
    if device.type not in _TAPS_OK:
        gen = torch.Generator().manual_seed(0)
        full = torch.randn(3, 4, 96, generator=gen).to(device)
        w = torch.randn(96, 4, generator=gen).to(device)
        ref = F.conv1d(full.transpose(1, 2), w[:, None, :], groups=96)[..., 0]
        taps = w.T.contiguous()
        acc = full[:, 0] * taps[0]
        for j in range(1, 4):
            acc = torch.addcmul(acc, full[:, j], taps[j])
        _TAPS_OK[device.type] = bool(torch.equal(acc, ref))
    return _TAPS_OK[device.type]
