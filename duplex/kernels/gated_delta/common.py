"""Argument checks, dtype rules and buffer allocation shared by every gated-delta-rule op.

All ops agree on one contract (shared/DESIGN.md): q, k [B, T, H, K]; v [B, T, H, V];
g (log decay, <= 0) and beta [B, T, H]; state [B, H, K, V]. Validation lives here so every
backend rejects the same bad calls with the same ValueError naming the argument.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Tests set this to True so buffers the kernels should fully overwrite start as NaN: an element a
# kernel forgets to write then shows up as a NaN in the comparison instead of a stale value.
FILL_BUFFERS_WITH_NAN = False


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that the caller promises to overwrite entirely."""
    if FILL_BUFFERS_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Dims:
    """Sizes of one call: batch, time, heads, key dim, value dim."""

    B: int
    T: int
    H: int
    K: int
    V: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state and accumulation dtype: float32, or float64 when the inputs are float64.

    Half-precision inputs are accumulated in float32 because the state integrates over
    arbitrarily many steps; float64 stays float64 so the references can be checked to 1e-10.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> Dims:
    """Validate shapes, dtypes and devices; return the sizes.

    Raises ValueError whose message starts with the name of the offending argument.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B={B}, T={T}, H={H}, V], got shape {tuple(v.shape)}")
    V = v.shape[3]
    if K == 0 or V == 0 or H == 0 or B == 0:
        raise ValueError(f"q and v need non-empty B, H, K, V; got q {tuple(q.shape)}, v {V=}")
    if g.shape != (B, T, H):
        raise ValueError(f"g must be [B={B}, T={T}, H={H}], got shape {tuple(g.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B={B}, T={T}, H={H}], got shape {tuple(beta.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if v.dtype != q.dtype:
        raise ValueError(f"v must have q's dtype {q.dtype}, got {v.dtype}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if initial_state.shape != (B, H, K, V):
            raise ValueError(
                f"initial_state must be [B={B}, H={H}, K={K}, V={V}], "
                f"got shape {tuple(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return Dims(B, T, H, K, V)


def resolve_scale(scale: float | None, K: int) -> float:
    """The query scale: K ** -0.5 unless given."""
    if scale is None:
        return K**-0.5
    scale = float(scale)
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def use_triton(x: torch.Tensor) -> bool:
    """Dispatch rule: Triton kernels on CUDA tensors, PyTorch elsewhere.

    DUPLEX_GDN_BACKEND=torch forces the PyTorch path even on CUDA (a debugging escape hatch and
    the way to run where Triton is not installed).
    """
    if not x.is_cuda:
        return False
    return os.environ.get("DUPLEX_GDN_BACKEND", "auto") != "torch"
