"""The chunkwise-parallel gated delta rule in PyTorch: the CPU training path.

Why this form: the recurrence is split into chunks of C steps. Everything local to a chunk is
computed for all chunks at once as batched matrix products; only a cheap K x K by K x V update
runs sequentially, once per chunk. Derivation (per chunk, local cumulative log decay
G_i = g_1 + ... + g_i, state S0 at the chunk start):

    S_i = e^{G_i} S0 + sum_{j<=i} e^{G_i - G_j} k_j w_j^T            (w_j: corrected values)
    w_i = beta_i (v_i - e^{G_i} S0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i . k_j) w_j)

so (I + A) W = diag(beta) V - diag(beta e^G) K S0 with A strictly lower triangular,
A_ij = beta_i e^{G_i - G_j} k_i . k_j (the WY / UT transform). One unit-triangular solve per chunk
gives U = (I + A)^-1 diag(beta) V and Wk = (I + A)^-1 diag(beta e^G) K, with W = U - Wk S0, and

    O      = diag(e^G) (scale Q) S0 + ((scale Q K^T) . D) W          D_ij = e^{G_i - G_j}, j <= i
    S_next = e^{G_C} S0 + (K . e^{G_C - G})^T W = M S0 + N
    M      = e^{G_C} I - (K . e^{G_C - G})^T Wk,   N = (K . e^{G_C - G})^T U

M and N are batched over all chunks, so the sequential pass is one baddbmm per chunk. All
exponents are differences G_i - G_j with j <= i, hence <= 0: nothing overflows however strong
the decay. Gradients come from autograd (torch.linalg.solve_triangular has its own backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from duplex.kernels.gated_delta.common import (
    check_inputs,
    compute_dtype,
    new_buffer,
    resolve_scale,
    use_triton,
)

CHUNK_SIZE = 64


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule: same result as the naive loop up to rounding, much faster.

    Dispatches to the Triton kernels for CUDA tensors and to the PyTorch chunked form otherwise
    (float64 too: the kernels accumulate in float32). This is the one dispatch point, so the
    Triton module never imports back.
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    d = check_inputs(q, k, v, g, beta, initial_state)
    scale = resolve_scale(scale, d.K)
    if use_triton(q) and compute_dtype(q.dtype) != torch.float64:
        from duplex.kernels.gated_delta.triton_chunk import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(
            q, k, v, g, beta, scale, initial_state, output_final_state
        )
    # The PyTorch form computes in float32 itself (as the kernels do); autocast would turn its
    # products back into bfloat16 and mix dtypes inside the backward.
    with torch.autocast(q.device.type, enabled=False):
        return chunk_gated_delta_rule_torch(
            q, k, v, g, beta, scale, initial_state, output_final_state, CHUNK_SIZE
        )


def chunk_gated_delta_rule_torch(
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
    """The PyTorch chunked form (inputs already validated; see the module docstring)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    in_dtype = q.dtype
    dt = compute_dtype(in_dtype)
    S0 = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    if T == 0:
        return v.new_zeros(B, 0, H, V), (S0 if output_final_state else None)
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if pad:
        # Padded steps have k = 0, beta = 0, g = 0: they leave the state exactly as it was.
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    # [B, N*C, H, D] -> [B, H, N, C, D], made contiguous once so no product copies them again
    q, k, v = (x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4).contiguous() for x in (q, k, v))
    g, beta = (x.view(B, N, C, H).permute(0, 3, 1, 2) for x in (g, beta))

    G = g.cumsum(-1)
    # G: [B, H, N, C]; D_ij = exp(G_i - G_j) on j <= i, 0 above the diagonal
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~tril, float("-inf")).exp()
    # D: [B, H, N, C, C]
    eG = G.exp()
    kb = k * beta[..., None]
    kT = k.transpose(-1, -2)
    A = (kb @ kT * D).tril(-1)
    Tinv = UnitLowerInverse.apply(A)
    # U: [B, H, N, C, V]; Wk: [B, H, N, C, K]
    U = Tinv @ (v * beta[..., None])
    Wk = Tinv @ (k * (beta * eG)[..., None])
    # P and Qg without the query scale: it is applied once, to the output
    P = q @ kT * D
    Qg = q * eG[..., None]
    G_last = G[..., -1:]
    # KdT: [B, H, N, K, C]; gl: [B, H, N]
    KdT = (k * (G_last - G).exp()[..., None]).transpose(-1, -2)
    gl = G_last[..., 0].exp()
    W, S_all, S_final = ChunkRecurrence.apply(
        U.reshape(B * H, N, C, V),
        Wk.reshape(B * H, N, C, K),
        KdT.reshape(B * H, N, K, C),
        gl.reshape(B * H, N),
        S0.reshape(B * H, K, V),
    )
    # W: [B, H, N, C, V]; S_all: [B, H, N, K, V]
    W = W.view(B, H, N, C, V)
    S_all = S_all.view(B, H, N, K, V)
    # o = scale (Qg S + P W): [B, H, N, C, V]
    o = torch.baddbmm(
        (Qg @ S_all).view(B * H * N, C, V),
        P.reshape(B * H * N, C, C),
        W.reshape(B * H * N, C, V),
        beta=scale,
        alpha=scale,
    ).view(B, H, N, C, V)
    # o: [B, H, N, C, V] -> [B, T, H, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    final = S_final.view(B, H, K, V) if output_final_state else None
    return o.to(in_dtype), final


class UnitLowerInverse(torch.autograd.Function):
    """(I + A)^-1 for strictly lower triangular A [..., C, C], with a matmul-only backward.

    Why a Function: autograd of solve_triangular would run a second triangular solve backward,
    which on CPU is several times slower than the two matrix products this needs
    (d(L^-1) = -L^-T dT L^-T, restricted to the strictly lower part A lives on).
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor) -> torch.Tensor:
        C = A.shape[-1]
        eye = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
        Tinv = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(Tinv)
        return Tinv

    @staticmethod
    def backward(ctx, dT: torch.Tensor) -> torch.Tensor:
        (Tinv,) = ctx.saved_tensors
        TinvT = Tinv.transpose(-1, -2)
        return -(TinvT @ dT @ TinvT).tril(-1)


class ChunkRecurrence(torch.autograd.Function):
    """The sequential part, with a hand-written backward.

    Per chunk n (S the state at its start): W_n = U_n - Wk_n S; S <- gl_n S + KdT_n W_n.
    Inputs U [BH, N, C, V], Wk [BH, N, C, K], KdT [BH, N, K, C], gl [BH, N], S0 [BH, K, V].
    Returns W [BH, N, C, V], the state at the start of every chunk [BH, N, K, V] and the final
    state [BH, K, V]. Only two small products per chunk run in the loop; everything else is
    batched over chunks. Autograd through a Python loop of indexing would allocate a full-size
    gradient per chunk (quadratic in T); here the backward is one reverse loop plus batched
    products.
    """

    @staticmethod
    def forward(ctx, U, Wk, KdT, gl, S0):
        BH, N, C, V = U.shape
        K = Wk.shape[-1]
        W = new_buffer((BH, N, C, V), U.dtype, U.device)
        S_all = new_buffer((BH, N, K, V), U.dtype, U.device)
        S = S0
        for n in range(N):
            S_all[:, n] = S
            W[:, n] = torch.baddbmm(U[:, n], Wk[:, n], S, alpha=-1.0)
            S = torch.baddbmm(S * gl[:, n, None, None], KdT[:, n], W[:, n])
        ctx.save_for_backward(Wk, KdT, gl, S_all, W)
        return W, S_all, S

    @staticmethod
    def backward(ctx, dW, dS_all, dS_final):
        Wk, KdT, gl, S_all, W = ctx.saved_tensors
        N = S_all.shape[1]
        g = torch.zeros_like(S_all[:, 0]) if dS_final is None else dS_final.contiguous()
        # dWt: total gradient of each W_n; dS_next: dL/d(state after chunk n)
        dWt = new_buffer(tuple(W.shape), W.dtype, W.device)
        dS_next = new_buffer(tuple(S_all.shape), W.dtype, W.device)
        Kd = KdT.transpose(-1, -2)
        WkT = Wk.transpose(-1, -2)
        for n in range(N - 1, -1, -1):
            dS_next[:, n] = g
            if dW is None:
                dWt[:, n] = torch.bmm(Kd[:, n], g)
            else:
                dWt[:, n] = torch.baddbmm(dW[:, n], Kd[:, n], g)
            # dL/dS_n = gl_n dS_{n+1} - Wk_n^T dW_n (+ the direct gradient of S_all[n])
            g = torch.baddbmm(g * gl[:, n, None, None], WkT[:, n], dWt[:, n], alpha=-1.0)
            if dS_all is not None:
                g = g + dS_all[:, n]
        dU = dWt
        dWk = -(dWt @ S_all.transpose(-1, -2))
        dKdT = dS_next @ W.transpose(-1, -2)
        dgl = (S_all * dS_next).sum((-1, -2))
        return dU, dWk, dKdT, dgl, g
