"""A real 10 s conversation through PortAudio on the PulseAudio null sink."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.audio import DeviceAudio
from duplex.streamer.conversation import run
from duplex.streamer.engine import Engine, SamplingConfig

pytestmark = [pytest.mark.audio, pytest.mark.slow]


class TappedAudio(DeviceAudio):
    """The device, keeping what the engine heard and what it played."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heard: list[np.ndarray] = []
        self.played: list[np.ndarray] = []

    def read_frame(self, timeout: float = 2.0) -> np.ndarray | None:
        f = super().read_frame(timeout)
        if f is not None:
            self.heard.append(f.copy())
        return f

    def write_frame(self, pcm: np.ndarray) -> None:
        self.played.append(np.asarray(pcm, np.float32).reshape(-1).copy())
        super().write_frame(pcm)


def _best_match(chunk: np.ndarray, x: np.ndarray) -> float:
    """The highest normalised correlation of `chunk` with any same-length window of `x`."""
    chunk, x = chunk.astype(np.float64), x.astype(np.float64)
    m, n = chunk.size, x.size + chunk.size
    corr = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(chunk, n)), n)[: x.size - m + 1]
    energy = np.concatenate([[0.0], np.cumsum(x * x)])
    local = np.sqrt(np.maximum(energy[m:] - energy[:-m], 0.0))
    return float(np.max(corr / (local * np.linalg.norm(chunk) + 1e-9)))


def test_ten_seconds_through_the_null_sink(pulse_sink) -> None:
    torch.manual_seed(0)
    codec = SmallCodec(SmallCodecConfig()).eval()
    model = load("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (
            Engine(model, codec, slots=1) as engine,
            TappedAudio(codec.sample_rate, codec.frame_size, "pulse", "pulse") as audio,
        ):
            session = engine.join(SamplingConfig(seed=0))
            frames = run(engine, session, audio, max_frames=500)
            snap = engine.stats.snapshot()
    finally:
        torch.set_num_threads(threads)
    assert frames == 500 and session.frame == 500
    assert snap["frames"] == 500
    counters = (
        "dropped_input_frames",
        "output_underruns",
        "input_overflows",
        "output_underflows",
        "device_restarts",
    )
    for key in counters:
        assert isinstance(snap[key], int) and snap[key] >= 0
    assert snap["stages_ms"]["total"]["count"] == 500
    # Audio flowed both ways: what the engine played came back on the microphone (the
    # sink's monitor). Chunk by chunk, since a loaded machine drops input frames and inserts
    # silence on underruns; the resampling in the sound server caps the match near 0.83.
    heard, played = np.concatenate(audio.heard), np.concatenate(audio.played)
    assert heard.size == played.size == 500 * codec.frame_size
    chunk = 5 * codec.frame_size
    # The last 2 s may still be in flight when the microphone stops.
    matches = [
        _best_match(played[i : i + chunk], heard) for i in range(0, 400 * codec.frame_size, chunk)
    ]
    good = sum(r > 0.7 for r in matches)
    assert good >= len(matches) // 4, (
        f"only {good} of {len(matches)} played chunks came back on the microphone: "
        f"{np.round(matches, 2).tolist()}; counters {snap}"
    )
    print("device run counters:", {k: snap[k] for k in snap if k != "stages_ms"})
