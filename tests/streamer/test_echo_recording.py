"""`duplex connect --record` with an echo canceller: the raw microphone, which never crosses the
wire, goes to mic.wav beside in.wav (what was sent, after cancellation), frame for frame."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from duplex.apps import protocol as P
from duplex.apps.client_audio import DeviceSource
from duplex.apps.remote_recording import RemoteRecorder
from duplex.streamer.echo import EchoSettings
from duplex.streamer.recording import Recording

SR, FS = 24000, 480


def _hello() -> P.Hello:
    return P.Hello(
        version=1,
        model="tiny",
        codec="default",
        model_fingerprint="m",
        codec_fingerprint="c",
        sample_rate=SR,
        frame_size=FS,
        frame_rate=SR / FS,
        num_codebooks=8,
        cardinality=1024,
        accepts=["pcm"],
        session="s1",
        max_message_bytes=1 << 16,
    )


class _FakeDevice:
    """A device with a canceller: `read_frame` gives the cancelled frame, `raw_frame` the mic."""

    def __init__(self, raw: list[np.ndarray], cancelled: list[np.ndarray]) -> None:
        self.echo = SimpleNamespace(settings=EchoSettings())
        self.raw, self.cancelled = raw, cancelled
        self.raw_frame: np.ndarray | None = None

    def read_frame(self) -> np.ndarray:
        self.raw_frame = self.raw.pop(0)
        return self.cancelled.pop(0)


async def test_connect_recording_keeps_the_raw_microphone_beside_what_was_sent(tmp_path) -> None:
    rng = np.random.default_rng(0)
    raw = [(0.3 * rng.standard_normal(FS)).astype(np.float32) for _ in range(4)]
    cancelled = [(0.05 * rng.standard_normal(FS)).astype(np.float32) for _ in range(4)]
    recorder = RemoteRecorder(tmp_path / "rec", "ws://x")
    recorder.begin(_hello())
    client = SimpleNamespace(recorder=recorder)
    source = DeviceSource(_FakeDevice(list(raw), list(cancelled)), client)

    loop = asyncio.get_running_loop()
    for seq in range(4):
        frame = await source.read(loop)
        # What the client does with it (remote_client._send): int16 on the wire.
        recorder.sent_frame(seq, P.pcm_to_int16(frame))
    out = np.zeros(FS, np.int16)
    # The server dropped frame 1: neither its sent frame nor its raw microphone is recorded.
    for seq in (0, 2, 3):
        recorder.received(P.Tokens(seq, [1] * 8, [2] * 11))
        recorder.received(P.Audio(seq, out))
    recorder.close()
    rec = Recording.load(tmp_path / "rec")
    kept = [0, 2, 3]
    q = lambda x: P.int16_to_pcm(P.pcm_to_int16(x))  # noqa: E731
    assert np.array_equal(rec.audio_in, np.concatenate([q(cancelled[k]) for k in kept]))
    assert rec.audio_mic is not None
    assert np.array_equal(rec.audio_mic, np.concatenate([q(raw[k]) for k in kept]))
    echo = [c for c in rec.controls if c["kind"] == "echo"]
    assert len(echo) == 1 and echo[0]["i"] == 0 and echo[0]["aec"] is True, rec.controls


async def test_without_a_canceller_no_mic_wav(tmp_path) -> None:
    device = _FakeDevice([np.zeros(FS, np.float32)], [np.zeros(FS, np.float32)])
    device.echo = None
    recorder = RemoteRecorder(tmp_path / "rec", "ws://x")
    recorder.begin(_hello())
    source = DeviceSource(device, SimpleNamespace(recorder=recorder))
    frame = await source.read(asyncio.get_running_loop())
    recorder.sent_frame(0, P.pcm_to_int16(frame))
    recorder.received(P.Audio(0, np.zeros(FS, np.int16)))
    recorder.close()
    assert not (tmp_path / "rec" / "mic.wav").exists()
    assert (tmp_path / "rec" / "in.wav").exists()
