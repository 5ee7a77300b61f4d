"""Triton kernels for the chunked gated delta rule: forward and backward.

Same chunk algebra as the PyTorch form (see chunk.py), one program per (batch, head) walking the
chunks in order with the K x V state in registers, so the state never round-trips through memory
within a pass. Why the unit-triangular inverse is a product: for strictly lower A of size C
(a power of two), A^C = 0, so (I + A)^-1 = sum_n (-A)^n = prod_{i < log2 C} (I + (-A)^(2^i)):
2 log2(C) - 2 matrix products, all on tensor cores, no row-by-row substitution.

The forward stores the state at the start of every chunk; the backward walks the chunks in
reverse, recomputes the chunk-local matrices from that state and carries dL/dS backwards.
Matrix products run in IEEE float32 (no TF32) so results agree with the reference to ~1e-6.

Import this module only where Triton is installed: the public ops import it lazily, on CUDA.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests), with autotuning collapsed to
one configuration because the autotuner needs a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duplex.kernels.gated_delta.common import compute_dtype, new_buffer

CHUNK_SIZE = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    if _interpreting():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]


@triton.autotune(configs=_configs(), key=["K", "V", "BK", "BV", "C"])
@triton.jit
def _chunk_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    hs,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    LOG2C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    # state block [BK, BV] of this (batch, head), float32
    state_off = i_bh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0 + state_off, mask=mkv, other=0.0).to(tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    # A while loop rather than range(NT): the interpreter cannot iterate a runtime range under
    # numpy >= 2.4, and compiled Triton handles both the same way.
    n = 0
    while n < NT:
        t = n * C + offs_c
        mt = t < T
        # row index into [B, T, H] for each step of the chunk: [C]
        row = (i_b * T + t).to(tl.int64) * H + i_h
        m_ck = mt[:, None] & mk[None, :]
        m_cv = mt[:, None] & mv[None, :]
        qc = tl.load(q + row[:, None] * K + offs_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        kc = tl.load(k + row[:, None] * K + offs_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        vc = tl.load(v + row[:, None] * V + offs_v[None, :], mask=m_cv, other=0.0).to(tl.float32)
        gc = tl.load(g + row, mask=mt, other=0.0).to(tl.float32)
        bc = tl.load(beta + row, mask=mt, other=0.0).to(tl.float32)
        if STORE_STATES:
            hs_off = (i_bh.to(tl.int64) * NT + n) * K * V + offs_k[:, None] * V + offs_v[None, :]
            tl.store(hs + hs_off, S, mask=mkv)
        G = tl.cumsum(gc, axis=0)
        G_last = tl.sum(tl.where(offs_c == C - 1, G, 0.0), axis=0)
        Dm = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
        kb = kc * bc[:, None]
        A = tl.where(strict, tl.dot(kb, tl.trans(kc), input_precision="ieee") * Dm, 0.0)
        # R = (I + A)^-1 as prod_i (I + X^(2^i)) with X = -A (nilpotent)
        X = -A
        R = eye + X
        for _ in tl.static_range(LOG2C - 1):
            X = tl.dot(X, X, input_precision="ieee")
            R = R + tl.dot(R, X, input_precision="ieee")
        U = tl.dot(R, vc * bc[:, None], input_precision="ieee")
        Wk = tl.dot(R, kb * tl.exp(G)[:, None], input_precision="ieee")
        W = U - tl.dot(Wk, S, input_precision="ieee")
        qs = qc * scale
        P = tl.dot(qs, tl.trans(kc), input_precision="ieee") * Dm
        oc = tl.dot(qs * tl.exp(G)[:, None], S, input_precision="ieee")
        oc += tl.dot(P, W, input_precision="ieee")
        tl.store(o + row[:, None] * V + offs_v[None, :], oc.to(o.dtype.element_ty), mask=m_cv)
        Kd = kc * tl.exp(G_last - G)[:, None]
        S = tl.exp(G_last) * S + tl.dot(tl.trans(Kd), W, input_precision="ieee")
        n += 1
    if STORE_FINAL:
        tl.store(ht + state_off, S, mask=mkv)


@triton.autotune(configs=_configs(), key=["K", "V", "BK", "BV", "C"])
@triton.jit
def _chunk_bwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    hs,
    do,
    dht,
    dq,
    dk,
    dv,
    dg,
    dbeta,
    dh0,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    LOG2C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]
    state_off = i_bh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    # dS: dL/d(state at the end of the current chunk), [BK, BV]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS = tl.load(dht + state_off, mask=mkv, other=0.0).to(tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    n = NT - 1
    while n >= 0:
        t = n * C + offs_c
        mt = t < T
        row = (i_b * T + t).to(tl.int64) * H + i_h
        m_ck = mt[:, None] & mk[None, :]
        m_cv = mt[:, None] & mv[None, :]
        qc = tl.load(q + row[:, None] * K + offs_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        kc = tl.load(k + row[:, None] * K + offs_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        vc = tl.load(v + row[:, None] * V + offs_v[None, :], mask=m_cv, other=0.0).to(tl.float32)
        doc = tl.load(do + row[:, None] * V + offs_v[None, :], mask=m_cv, other=0.0).to(tl.float32)
        gc = tl.load(g + row, mask=mt, other=0.0).to(tl.float32)
        bc = tl.load(beta + row, mask=mt, other=0.0).to(tl.float32)
        hs_off = (i_bh.to(tl.int64) * NT + n) * K * V + offs_k[:, None] * V + offs_v[None, :]
        S = tl.load(hs + hs_off, mask=mkv, other=0.0)

        # Recompute the chunk's forward quantities.
        G = tl.cumsum(gc, axis=0)
        G_last = tl.sum(tl.where(offs_c == C - 1, G, 0.0), axis=0)
        gam = tl.exp(G)
        gam_last = tl.exp(G_last)
        to_end = tl.exp(G_last - G)
        Dm = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
        kb = kc * bc[:, None]
        KK = tl.dot(kb, tl.trans(kc), input_precision="ieee")
        A = tl.where(strict, KK * Dm, 0.0)
        X = -A
        R = eye + X
        for _ in tl.static_range(LOG2C - 1):
            X = tl.dot(X, X, input_precision="ieee")
            R = R + tl.dot(R, X, input_precision="ieee")
        Vb = vc * bc[:, None]
        Kbg = kb * gam[:, None]
        U = tl.dot(R, Vb, input_precision="ieee")
        Wk = tl.dot(R, Kbg, input_precision="ieee")
        W = U - tl.dot(Wk, S, input_precision="ieee")
        qs = qc * scale
        QK = tl.dot(qs, tl.trans(kc), input_precision="ieee")
        P = QK * Dm
        Qg = qs * gam[:, None]
        Kd = kc * to_end[:, None]

        # Backward through O = Qg S + P W and S_next = gam_last S + Kd^T W.
        dW = tl.dot(tl.trans(P), doc, input_precision="ieee")
        dW += tl.dot(Kd, dS, input_precision="ieee")
        dQg = tl.dot(doc, tl.trans(S), input_precision="ieee")
        dP = tl.dot(doc, tl.trans(W), input_precision="ieee")
        dKd = tl.dot(W, tl.trans(dS), input_precision="ieee")
        dG_last = tl.sum(tl.sum(S * dS, axis=1), axis=0) * gam_last
        dS_prev = gam_last * dS + tl.dot(tl.trans(Qg), doc, input_precision="ieee")
        dS_prev -= tl.dot(tl.trans(Wk), dW, input_precision="ieee")
        # W = R Vb - R Kbg S
        dWk = -tl.dot(dW, tl.trans(S), input_precision="ieee")
        dR = tl.dot(dW, tl.trans(Vb), input_precision="ieee")
        dR += tl.dot(dWk, tl.trans(Kbg), input_precision="ieee")
        RT = tl.trans(R)
        dVb = tl.dot(RT, dW, input_precision="ieee")
        dKbg = tl.dot(RT, dWk, input_precision="ieee")
        dA = -tl.dot(tl.dot(RT, dR, input_precision="ieee"), RT, input_precision="ieee")
        dAm = tl.where(strict, dA, 0.0) * Dm
        dPm = dP * Dm
        dKb = tl.dot(dAm, kc, input_precision="ieee")

        dqs = tl.dot(dPm, kc, input_precision="ieee") + dQg * gam[:, None]
        dkc = tl.dot(tl.trans(dPm), qs, input_precision="ieee")
        dkc += tl.dot(tl.trans(dAm), kb, input_precision="ieee")
        dkc += dKbg * (bc * gam)[:, None] + dKb * bc[:, None] + dKd * to_end[:, None]
        dvc = dVb * bc[:, None]
        dbc = tl.sum(dKbg * kc, axis=1) * gam + tl.sum(dKb * kc, axis=1)
        dbc += tl.sum(dVb * vc, axis=1)
        # Gradient wrt the cumulative log decay G, then wrt g by a reverse cumulative sum.
        E = (dP * QK + tl.where(strict, dA, 0.0) * KK) * Dm
        dG = tl.sum(E, axis=1) - tl.sum(E, axis=0)
        dG += tl.sum(dQg * qs, axis=1) * gam + tl.sum(dKbg * kb, axis=1) * gam
        r = tl.sum(dKd * kc, axis=1) * to_end
        dG -= r
        dG += tl.where(offs_c == C - 1, dG_last + tl.sum(r, axis=0), 0.0)
        dgc = tl.cumsum(dG, axis=0, reverse=True)

        tl.store(
            dq + row[:, None] * K + offs_k[None, :],
            (dqs * scale).to(dq.dtype.element_ty),
            mask=m_ck,
        )
        tl.store(dk + row[:, None] * K + offs_k[None, :], dkc.to(dk.dtype.element_ty), mask=m_ck)
        tl.store(dv + row[:, None] * V + offs_v[None, :], dvc.to(dv.dtype.element_ty), mask=m_cv)
        tl.store(dg + row, dgc.to(dg.dtype.element_ty), mask=mt)
        tl.store(dbeta + row, dbc.to(dbeta.dtype.element_ty), mask=mt)
        dS = dS_prev
        n -= 1
    if STORE_DH0:
        tl.store(dh0 + state_off, dS, mask=mkv)


def _block(n: int) -> int:
    """Triton blocks are powers of two and tl.dot needs at least 16."""
    return max(16, triton.next_power_of_2(n))


def chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    store_states: bool,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel; returns (o, final state or None, chunk-start states or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = triton.cdiv(T, C)
    BK = _block(K)
    BV = min(_block(V), 64)
    dev = q.device
    o = new_buffer((B, T, H, V), q.dtype, dev)
    ht = new_buffer((B, H, K, V), torch.float32, dev) if output_final_state else None
    hs = new_buffer((B, H, NT, K, V), torch.float32, dev) if store_states else None
    grid = (triton.cdiv(V, BV), B * H)
    _chunk_fwd_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        initial_state if initial_state is not None else o,
        o,
        ht if ht is not None else o,
        hs if hs is not None else o,
        scale,
        T,
        NT,
        H=H,
        K=K,
        V=V,
        C=C,
        LOG2C=C.bit_length() - 1,
        BK=BK,
        BV=BV,
        HAS_H0=initial_state is not None,
        STORE_FINAL=output_final_state,
        STORE_STATES=store_states,
    )
    return o, ht, hs


def chunk_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    hs: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    want_dh0: bool,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel; returns (dq, dk, dv, dg, dbeta, dh0 or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = triton.cdiv(T, C)
    dev = q.device
    dq = new_buffer(tuple(q.shape), q.dtype, dev)
    dk = new_buffer(tuple(k.shape), k.dtype, dev)
    dv = new_buffer(tuple(v.shape), v.dtype, dev)
    dg = new_buffer(tuple(g.shape), g.dtype, dev)
    dbeta = new_buffer(tuple(beta.shape), beta.dtype, dev)
    dh0 = new_buffer((B, H, K, V), torch.float32, dev) if want_dh0 else None
    _chunk_bwd_kernel[(B * H,)](
        q,
        k,
        v,
        g,
        beta,
        hs,
        do,
        dht if dht is not None else do,
        dq,
        dk,
        dv,
        dg,
        dbeta,
        dh0 if dh0 is not None else dq,
        scale,
        T,
        NT,
        H=H,
        K=K,
        V=V,
        C=C,
        LOG2C=C.bit_length() - 1,
        BK=_block(K),
        BV=_block(V),
        HAS_DHT=dht is not None,
        STORE_DH0=want_dh0,
    )
    return dq, dk, dv, dg, dbeta, dh0


class ChunkGatedDeltaRuleTriton(torch.autograd.Function):
    """Autograd wrapper: Triton forward (storing chunk-start states) and Triton backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        needs_grad = any(ctx.needs_input_grad)
        o, ht, hs = chunk_fwd(
            q, k, v, g, beta, scale, h0, output_final_state, needs_grad, chunk_size
        )
        ctx.save_for_backward(q, k, v, g, beta, hs)
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, hs = ctx.saved_tensors
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
            ctx.h0_dtype is not None,
            ctx.chunk_size,
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule on Triton (inputs already validated).

    The kernels accumulate in float32: float64 inputs are the caller's to route to the
    PyTorch form (`chunk_gated_delta_rule` does).
    """
    if compute_dtype(q.dtype) == torch.float64:
        raise ValueError("the Triton kernels take float32 or half inputs, not float64")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if q.shape[1] == 0:
        B, _, H, K = q.shape
        V = v.shape[-1]
        S = initial_state.float() if initial_state is not None else q.new_zeros(B, H, K, V)
        return v.new_zeros(B, 0, H, V), (S.float() if output_final_state else None)
    o, ht = ChunkGatedDeltaRuleTriton.apply(
        q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size
    )
    return o, (ht if output_final_state else None)
