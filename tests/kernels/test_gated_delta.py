"""The chunked and recurrent gated delta rule against the naive reference, forward and backward.

The reference is the naive loop in float64. float64 runs of the fast ops must agree to 1e-10
(relative RMS); float32 runs to 1e-5 against the same float64 truth, for outputs, final states
and the gradients of every input including the initial state.
"""

from __future__ import annotations

import functools

import pytest
import torch

from duplex.kernels import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from duplex.kernels.gated_delta import common
from duplex.kernels.gated_delta.chunk import chunk_gated_delta_rule_torch
from tests.kernels.gdn_helpers import (
    cotangents,
    make_inputs,
    rel_rms,
    run_with_grads,
    single_thread,
)

TS = [1, 63, 64, 65, 1000]
HEAD_DIMS = [32, 60, 64, 100]
OPS = {"chunk": chunk_gated_delta_rule, "fused_recurrent": fused_recurrent_gated_delta_rule}


_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    """Buffers a kernel must overwrite start as NaN in every test here."""
    monkeypatch.setattr(common, "FILL_BUFFERS_WITH_NAN", True)


def _shape(T: int) -> tuple[int, int]:
    """(B, H): long sequences use fewer rows to keep the reference loop quick."""
    return (1, 2) if T >= 1000 else (2, 3)


@functools.cache
def _reference(T: int, D: int, with_h0: bool):
    B, H = _shape(T)
    x = make_inputs(B, T, H, D, D, torch.float64, seed=T * 1000 + D, with_h0=with_h0)
    do, ds = cotangents((B, T, H, D), (B, H, D, D), seed=T + D)
    o, s, grads = run_with_grads(naive_recurrent_gated_delta_rule, x, do, ds)
    return x, do, ds, o, s, grads


def _compare(name, fn, T, D, with_h0, dtype, tol):
    x, do, ds, o_ref, s_ref, g_ref = _reference(T, D, with_h0)
    xs = {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}
    o, s, grads = run_with_grads(fn, xs, do, ds)
    assert o.dtype == dtype
    errors = {"o": rel_rms(o, o_ref), "final_state": rel_rms(s, s_ref)}
    for n, gr in g_ref.items():
        assert grads[n] is not None, f"{name}: no gradient for {n}"
        errors[f"d{n}"] = rel_rms(grads[n], gr)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{name} T={T} D={D} h0={with_h0} {dtype}: errors above {tol}: {bad}"


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("op", list(OPS))
def test_float64_matches_naive(op, T, D, with_h0):
    _compare(op, OPS[op], T, D, with_h0, torch.float64, 1e-10)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("op", list(OPS))
def test_float32_matches_naive(op, T, D, with_h0):
    _compare(op, OPS[op], T, D, with_h0, torch.float32, 1e-5)


@pytest.mark.parametrize("op", list(OPS))
def test_rectangular_heads(op):
    """K != V: the value dim is indexed separately everywhere."""
    B, T, H, K, V = 2, 70, 2, 32, 100
    x = make_inputs(B, T, H, K, V)
    do, ds = cotangents((B, T, H, V), (B, H, K, V))
    o_ref, s_ref, g_ref = run_with_grads(naive_recurrent_gated_delta_rule, x, do, ds)
    o, s, grads = run_with_grads(OPS[op], x, do, ds)
    assert rel_rms(o, o_ref) <= 1e-10
    assert rel_rms(s, s_ref) <= 1e-10
    for n in g_ref:
        assert rel_rms(grads[n], g_ref[n]) <= 1e-10, n


@pytest.mark.parametrize("chunk_size", [1, 16, 50])
def test_chunk_sizes(chunk_size):
    """Other chunk sizes (incl. one not dividing T) give the same result."""
    x = make_inputs(2, 130, 2, 32, 48)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True
    )
    o, s = chunk_gated_delta_rule_torch(
        x["q"], x["k"], x["v"], x["g"], x["beta"], 32**-0.5, x["h0"], True, chunk_size
    )
    assert rel_rms(o, o_ref) <= 1e-10
    assert rel_rms(s, s_ref) <= 1e-10


@pytest.mark.parametrize("op", list(OPS))
def test_strong_decay_stays_finite(op):
    """g as low as -60 per step (state forgotten at once): no overflow, still exact."""
    x = make_inputs(1, 200, 2, 32, 32)
    gen = torch.Generator().manual_seed(3)
    x["g"] = -60.0 * torch.rand(1, 200, 2, generator=gen, dtype=torch.float64)
    do, ds = cotangents((1, 200, 2, 32), (1, 2, 32, 32))
    o_ref, s_ref, g_ref = run_with_grads(naive_recurrent_gated_delta_rule, x, do, ds)
    o, s, grads = run_with_grads(OPS[op], x, do, ds)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_rms(o, o_ref) <= 1e-10
    assert rel_rms(s, s_ref) <= 1e-10
    for n in g_ref:
        assert torch.isfinite(grads[n]).all(), n
        assert rel_rms(grads[n], g_ref[n]) <= 1e-9, n


def test_custom_scale_and_no_final_state():
    x = make_inputs(1, 40, 2, 16, 16)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    ref, none = naive_recurrent_gated_delta_rule(*args, scale=0.3)
    assert none is None
    for fn in OPS.values():
        o, s = fn(*args, scale=0.3)
        assert s is None
        assert rel_rms(o, ref) <= 1e-10
    o_default, _ = chunk_gated_delta_rule(*args)
    assert rel_rms(o_default, ref) > 1e-3, "scale must change the output"


@pytest.mark.parametrize("split", [1, 64, 100])
def test_prefill_then_steps_equals_full(split):
    """Chunked prefill, then token-by-token recurrent steps, equals one full pass."""
    x = make_inputs(2, 130, 2, 32, 32, torch.float32)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    o_full, s_full = naive_recurrent_gated_delta_rule(
        *[a.double() for a in args], initial_state=x["h0"].double(), output_final_state=True
    )
    o1, s = chunk_gated_delta_rule(
        *[a[:, :split] for a in args], initial_state=x["h0"], output_final_state=True
    )
    outs = [o1]
    for t in range(split, 130):
        o_t, s = fused_recurrent_gated_delta_rule(
            *[a[:, t : t + 1] for a in args], initial_state=s, output_final_state=True
        )
        outs.append(o_t)
    assert s.dtype == torch.float32
    assert rel_rms(torch.cat(outs, 1), o_full) <= 1e-5
    assert rel_rms(s, s_full) <= 1e-5


@pytest.mark.parametrize("op", ["naive", *OPS])
def test_bfloat16_inputs(op):
    """Half-precision inputs: output in the input dtype, state accumulated in float32."""
    fn = {"naive": naive_recurrent_gated_delta_rule, **OPS}[op]
    x = make_inputs(1, 80, 2, 32, 32)
    ref, s_ref = naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True
    )
    xb = {n: t.to(torch.bfloat16) for n, t in x.items() if t is not None}
    o, s = fn(xb["q"], xb["k"], xb["v"], xb["g"], xb["beta"], output_final_state=True)
    assert o.dtype == torch.bfloat16
    assert s.dtype == torch.float32
    assert rel_rms(o, ref) <= 3e-2
    assert rel_rms(s, s_ref) <= 3e-2


@pytest.mark.parametrize("op", list(OPS))
def test_bfloat16_under_autocast_backward(op):
    """bf16 training (`--precision bf16`): the op runs inside autocast, forward and backward.

    The PyTorch forms compute in float32; autocast must not turn their products back into
    bfloat16, which once mixed dtypes inside the chunked backward (a RuntimeError)."""
    fn = OPS[op]
    x = make_inputs(1, 80, 2, 32, 32)
    ref, _ = naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])
    leaves = {n: x[n].to(torch.bfloat16).requires_grad_() for n in ("q", "k", "v", "g", "beta")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"])
    o.float().pow(2).sum().backward()
    assert rel_rms(o, ref) <= 3e-2
    for n, t in leaves.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), n


@pytest.mark.parametrize("op", ["naive", *OPS])
def test_empty_sequence(op):
    fn = {"naive": naive_recurrent_gated_delta_rule, **OPS}[op]
    x = make_inputs(2, 0, 2, 8, 12)
    o, s = fn(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True
    )
    assert o.shape == (2, 0, 2, 12)
    assert torch.equal(s, x["h0"])


def _good():
    return make_inputs(2, 5, 3, 8, 12)


BAD_CASES = {
    "q": lambda x: x.update(q=x["q"][0]),
    "k": lambda x: x.update(k=x["k"][..., :4]),
    "v": lambda x: x.update(v=x["v"][:, :3]),
    "g": lambda x: x.update(g=x["g"][..., None]),
    "beta": lambda x: x.update(beta=x["beta"][:, :2]),
    "initial_state": lambda x: x.update(h0=x["h0"].transpose(-1, -2)),
}


@pytest.mark.parametrize("op", ["naive", *OPS])
@pytest.mark.parametrize("arg", list(BAD_CASES))
def test_bad_shapes_name_the_argument(op, arg):
    fn = {"naive": naive_recurrent_gated_delta_rule, **OPS}[op]
    x = _good()
    BAD_CASES[arg](x)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"])


@pytest.mark.parametrize("op", ["naive", *OPS])
@pytest.mark.parametrize("arg", ["q", "k", "v", "g", "beta", "h0"])
def test_bad_dtypes_name_the_argument(op, arg):
    fn = {"naive": naive_recurrent_gated_delta_rule, **OPS}[op]
    x = _good()
    x[arg] = x[arg].to(torch.int64) if arg != "k" else x[arg].float()
    name = "initial_state" if arg == "h0" else arg
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"])


def test_bad_device_names_the_argument():
    x = _good()
    with pytest.raises(ValueError, match=r"^v\b"):
        chunk_gated_delta_rule(x["q"], x["k"], x["v"].to("meta"), x["g"], x["beta"])


def test_cpu_tensors_use_pytorch(monkeypatch):
    x = make_inputs(1, 4, 1, 8, 8)
    assert not common.use_triton(x["q"])
    monkeypatch.setenv("DUPLEX_GDN_BACKEND", "triton")
    assert not common.use_triton(x["q"]), "CPU tensors never go to the Triton kernels"


def test_public_entry_points_are_the_one_dispatch_point():
    """The Triton modules never import the public entry points back (fla's layout): routing
    float64 and empty sequences to PyTorch is the entry points' job, and the Triton functions
    refuse what they cannot compute instead of calling back up."""
    import ast
    from pathlib import Path

    import duplex.kernels.gated_delta as pkg

    root = Path(pkg.__file__).parent
    for name in ("triton_chunk.py", "triton_recurrent.py"):
        tree = ast.parse((root / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        back = imported & {
            "duplex.kernels.gated_delta.chunk",
            "duplex.kernels.gated_delta.fused_recurrent",
            "duplex.kernels.gated_delta",
            "duplex.kernels",
        }
        assert not back, f"{name} imports {back}"
    from duplex.kernels.gated_delta import triton_chunk, triton_recurrent

    x = make_inputs(1, 4, 1, 16, 16, torch.float64)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], 0.25, None, False)
    with pytest.raises(ValueError, match="float64"):
        triton_chunk.chunk_gated_delta_rule_triton(*args)
    with pytest.raises(ValueError, match="float32"):
        triton_recurrent.fused_recurrent_gated_delta_rule_triton(*args)
