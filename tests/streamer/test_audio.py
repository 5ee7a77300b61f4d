"""Audio backends: files, null, and a real PortAudio device on the PulseAudio null sink."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import soundfile as sf

from duplex.streamer.audio import (
    AudioUnavailableError,
    DeviceAudio,
    FileAudio,
    FrameClock,
    NullAudio,
    find_device,
)

SR, FS = 16000, 320


def test_file_in_file_out(tmp_path) -> None:
    x = (0.3 * np.sin(np.arange(SR) * 0.05)).astype(np.float32)
    sf.write(tmp_path / "in.wav", x, SR, subtype="PCM_16")
    io = FileAudio(SR, FS, tmp_path / "in.wav", tmp_path / "out.wav", tail_frames=3)
    n = 0
    with io:
        while (f := io.read_frame()) is not None:
            assert f.shape == (FS,)
            io.write_frame(f)
            n += 1
    assert n == -(-SR // FS) + 3
    y, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    assert sr == SR and y.size == n * FS
    np.testing.assert_allclose(y[: x.size], x, atol=2 / 32767)


def test_file_input_is_resampled_and_mixed_down(tmp_path) -> None:
    # Different tones and levels per channel: the mixdown is their mean, so both tones come
    # through at half their level (a one-channel or summed mixdown fails).
    t = np.arange(48000) / 48000
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 700 * t)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1).astype(np.float32), 48000)
    io = FileAudio(SR, FS, tmp_path / "s.wav")
    assert abs(io.signal.size - SR) < FS
    # 1 s at 16 kHz: 1 Hz bins, amplitude 2|X|/N; the resampled tones stay at 300 and 700 Hz.
    amp = 2 * np.abs(np.fft.rfft(io.signal[:SR])) / SR
    assert set(np.argsort(amp)[-2:].tolist()) == {300, 700}
    np.testing.assert_allclose([amp[300], amp[700]], [0.2, 0.1], rtol=0.05)


def test_missing_and_bad_input_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FileAudio(SR, FS, tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read"):
        FileAudio(SR, FS, tmp_path / "bad.wav")


def test_null_and_clock() -> None:
    io = NullAudio(SR, FS, frames=3)
    assert [io.read_frame() is not None for _ in range(4)] == [True, True, True, False]
    clock = FrameClock(200.0)
    import time

    t0 = time.monotonic()
    for _ in range(11):
        clock.wait()
    assert time.monotonic() - t0 >= 0.049


@pytest.mark.audio
def test_device_loopback_through_null_sink(pulse_sink) -> None:
    """Frames written to the speaker come back from the microphone (the sink's monitor)."""
    sr, fs = 24000, 320
    rng = np.random.default_rng(0)
    # Noise band-limited below 6 kHz: the sound server resamples, which dulls the top octave.
    spec = np.fft.rfft(rng.standard_normal(fs * 150))
    spec[np.fft.rfftfreq(fs * 150, 1 / sr) > 6000] = 0
    probe = np.fft.irfft(spec, fs * 150)
    probe = (0.3 * probe / probe.std()).astype(np.float32)
    got = []
    lead = 50
    with DeviceAudio(sr, fs, "pulse", "pulse") as io:
        # Half a second of silence first: the streams fill their buffers as they start.
        for i in range(lead + 150 + 75):
            f = io.read_frame()
            got.append(f)
            j = i - lead
            out = probe[j * fs : (j + 1) * fs] if 0 <= j < 150 else np.zeros(fs, np.float32)
            io.write_frame(out)
        counters = io.counters()
    rec = np.concatenate(got)
    # The sound server resamples (24 -> 48 -> 24 kHz), which can delay by a fraction of a
    # sample; compare against the probe delayed by the best of a few fractional offsets.
    n = probe.size
    k = np.fft.rfftfreq(n) * n
    shifted = [
        np.fft.irfft(np.fft.rfft(probe) * np.exp(-2j * np.pi * k * d / n), n)
        for d in (-0.5, -0.25, 0.0, 0.25, 0.5)
    ]
    # Chunk by chunk: a scheduling glitch on this shared machine may insert silence (counted as
    # an underrun) and shift what follows, but every chunk must come back intact and in order.
    chunk = fs * 10
    lags, good = [], 0
    for c in range(probe.size // chunk):
        ref = probe[c * chunk : (c + 1) * chunk]
        lag = int(np.argmax(np.correlate(rec, ref, mode="valid")))
        seg = rec[lag : lag + chunk]
        best = max(np.corrcoef(seg, p[c * chunk : (c + 1) * chunk])[0, 1] for p in shifted)
        good += best > 0.95
        lags.append(lag)
    assert good >= 12, (
        f"only {good} of 15 chunks came back intact; counters {counters}; "
        f"recorded peak {np.abs(rec).max():.3f}, lags {lags}"
    )
    assert lags == sorted(lags), f"chunks came back out of order: {lags}"
    assert set(counters) == {
        "device_restarts",
        "dropped_input_frames",
        "output_underruns",
        "input_overflows",
        "output_underflows",
    }


@pytest.mark.audio
def test_unknown_device_name_is_a_clear_error(pulse_sink) -> None:
    with pytest.raises(AudioUnavailableError, match="no input device matches"):
        find_device("no-such-device-xyz", "input")


NO_DEVICE = """
from duplex.streamer.audio import AudioUnavailableError, DeviceAudio
try:
    DeviceAudio(16000, 320)
except AudioUnavailableError as e:
    print("ERR", e)
"""


def test_no_device_is_a_clear_error(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", NO_DEVICE], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR no audio input device found")
    assert "--input in.wav" in r.stdout and "duplex doctor" in r.stdout


@pytest.mark.audio
def test_device_recovers_when_the_sound_server_freezes(pulse_sink) -> None:
    """The sound server frozen for longer than a read's timeout (SIGSTOP: what a daemon starved
    on a loaded machine looks like to its clients). The microphone goes silent while its stream
    still reports itself active; the device reopens its streams and frames flow again. Without
    the reopening, the first silent timeout is an error. The freeze comes after the opened
    streams' grace period (`startup_s`), so a reopening is needed to pass."""
    silence = np.zeros(FS, np.float32)
    with DeviceAudio(SR, FS, "pulse", "pulse", startup_s=3.0) as io:
        for _ in range(175):
            assert io.read_frame() is not None
            io.write_frame(silence)
        os.kill(pulse_sink.pid, signal.SIGSTOP)
        thaw = threading.Timer(1.5, os.kill, (pulse_sink.pid, signal.SIGCONT))
        thaw.start()
        try:
            got = []
            for _ in range(100):
                got.append(io.read_frame(timeout=1.0))
                io.write_frame(silence)
        finally:
            thaw.cancel()
            os.kill(pulse_sink.pid, signal.SIGCONT)
        assert all(f is not None and f.shape == (FS,) for f in got)
        assert io.counters()["device_restarts"] >= 1
