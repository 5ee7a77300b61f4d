"""The two audio ends of `duplex connect`: what is sent (a file or the microphone) and where
the model's audio goes (a file or the speaker), opened once the server's HELLO gives the rate
and frame size."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np

from duplex.apps.jitter import JitterBuffer

if TYPE_CHECKING:
    from duplex.apps import protocol as P
    from duplex.apps.remote_client import Client


class FileSource:
    """Frames from a WAV file (resampled to the server's rate), then `tail` s of silence."""

    paced_by_device = False

    def __init__(self, path: str | None, seconds: float | None, tail: float) -> None:
        self.path, self.seconds, self.tail = path, seconds, tail
        self.audio = None

    async def read(self, loop: asyncio.AbstractEventLoop) -> np.ndarray | None:
        return self.audio.read_frame()

    def open(self, sample_rate: int, frame_size: int) -> None:
        from duplex.streamer.audio import FileAudio

        if self.audio is not None:
            return
        tail = round(self.tail * sample_rate / frame_size)
        silence = 0 if self.path else int((self.seconds or 10.0) * sample_rate / frame_size)
        self.audio = FileAudio(
            sample_rate, frame_size, self.path, None, tail_frames=tail, silence_frames=silence
        )


class DeviceSource:
    """Microphone frames (the device paces the sender). With an echo canceller the frame is the
    cancelled microphone; the raw one goes to the client's recording (`--record`: mic.wav), which
    only ever sees what crosses the wire."""

    paced_by_device = True

    def __init__(self, audio: Any, client: Client | None = None) -> None:
        self.audio = audio
        self.client = client

    async def read(self, loop: asyncio.AbstractEventLoop) -> np.ndarray | None:
        frame = await loop.run_in_executor(None, self.audio.read_frame)
        echo = getattr(self.audio, "echo", None)
        recorder = getattr(self.client, "recorder", None)
        raw = getattr(self.audio, "raw_frame", None)
        if frame is not None and echo is not None and recorder is not None and raw is not None:
            recorder.raw_mic(raw, echo.settings.as_dict())
        return frame


class Sink:
    """Where the model's audio goes: the speaker (through the jitter buffer's playout clock,
    so the listener hears its underruns) or a WAV file (every frame as received, in order, so
    the file is the model's reply whatever the network did; the jitter buffer still runs to
    report what a speaker would have played)."""

    def __init__(self, audio: Any | None, speaker: bool) -> None:
        self.audio = audio
        self.speaker = speaker

    def play(self, pcm: np.ndarray) -> None:
        if self.speaker and self.audio is not None:
            self.audio.write_frame(pcm)

    def received(self, pcm: np.ndarray) -> None:
        if not self.speaker and self.audio is not None:
            self.audio.write_frame(pcm)


class AudioEnds:
    """The client's audio: files (--input/--output) or the audio device, opened once the
    server's HELLO gives the rate and frame size (`prepare`), closed at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.opened: list[Any] = []

    def prepare(self, client: Client, hello: P.Hello) -> None:
        from duplex.streamer.audio import DeviceAudio, FileAudio

        args = self.args
        sr, fs = hello.sample_rate, hello.frame_size
        frame_ms = 1000.0 / hello.frame_rate
        target = max(1, round(args.jitter_ms / frame_ms))
        client.jitter = JitterBuffer(target, max(target, round(args.max_jitter_ms / frame_ms)))
        if args.input or args.output:
            source = FileSource(args.input, args.seconds, args.tail)
            source.open(sr, fs)
            out = FileAudio(sr, fs, None, args.output) if args.output else None
            if out is not None:
                out.start()
                self.opened.append(out)
            client.source, client.sink = source, Sink(out, speaker=False)
        else:
            from duplex.streamer.echo import EchoSettings

            echo = EchoSettings.from_args(args)
            device = DeviceAudio(sr, fs, args.device, args.device, echo=echo)
            device.start()
            self.opened.append(device)
            client.source, client.sink = DeviceSource(device, client), Sink(device, speaker=True)

    def close(self) -> None:
        for audio in self.opened:
            audio.close()
        self.opened.clear()
