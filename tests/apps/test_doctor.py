"""`duplex doctor` and `duplex --version` as users run them, plus a broken-install case."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from duplex import __version__
from duplex.apps import doctor


def _duplex(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "duplex", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_version() -> None:
    r = _duplex("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"duplex {__version__}"


def test_help_lists_doctor() -> None:
    r = _duplex("--help")
    assert r.returncode == 0
    assert "doctor" in r.stdout


def test_doctor_reports_this_machine() -> None:
    r = _duplex("doctor", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    import torch

    assert checks["torch"]["data"]["version"] == torch.__version__
    assert checks["torchaudio"]["level"] == "ok"
    assert checks["encodec"]["level"] == "ok"
    assert checks["cuda"]["data"]["available"] == torch.cuda.is_available()
    # Tests run with an empty private TORCH_HOME: the weights are truthfully absent.
    weights = checks["encodec_24khz weights"]
    assert weights["level"] == "warn"
    assert doctor.ENCODEC_24KHZ_CHECKPOINT in weights["data"]["path"]


def test_doctor_human_output() -> None:
    r = _duplex("doctor")
    assert r.returncode == 0
    assert "[ok  ] torch" in r.stdout
    assert "install looks healthy" in r.stdout


def test_doctor_fails_on_mismatched_torchaudio(monkeypatch) -> None:
    real = doctor._dist_version

    def fake(name: str) -> str | None:
        return "2.0.1" if name == "torchaudio" else real(name)

    monkeypatch.setattr(doctor, "_dist_version", fake)
    checks = {c.name: c for c in doctor.check_torch_stack()}
    ta = checks["torchaudio"]
    assert ta.level == "error"
    assert "does not match" in ta.detail and ta.hint


def test_doctor_exit_status_on_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        doctor, "run_checks", lambda: [doctor.Check("torch", "error", "broken", "reinstall")]
    )
    import argparse

    assert doctor.run(argparse.Namespace(json=False)) == 1
    out = capsys.readouterr().out
    assert "[FAIL] torch: broken" in out and "hint: reinstall" in out


def test_doctor_checks_the_weights_it_finds_in_the_hub_cache(tmp_path, monkeypatch) -> None:
    from duplex.codecs import encodec_stream

    # The doctor's idea of valid weights is the loader's.
    assert doctor.ENCODEC_24KHZ_CHECKPOINT == encodec_stream.CHECKPOINT_NAME
    assert doctor.ENCODEC_24KHZ_SHA256_PREFIX == encodec_stream.CHECKPOINT_SHA256_PREFIX
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints" / doctor.ENCODEC_24KHZ_CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    # Junk under the right name is found, and reported as what it is.
    ckpt.write_bytes(b"x" * 1000)
    c = doctor.check_encodec_weights()
    assert c.level == "error", c
    assert str(ckpt) in c.detail and "corrupt" in c.detail and "delete it" in c.hint
    # A file with the expected digest is ok (the real 90 MB checkpoint is not in the tests:
    # expect this file's digest instead).
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    monkeypatch.setattr(doctor, "ENCODEC_24KHZ_SHA256_PREFIX", digest[:8])
    c = doctor.check_encodec_weights()
    assert c.level == "ok", c
    assert str(ckpt) in c.detail and c.data["sha256"] == digest
