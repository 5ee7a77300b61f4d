"""Inputs and error measures shared by the gated-delta-rule tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GradNames = ("q", "k", "v", "g", "beta", "h0")


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    with_h0: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Random inputs as a layer produces them: unit-norm k, g <= 0, beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": rn(B, T, H, K),
        "k": F.normalize(rn(B, T, H, K), dim=-1),
        "v": rn(B, T, H, V),
        "g": F.logsigmoid(rn(B, T, H) + 2.0),
        "beta": torch.sigmoid(rn(B, T, H)),
        "h0": rn(B, H, K, V) if with_h0 else None,
    }
    return {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}


def cotangents(o_shape, s_shape, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(*o_shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(*s_shape, generator=gen, dtype=torch.float64)
    return do, ds


def run_with_grads(fn, inputs, do, ds, **kw):
    """Run fn forward and backward; return o, final state and the gradient of every input."""
    leaves = {
        n: t.detach().clone().requires_grad_(True) for n, t in inputs.items() if t is not None
    }
    o, s = fn(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["g"],
        leaves["beta"],
        initial_state=leaves.get("h0"),
        output_final_state=True,
        **kw,
    )
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    loss.backward()
    grads = {n: t.grad for n, t in leaves.items()}
    return o.detach(), s.detach(), grads


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of the error over RMS of the reference; NaN anywhere in x gives NaN (fails a <=)."""
    x = x.double()
    ref = ref.double()
    denom = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((x - ref).pow(2).mean().sqrt() / denom).item()


def single_thread():
    """Run a test module on one intra-op thread, restoring the setting afterwards.

    These tests are mostly loops of tiny ops; on a small shared machine two OpenMP threads spin
    against other processes and run them 10-25x slower than one thread does.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
