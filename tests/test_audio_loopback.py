"""A tone played through sounddevice comes back through the null sink's monitor."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.audio


def _pulse_device(sd) -> int:
    for i, d in enumerate(sd.query_devices()):
        if d["name"] == "pulse" and d["max_input_channels"] > 0 and d["max_output_channels"] > 0:
            return i
    names = [d["name"] for d in sd.query_devices()]
    raise AssertionError(f"no 'pulse' ALSA device among {names}")


def _probe(sr: int, seconds: float, seed: int) -> np.ndarray:
    """A tone plus a chirp: correlates sharply at one lag only, unlike a pure tone."""
    t = np.arange(int(sr * seconds)) / sr
    tone = np.sin(2 * np.pi * 440.0 * t)
    f0, f1 = 200.0, 3000.0
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    rng = np.random.default_rng(seed)
    sig = 0.25 * tone + 0.25 * chirp + 0.05 * rng.standard_normal(t.size)
    return sig.astype(np.float64)


def test_tone_round_trip_through_null_sink(pulse_sink) -> None:
    import sounddevice as sd

    sr = 48000
    dev = _pulse_device(sd)
    probe = _probe(sr, 1.0, seed=1)
    lead = np.zeros(sr // 2)
    tail = np.zeros(sr)
    played = np.concatenate([lead, probe, tail])
    out = np.round(played * 32767).astype(np.int16)[:, None]
    rec = sd.playrec(
        out, samplerate=sr, channels=1, dtype="int16", device=(dev, dev), blocking=True
    )
    got = rec[:, 0].astype(np.float64) / 32767

    assert np.abs(got).max() > 0.05, "nothing came back from the sink monitor"
    # Find the delay by cross-correlation, then compare the aligned segment.
    corr = np.correlate(got, probe, mode="valid")
    lag = int(np.argmax(corr))
    seg = got[lag : lag + probe.size]
    r = np.corrcoef(seg, probe)[0, 1]
    assert r > 0.95, f"recorded audio correlates only {r:.3f} with the played probe (lag {lag})"
    # A different probe must not match: the test can fail.
    other = _probe(sr, 1.0, seed=2)
    other_r = np.corrcoef(seg, np.roll(other, 12345))[0, 1]
    assert abs(other_r) < 0.5


def test_doctor_sees_pulse_device(pulse_sink) -> None:
    from duplex.apps import doctor

    checks = {c.name: c for c in doctor.run_checks()}
    audio = checks["audio devices"]
    assert audio.level == "ok", audio.detail
    names = [d["name"] for d in audio.data["devices"]]
    assert "pulse" in names
    assert "server" in checks["pulseaudio"].detail
