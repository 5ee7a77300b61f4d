"""The plain reference: the gated delta rule as a loop over time, exactly as the contract reads.

Slow on purpose and obviously right; every faster form is tested against it. Works in any
floating dtype (float64 for tight checks); gradients come from autograd through the loop.
"""

from __future__ import annotations

import torch

from duplex.kernels.gated_delta.common import check_inputs, compute_dtype, resolve_scale


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule, one time step at a time.

    For each t: S <- exp(g_t) S; S <- S + beta_t k_t (v_t - S^T k_t)^T; o_t = S^T (scale q_t).
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] or None).
    """
    d = check_inputs(q, k, v, g, beta, initial_state)
    scale = resolve_scale(scale, d.K)
    in_dtype = q.dtype
    dt = compute_dtype(in_dtype)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(d.B, d.H, d.K, d.V) if initial_state is None else initial_state.to(dt)
    outs = []
    # unbind, not indexing in the loop: its backward is one stack, where per-step indexing would
    # allocate a full-size gradient for every step (quadratic in T).
    steps = zip(*(x.unbind(1) for x in (q, k, v, g, beta)), strict=True)
    for q_t, k_t, v_t, g_t, b_t in steps:
        # S: [B, H, K, V]; q_t, k_t: [B, H, K]; v_t: [B, H, V]; g_t, b_t: [B, H]
        S = S * g_t.exp()[:, :, None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, S)
        delta = b_t[:, :, None] * (v_t - predicted)
        S = S + k_t[:, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(d.B, 0, d.H, d.V)
    return o.to(in_dtype), (S if output_final_state else None)
