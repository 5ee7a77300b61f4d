"""`duplex doctor`: tell the truth about this install, with a hint for every problem.

Each check returns a `Check`; a check at level "error" makes the exit status 1. Imports of heavy or
optional libraries happen inside the checks so a broken library is reported, not raised.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENCODEC_24KHZ_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
# The loader (duplex.codecs.encodec_stream) rejects a checkpoint whose sha256 does not start so.
ENCODEC_24KHZ_SHA256_PREFIX = "d7cc33bc"


@dataclass
class Check:
    """One line of the report: what was checked, what was found, and what to do about it."""

    name: str
    level: str
    detail: str
    hint: str = ""
    data: dict = field(default_factory=dict)


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _release(v: str) -> str:
    """'2.11.0+cpu' -> '2.11.0': the local build tag does not change the ABI release."""
    return v.split("+", 1)[0]


def check_python() -> Check:
    v = sys.version.split()[0]
    ok = sys.version_info >= (3, 10)
    return Check(
        "python",
        "ok" if ok else "error",
        f"{v} at {sys.executable}",
        "" if ok else "duplex needs Python >= 3.10",
    )


def check_torch_stack() -> list[Check]:
    out: list[Check] = []
    tv = _dist_version("torch")
    tav = _dist_version("torchaudio")
    if tv is None:
        return [Check("torch", "error", "not installed", "run `make setup` (pip install -e .)")]
    try:
        import torch

        out.append(
            Check("torch", "ok", f"{torch.__version__}", data={"version": torch.__version__})
        )
    except Exception as e:
        return [Check("torch", "error", f"{tv} installed but import fails: {e}", "reinstall torch")]
    if tav is None:
        out.append(
            Check(
                "torchaudio",
                "error",
                "not installed",
                f"pip install torchaudio=={_release(tv)} (must match torch)",
            )
        )
    elif _release(tav) != _release(tv):
        out.append(
            Check(
                "torchaudio",
                "error",
                f"{tav} does not match torch {tv}",
                f"pip install torch=={_release(tav)} or torchaudio=={_release(tv)}: "
                "`import encodec` imports torchaudio, whose binary must match torch",
            )
        )
    else:
        try:
            import torchaudio

            out.append(Check("torchaudio", "ok", f"{torchaudio.__version__} (matches torch)"))
        except Exception as e:
            out.append(
                Check("torchaudio", "error", f"{tav} import fails: {e}", "reinstall torchaudio")
            )
    trv = _dist_version("triton")
    if trv is None:
        out.append(
            Check(
                "triton",
                "ok",
                "not installed (CPU-only install: the PyTorch kernels are used)",
            )
        )
    else:
        out.append(Check("triton", "ok", f"{trv} (imported lazily, used on CUDA tensors)"))
    ev = _dist_version("encodec")
    if ev is None:
        out.append(Check("encodec", "error", "not installed", "pip install encodec==0.1.1"))
    else:
        try:
            importlib.import_module("encodec")
            out.append(Check("encodec", "ok", f"{ev}"))
        except Exception as e:
            out.append(
                Check(
                    "encodec",
                    "error",
                    f"{ev} import fails: {type(e).__name__}: {e}",
                    "usually a torch/torchaudio mismatch: install both at the same release",
                )
            )
    return out


def check_cuda() -> Check:
    try:
        import torch
    except Exception:
        return Check("cuda", "warn", "unknown (torch does not import)")
    built = torch.version.cuda
    if not torch.cuda.is_available():
        detail = "no GPU visible: running on CPU"
        if built:
            detail += f" (torch built with CUDA {built})"
        return Check("cuda", "ok", detail, data={"available": False, "built": built})
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check(
        "cuda",
        "ok",
        f"CUDA {built}, {len(gpus)} GPU(s): " + ", ".join(gpus),
        data={"available": True, "built": built, "gpus": gpus},
    )


def check_audio() -> list[Check]:
    out: list[Check] = []
    try:
        import sounddevice as sd
    except OSError as e:
        return [
            Check(
                "portaudio",
                "error",
                f"PortAudio library not found ({e})",
                "apt-get install libportaudio2 (or use --input/--output WAV files)",
            )
        ]
    except ImportError as e:
        return [Check("portaudio", "error", f"sounddevice missing: {e}", "pip install sounddevice")]
    out.append(Check("portaudio", "ok", sd.get_portaudio_version()[1]))
    try:
        devices = sd.query_devices()
    except Exception as e:
        return [*out, Check("audio devices", "warn", f"query failed: {e}")]
    listed = []
    for i, d in enumerate(devices):
        listed.append(
            {
                "index": i,
                "name": d["name"],
                "inputs": d["max_input_channels"],
                "outputs": d["max_output_channels"],
                "default_samplerate": d["default_samplerate"],
            }
        )
    default_in, default_out = sd.default.device
    names = {x["index"]: x["name"] for x in listed}
    din = names.get(default_in, "none")
    dout = names.get(default_out, "none")
    has_in = any(x["inputs"] > 0 for x in listed)
    has_out = any(x["outputs"] > 0 for x in listed)
    level = "ok" if (has_in and has_out) else "warn"
    hint = (
        ""
        if level == "ok"
        else "no usable audio device: use `--input in.wav --output out.wav`, or start PulseAudio"
    )
    detail = f"{len(listed)} device(s); default input: {din}; default output: {dout}"
    out.append(
        Check(
            "audio devices",
            level,
            detail,
            hint,
            data={"devices": listed, "default_input": din, "default_output": dout},
        )
    )
    for x in listed:
        out.append(
            Check(
                f"  [{x['index']}]",
                "ok",
                f"{x['name']} (in {x['inputs']}, out {x['outputs']}, "
                f"{x['default_samplerate']:.0f} Hz)",
            )
        )
    return out


def check_pulseaudio() -> Check:
    pactl = shutil.which("pactl")
    if pactl is None:
        return Check("pulseaudio", "ok", "pactl not installed (not needed with a sound card)")
    try:
        r = subprocess.run([pactl, "info"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return Check("pulseaudio", "warn", "pactl info timed out")
    if r.returncode != 0:
        return Check(
            "pulseaudio",
            "ok",
            "no PulseAudio server running",
            "without a sound card, a null sink gives a real paced device: see README",
        )
    info = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    return Check(
        "pulseaudio",
        "ok",
        f"server {info.get('Server Version', '?')}; default sink {info.get('Default Sink', '?')}",
    )


def encodec_cache_dir() -> Path:
    """Where torch.hub keeps checkpoints ($TORCH_HOME/hub/checkpoints)."""
    try:
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints"
    except Exception:
        home = os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch"))
        return Path(home) / "hub" / "checkpoints"


def check_encodec_weights() -> Check:
    folder = encodec_cache_dir()
    path = folder / ENCODEC_24KHZ_CHECKPOINT
    if path.is_file():
        mb = path.stat().st_size / 1e6
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        if not digest.startswith(ENCODEC_24KHZ_SHA256_PREFIX):
            return Check(
                "encodec_24khz weights",
                "error",
                f"{path} ({mb:.1f} MB) is corrupt or not EnCodec 24 kHz: sha256 {digest[:8]}..., "
                f"expected {ENCODEC_24KHZ_SHA256_PREFIX}...",
                f"delete it and put the real {ENCODEC_24KHZ_CHECKPOINT} there (or download it "
                "once with network access); the shipped default codec needs nothing",
                data={"path": str(path), "sha256": digest},
            )
        return Check(
            "encodec_24khz weights",
            "ok",
            f"{path} ({mb:.1f} MB, sha256 {digest[:8]}...)",
            data={"path": str(path), "sha256": digest},
        )
    return Check(
        "encodec_24khz weights",
        "warn",
        f"not in the torch hub cache (looked for {path})",
        f"only needed for --codec encodec_24khz: put {ENCODEC_24KHZ_CHECKPOINT} in {folder} "
        "(set TORCH_HOME to move it); the shipped default codec needs nothing",
        data={"path": str(path)},
    )


def shipped_weights() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    return sorted(root.rglob("*.safetensors"))


def check_shipped() -> Check:
    files = shipped_weights()
    root = Path(__file__).resolve().parent.parent
    if not files:
        return Check("shipped weights", "warn", f"none found under {root}")
    listed = ", ".join(f"{p.relative_to(root)} ({p.stat().st_size / 1e6:.2f} MB)" for p in files)
    return Check("shipped weights", "ok", listed, data={"files": [str(p) for p in files]})


def check_espeak() -> Check:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return Check(
            "espeak-ng",
            "warn",
            "not installed",
            "only needed to make training data: apt-get install espeak-ng",
        )
    return Check("espeak-ng", "ok", exe)


def check_echo() -> list[Check]:
    """The echo cancellers' libraries: talk and connect cancel the speaker's echo by default."""
    from duplex.streamer.echo import EchoUnavailableError, library_version

    checks = []
    for backend, hint in (
        ("speex", "apt-get install libspeexdsp1 (scripts/sysdeps.sh); or --aec-backend webrtc"),
        ("webrtc", "pip install livekit; only needed for --aec-backend webrtc"),
    ):
        name = f"echo canceller ({backend}{', default' if backend == 'speex' else ''})"
        try:
            checks.append(Check(name, "ok", library_version(backend)))
        except EchoUnavailableError as e:
            level = "warn" if backend == "webrtc" else "error"
            checks.append(Check(name, level, str(e), hint))
    return checks


def run_checks() -> list[Check]:
    checks = [check_python(), *check_torch_stack(), check_cuda()]
    checks += check_audio()
    checks += check_echo()
    checks += [check_pulseaudio(), check_encodec_weights(), check_shipped(), check_espeak()]
    return checks


_MARK = {"ok": "ok  ", "warn": "warn", "error": "FAIL"}


HELP = "check the install: versions, GPU, audio devices, codec weights"
DESCRIPTION = """Self-check for when something is off.

Reports torch/torchaudio/triton/encodec versions and whether they agree, CUDA and GPUs,
PortAudio and the audio devices it sees (with the defaults), the echo cancellers' libraries
(libspeexdsp, the default; livekit's WebRTC AEC3), whether a PulseAudio server runs,
whether the EnCodec 24 kHz weights are in the torch hub cache (and where they are looked for),
and the weights shipped inside the package.

Exit status: 1 when the install is broken (a FAIL line, each with a hint), else 0.
Warnings (no audio device, no EnCodec weights) do not fail: duplex runs on WAV files and on
its shipped codec without them."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from duplex import __version__

    checks = run_checks()
    broken = any(c.level == "error" for c in checks)
    if getattr(args, "json", False):
        report = {"version": __version__, "ok": not broken, "checks": [asdict(c) for c in checks]}
        print(json.dumps(report, indent=2))
    else:
        print(f"duplex {__version__}")
        for c in checks:
            print(f"[{_MARK[c.level]}] {c.name}: {c.detail}")
            if c.hint:
                print(f"       hint: {c.hint}")
        print("install is broken: see FAIL lines above" if broken else "install looks healthy")
    return 1 if broken else 0
