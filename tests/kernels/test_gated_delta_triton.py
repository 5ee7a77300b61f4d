"""Run the Triton kernel cases under the interpreter, in a child pytest process.

Why a child process: TRITON_INTERPRET=1 takes effect only if it is set before Triton is first
imported (Triton's own library functions are created at import), and in a shared pytest process
any earlier import would silently leave the kernels compiled for a GPU that is not there. The
cases themselves live in triton_interpreter_cases.py; this test fails if any of them fails, is
skipped, or is not collected.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

CASES = Path(__file__).with_name("triton_interpreter_cases.py")
ROOT = Path(__file__).resolve().parents[2]
EXPECTED_CASES = 12


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    summary = re.search(r"(\d+) passed", out)
    assert summary is not None, out
    assert int(summary.group(1)) == EXPECTED_CASES, out
    assert not re.search(r"\d+ (skipped|failed|error)", out), out
