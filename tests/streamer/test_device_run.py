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


class Matcher:
    """The best normalised correlation of short chunks with any same-length window of `x`."""

    def __init__(self, x: np.ndarray, longest: int) -> None:
        self.x = x.astype(np.float64)
        self.n = 1 << int(np.ceil(np.log2(x.size + longest)))
        self.spec = np.fft.rfft(self.x, self.n)
        self.energy = np.concatenate([[0.0], np.cumsum(self.x**2)])

    def __call__(self, chunk: np.ndarray) -> float:
        chunk = chunk.astype(np.float64)
        m = chunk.size
        corr = np.fft.irfft(self.spec * np.conj(np.fft.rfft(chunk, self.n)), self.n)
        local = np.sqrt(np.maximum(self.energy[m:] - self.energy[:-m], 0.0))
        return float(np.max(corr[: self.x.size - m + 1] / (local * np.linalg.norm(chunk) + 1e-9)))


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
    # sink's monitor). Frame by frame, since a loaded machine drops input frames and inserts
    # silence on underruns between frames; the resampling in the sound server caps a match
    # near 0.83, and a frame matched against unrelated audio scores about 0.3.
    heard, played = np.concatenate(audio.heard), np.concatenate(audio.played)
    fs = codec.frame_size
    assert heard.size == played.size == 500 * fs
    # Every 4th frame of the first 8 s (the last 2 s may still be in flight when the
    # microphone stops).
    match = Matcher(heard, fs)
    matches = [match(played[i * fs : (i + 1) * fs]) for i in range(0, 400, 4)]
    good = sum(r > 0.7 for r in matches)
    # On a quiet machine nearly all come back; with half the input frames dropped, half.
    assert good >= len(matches) // 5, (
        f"only {good} of {len(matches)} played frames came back on the microphone: "
        f"{np.round(matches, 2).tolist()}; counters {snap}"
    )
    print("device run counters:", {k: snap[k] for k in snap if k != "stages_ms"})
