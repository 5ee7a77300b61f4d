"""Triton kernel for the recurrent (step) gated delta rule: the streaming hot path on CUDA.

One program per (batch, head, block of value columns) keeps its [K, BV] slice of the state in
registers and walks the T steps (T = 1 when streaming), so a step reads the state once and
writes it once. Value columns are independent in the delta rule (S^T k mixes only over K), which
is what allows the split.

The backward is the exact gradient of the same function computed by the chunked backward kernel
(the step and chunked forms are one function up to rounding); training never runs on this path,
but gradients still flow everywhere as the contract requires.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duplex.kernels.gated_delta.common import compute_dtype, new_buffer


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4)]


@triton.autotune(configs=_configs(), key=["K", "V", "BK", "BV"])
@triton.jit
def _recurrent_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    state_off = i_bh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    # S: [BK, BV] float32
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0 + state_off, mask=mkv, other=0.0).to(tl.float32)
    t = 0
    while t < T:
        row = (i_b * T + t).to(tl.int64) * H + i_h
        qt = tl.load(q + row * K + offs_k, mask=mk, other=0.0).to(tl.float32) * scale
        kt = tl.load(k + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        vt = tl.load(v + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
        gt = tl.load(g + row).to(tl.float32)
        bt = tl.load(beta + row).to(tl.float32)
        S = S * tl.exp(gt)
        # delta: [BV] = beta (v - S^T k)
        delta = bt * (vt - tl.sum(S * kt[:, None], axis=0))
        S = S + kt[:, None] * delta[None, :]
        ot = tl.sum(S * qt[:, None], axis=0)
        tl.store(o + row * V + offs_v, ot.to(o.dtype.element_ty), mask=mv)
        t += 1
    if STORE_FINAL:
        tl.store(ht + state_off, S, mask=mkv)


def recurrent_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the step kernel; returns (o, final state or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)
    o = new_buffer((B, T, H, V), q.dtype, q.device)
    ht = new_buffer((B, H, K, V), torch.float32, q.device) if output_final_state else None
    grid = (triton.cdiv(V, BV), B * H)
    _recurrent_fwd_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        initial_state if initial_state is not None else o,
        o,
        ht if ht is not None else o,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        HAS_H0=initial_state is not None,
        STORE_FINAL=output_final_state,
    )
    return o, ht


class FusedRecurrentGatedDeltaRuleTriton(torch.autograd.Function):
    """Step-kernel forward; backward through the chunked kernels (same function, exact grads)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht = recurrent_fwd(q, k, v, g, beta, scale, h0, output_final_state)
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.scale = scale
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from duplex.kernels.gated_delta.triton_chunk import chunk_bwd, chunk_fwd

        q, k, v, g, beta, h0 = ctx.saved_tensors
        _, _, hs = chunk_fwd(q, k, v, g, beta, ctx.scale, h0, False, True)
        dq, dk, dv, dg, dbeta, dh0 = chunk_bwd(
            q,
            k,
            v,
            g,
            beta,
            hs,
            do.contiguous(),
            dht.float().contiguous() if dht is not None else None,
            ctx.scale,
            h0 is not None,
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dg, dbeta, None, dh0, None


def fused_recurrent_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent gated delta rule on Triton (inputs already validated).

    The kernel accumulates in float32 and needs at least one step: float64 inputs and empty
    sequences are the caller's to route to the PyTorch loop (`fused_recurrent_gated_delta_rule`
    does).
    """
    if compute_dtype(q.dtype) == torch.float64 or q.shape[1] == 0:
        raise ValueError("the Triton kernel takes float32 or half inputs with T >= 1")
    o, ht = FusedRecurrentGatedDeltaRuleTriton.apply(
        q, k, v, g, beta, scale, initial_state, output_final_state
    )
    return o, (ht if output_final_state else None)
