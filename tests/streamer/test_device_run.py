"""A real 10 s conversation through PortAudio on the PulseAudio null sink."""

from __future__ import annotations

import pytest
import torch

from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.audio import DeviceAudio
from duplex.streamer.conversation import run
from duplex.streamer.engine import Engine, SamplingConfig

pytestmark = [pytest.mark.audio, pytest.mark.slow]


def test_ten_seconds_through_the_null_sink(pulse_sink) -> None:
    torch.manual_seed(0)
    codec = SmallCodec(SmallCodecConfig()).eval()
    model = load("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (
            Engine(model, codec, slots=1) as engine,
            DeviceAudio(codec.sample_rate, codec.frame_size, "pulse", "pulse") as audio,
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
    print("device run counters:", {k: snap[k] for k in snap if k != "stages_ms"})
