"""Cases for the Triton kernels under the interpreter (TRITON_INTERPRET=1), on CPU tensors.

Run by test_gated_delta_triton.py in a child process: the interpreter must be switched on before
Triton is first imported, which a shared pytest process cannot guarantee.

No GPU here: these run the kernels' Python semantics on CPU tensors, on tiny shapes (the
interpreter is orders of magnitude slower than PyTorch). They check forward outputs, final states
and the gradients of every input (q, k, v, g, beta, initial state) in float32 against the float64
naive loop, with buffers pre-filled with NaN so any element a kernel fails to write shows up.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from duplex.kernels import naive_recurrent_gated_delta_rule
from duplex.kernels.gated_delta import common
from tests.kernels.gdn_helpers import (
    cotangents,
    make_inputs,
    rel_rms,
    run_with_grads,
    single_thread,
)

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "run these cases with TRITON_INTERPRET=1 set before Triton is imported "
        "(tests/kernels/test_gated_delta_triton.py does this in a subprocess)"
    )


@pytest.fixture(scope="module")
def kernels():
    """The two Triton kernel modules (their kernels are interpreted in this process)."""
    return [
        importlib.import_module("duplex.kernels.gated_delta.triton_chunk"),
        importlib.import_module("duplex.kernels.gated_delta.triton_recurrent"),
    ]


_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    monkeypatch.setattr(common, "FILL_BUFFERS_WITH_NAN", True)


def _check(fn, B, T, H, K, V, with_h0, tol=1e-5, seed=0):
    x = make_inputs(B, T, H, K, V, torch.float64, seed=seed, with_h0=with_h0)
    do, ds = cotangents((B, T, H, V), (B, H, K, V), seed=seed + 1)
    o_ref, s_ref, g_ref = run_with_grads(naive_recurrent_gated_delta_rule, x, do, ds)
    xf = {n: (t.float() if t is not None else None) for n, t in x.items()}
    o, s, grads = run_with_grads(fn, xf, do, ds)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    errors = {"o": rel_rms(o, o_ref), "final_state": rel_rms(s, s_ref)}
    errors.update({f"d{n}": rel_rms(grads[n], g_ref[n]) for n in g_ref})
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad}"


CHUNK_CASES = [
    # (T, K, V, chunk_size, with_h0)
    (1, 16, 16, 16, True),
    (20, 16, 24, 16, False),
    (33, 20, 16, 16, True),
    (63, 60, 32, 16, False),
    (70, 32, 100, 64, True),
]


@pytest.mark.parametrize(("T", "K", "V", "C", "with_h0"), CHUNK_CASES)
def test_chunk_kernels_match_naive(kernels, T, K, V, C, with_h0):
    tc = kernels[0]

    def fn(q, k, v, g, beta, initial_state=None, output_final_state=False):
        return tc.chunk_gated_delta_rule_triton(
            q, k, v, g, beta, K**-0.5, initial_state, output_final_state, chunk_size=C
        )

    _check(fn, 2, T, 2, K, V, with_h0)


RECURRENT_CASES = [(1, 16, 16, True), (1, 32, 100, True), (9, 20, 24, False), (17, 64, 64, True)]


@pytest.mark.parametrize(("T", "K", "V", "with_h0"), RECURRENT_CASES)
def test_recurrent_kernel_matches_naive(kernels, T, K, V, with_h0):
    tr = kernels[1]

    def fn(q, k, v, g, beta, initial_state=None, output_final_state=False):
        return tr.fused_recurrent_gated_delta_rule_triton(
            q, k, v, g, beta, K**-0.5, initial_state, output_final_state
        )

    _check(fn, 2, T, 2, K, V, with_h0)


def test_chunk_kernel_bfloat16(kernels):
    tc = kernels[0]
    x = make_inputs(1, 40, 2, 16, 16, torch.float64)
    ref, s_ref = naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True
    )
    xb = {n: t.to(torch.bfloat16) for n, t in x.items()}
    o, s = tc.chunk_gated_delta_rule_triton(
        xb["q"], xb["k"], xb["v"], xb["g"], xb["beta"], 0.25, x["h0"].float(), True, 16
    )
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_rms(o, ref) <= 3e-2
    assert rel_rms(s, s_ref) <= 3e-2


def test_chunk_then_recurrent_steps(kernels):
    """Chunked prefill then step-kernel decoding equals the reference over the whole sequence."""
    tc, tr = kernels
    x = make_inputs(1, 30, 2, 16, 16, torch.float64)
    ref, _ = naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"]
    )
    xf = {n: t.float() for n, t in x.items()}
    args = [xf[n] for n in ("q", "k", "v", "g", "beta")]
    o1, s = tc.chunk_gated_delta_rule_triton(*[a[:, :21] for a in args], 0.25, xf["h0"], True, 16)
    outs = [o1]
    for t in range(21, 30):
        o_t, s = tr.fused_recurrent_gated_delta_rule_triton(
            *[a[:, t : t + 1] for a in args], 0.25, s, True
        )
        outs.append(o_t)
    assert rel_rms(torch.cat(outs, 1), ref) <= 1e-5


def test_bad_chunk_size(kernels):
    x = make_inputs(1, 4, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        kernels[0].chunk_gated_delta_rule_triton(
            x["q"], x["k"], x["v"], x["g"], x["beta"], 0.25, None, False, 24
        )
