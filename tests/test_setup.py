"""The README's set-up is idempotent: once done, a second run installs nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_venv_stamp_is_up_to_date() -> None:
    # `make -q` exits 0 only when the target needs no rebuild (no pip run).
    r = subprocess.run(
        ["make", "-q", ".venv/.installed"], cwd=ROOT, capture_output=True, timeout=60
    )
    assert r.returncode == 0, "make would reinstall the venv on a second run"


def test_sysdeps_installs_nothing_when_present() -> None:
    r = subprocess.run(["scripts/sysdeps.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    commands = [ln.split("#", 1)[0].strip() for ln in first_block.splitlines()[1:]]
    assert [c for c in commands if c] == ["make demo", "make test"]
    assert text.index("```") < text.index("##"), "the commands come before any section"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
