"""Shared fixtures. `pulse_sink` starts a private PulseAudio daemon with a null sink: a real,
real-time paced audio device on a machine with no sound card."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never download: point torch hub at an empty private folder unless the user set one.
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="duplex-torch-home-"))

import torch

# One intra-op thread: the test tensors are small, and on a 2-core machine shared with other
# processes (subprocess tests, the sound server) more threads oversubscribe and run far slower.
torch.set_num_threads(1)


@dataclass
class PulseSink:
    """A running private PulseAudio daemon; `env` routes clients to it."""

    runtime_dir: Path
    sink: str
    env: dict[str, str]
    pid: int


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"pulseaudio exited with status {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"pulseaudio socket {path} did not appear within {timeout} s")


@pytest.fixture(scope="session")
def pulse_sink() -> Iterator[PulseSink]:
    """Start `pulseaudio` with a null sink in its own XDG_RUNTIME_DIR; stop it afterwards.

    While the fixture is active, this process's environment routes PortAudio (through ALSA's
    pulse plugin) to the sink, and its monitor is the default source, so what is played comes back
    on the input. Environment changes are undone and the daemon is killed even on failure.
    """
    exe = shutil.which("pulseaudio")
    if exe is None:
        pytest.fail("pulseaudio is not installed: run `make setup` (scripts/sysdeps.sh)")
    runtime = Path(tempfile.mkdtemp(prefix="duplex-pulse-"))
    sink = f"duplex_test_{os.getpid()}"
    env_update = {
        "XDG_RUNTIME_DIR": str(runtime),
        "PULSE_RUNTIME_PATH": str(runtime / "pulse"),
        "PULSE_SERVER": f"unix:{runtime / 'pulse' / 'native'}",
        "PULSE_SINK": sink,
        "PULSE_SOURCE": f"{sink}.monitor",
    }
    env = {**os.environ, **env_update, "HOME": str(runtime)}
    log = open(runtime / "pulseaudio.log", "w")
    proc = subprocess.Popen(
        [
            exe,
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "--log-target=stderr",
            "-L",
            "module-native-protocol-unix",
            "-L",
            f"module-null-sink sink_name={sink} rate=48000",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    saved = {k: os.environ.get(k) for k in env_update}
    try:
        _wait_for_socket(runtime / "pulse" / "native", proc)
        subprocess.run(["pactl", "set-default-sink", sink], env=env, check=True, timeout=10)
        subprocess.run(
            ["pactl", "set-default-source", f"{sink}.monitor"], env=env, check=True, timeout=10
        )
        os.environ.update(env_update)
        _reinit_portaudio()
        yield PulseSink(runtime_dir=runtime, sink=sink, env=env, pid=proc.pid)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        _reinit_portaudio()
        shutil.rmtree(runtime, ignore_errors=True)


def _reinit_portaudio() -> None:
    """PortAudio lists devices once at initialisation: re-initialise after the server changes."""
    import sounddevice as sd

    sd._terminate()
    sd._initialize()
