"""The step form of the gated delta rule: what streaming runs, one token (T = 1) at a time.

On CPU it is a lean loop over time (per-step work is two K x V rank-1 updates and two
matrix-vector products, with everything that does not depend on the state hoisted out of the
loop). On CUDA it dispatches to the Triton recurrent kernel, which keeps the state in registers.
The cost per token does not depend on how many tokens came before: the state is fixed-size.
"""

from __future__ import annotations

import torch

from duplex.kernels.gated_delta.common import (
    check_inputs,
    compute_dtype,
    resolve_scale,
    use_triton,
)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent gated delta rule, tuned for short T (T = 1 when streaming).

    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    The one dispatch point: float64 inputs (the kernel accumulates in float32) and empty
    sequences take the PyTorch loop even on CUDA, so the Triton module never imports back.
    """
    d = check_inputs(q, k, v, g, beta, initial_state)
    scale = resolve_scale(scale, d.K)
    if use_triton(q) and compute_dtype(q.dtype) != torch.float64 and q.shape[1] > 0:
        from duplex.kernels.gated_delta.triton_recurrent import (
            fused_recurrent_gated_delta_rule_triton,
        )

        return fused_recurrent_gated_delta_rule_triton(
            q, k, v, g, beta, scale, initial_state, output_final_state
        )
    # The PyTorch form computes in float32 itself (as the kernels do); autocast would turn its
    # products back into bfloat16 and mix dtypes inside the backward.
    with torch.autocast(q.device.type, enabled=False):
        return fused_recurrent_gated_delta_rule_torch(
            q, k, v, g, beta, scale, initial_state, output_final_state
        )


def fused_recurrent_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch step loop (inputs already validated)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    in_dtype = q.dtype
    dt = compute_dtype(in_dtype)
    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    if T == 0:
        return v.new_zeros(B, 0, H, V), (S if output_final_state else None)
    if T == 1:
        return single_step(q, k, v, g, beta, scale, S, output_final_state)
    # Hoisted per-token work, laid out [T, B, H, 1, D] so each step slices a contiguous block.
    qs = (q.to(dt) * scale).permute(1, 0, 2, 3).unsqueeze(-2).contiguous()
    kt = k.to(dt).permute(1, 0, 2, 3).unsqueeze(-2).contiguous()
    vt = v.to(dt).permute(1, 0, 2, 3).unsqueeze(-2).contiguous()
    decay = g.to(dt).exp().permute(1, 0, 2)[..., None, None]
    bt = beta.to(dt).permute(1, 0, 2)[..., None, None]
    outs = []
    # unbind: one stack in the backward instead of a full-size gradient per indexed step
    steps = zip(*(x.unbind(0) for x in (qs, kt, vt, decay, bt)), strict=True)
    for q_t, k_t, v_t, d_t, b_t in steps:
        # S: [B, H, K, V]; k_t: [B, H, 1, K]; v_t: [B, H, 1, V]
        S = S * d_t
        delta = (v_t - k_t @ S) * b_t
        # rank-1 update k_t^T delta: [B, H, K, 1] x [B, H, 1, V]
        S = torch.baddbmm(
            S.view(B * H, K, V), k_t.view(B * H, 1, K).transpose(1, 2), delta.view(B * H, 1, V)
        ).view(B, H, K, V)
        outs.append(q_t @ S)
    # outs: T x [B, H, 1, V] -> [B, T, H, V]
    o = torch.cat(outs, dim=2).transpose(1, 2)
    return o.to(in_dtype), (S if output_final_state else None)


def single_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    S: torch.Tensor,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token, the streaming case: the fewest ops (per-op overhead dominates at this size).
    S is the state in the compute dtype; inputs already in it are not converted."""
    dt, in_dtype = S.dtype, q.dtype

    def conv(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == dt else x.to(dt)

    # q, k: [B, 1, H, K] -> [B, H, 1, K]; v: [B, H, 1, V]; g, beta: [B, H, 1, 1]
    q_t = conv(q).transpose(1, 2) * scale
    k_t = conv(k).transpose(1, 2)
    v_t = conv(v).transpose(1, 2)
    decay = conv(g).exp().transpose(1, 2)[..., None]
    b_t = conv(beta).transpose(1, 2)[..., None]
    o, S = step_heads_first(q_t, k_t, v_t, decay, b_t, S)
    # o: [B, H, 1, V] -> [B, 1, H, V]
    o = o.transpose(1, 2)
    return (o if o.dtype == in_dtype else o.to(in_dtype)), (S if output_final_state else None)


def step_heads_first(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    beta: torch.Tensor,
    S: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule's step on one token with heads leading: q (already scaled), k
    [B, H, 1, K]; v [B, H, 1, V]; decay = exp(g), beta [B, H, 1, 1]; S [B, H, K, V].
    -> (o [B, H, 1, V], the new S). Callers that hold heads first (a model's one-token step)
    skip `single_step`'s transposes."""
    S = S * decay
    delta = (v - k @ S) * beta
    S = torch.addcmul(S, k.transpose(-1, -2), delta)
    return q @ S, S
