"""Audio I/O backends behind one interface: frames in at the codec rate, frames out.

The engine calls `read_frame()` once per step (it returns one frame of `frame_size` float32
samples, or None when the input has ended) and `write_frame()` with one frame of output.
Backends:

- `DeviceAudio`: a PortAudio duplex stream (sounddevice). Its callback only copies into and
  out of bounded FIFOs and counts status flags; it never blocks and never allocates much. The
  device paces the loop: `read_frame` waits for the next microphone frame.
- `FileAudio`: a WAV (or any libsndfile format) in, a WAV out; paced at the frame rate
  (`realtime=True`) or as fast as possible.
- `NullAudio`: silence in for a given number of frames, output discarded; optionally paced.

Counters every backend exposes: dropped_input_frames, output_underruns, input_overflows,
output_underflows.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from duplex.codecs.resample import StreamResampler
from duplex.streamer.fifo import BlockFifo, FrameFifo

if TYPE_CHECKING:
    from duplex.streamer.echo import EchoCanceller, EchoSettings


class AudioUnavailableError(RuntimeError):
    """No usable audio device: the message says what to do instead."""


class FrameClock:
    """Deadlines at the frame rate; `wait()` sleeps until the next one (never drifts)."""

    def __init__(self, frame_rate: float) -> None:
        self.period = 1.0 / frame_rate
        self.t0: float | None = None
        self.n = 0

    def wait(self) -> float:
        """Sleep until frame n's deadline; returns how late we already were (s, >= 0)."""
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        deadline = self.t0 + self.n * self.period
        self.n += 1
        if deadline > now:
            time.sleep(deadline - now)
            return 0.0
        return now - deadline


class AudioBackend:
    """Common counters and the frame interface."""

    def __init__(self, sample_rate: int, frame_size: int) -> None:
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self.dropped_input_frames = 0
        self.output_underruns = 0
        self.input_overflows = 0
        self.output_underflows = 0

    def start(self) -> None:
        pass

    def read_frame(self) -> np.ndarray | None:
        raise NotImplementedError

    def write_frame(self, pcm: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {
            "device_restarts": getattr(self, "restarts", 0),
            "dropped_input_frames": self.dropped_input_frames,
            "output_underruns": self.output_underruns,
            "input_overflows": self.input_overflows,
            "output_underflows": self.output_underflows,
        }

    def __enter__(self) -> AudioBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullAudio(AudioBackend):
    """Silence in (for `frames` frames, or forever with None), output discarded."""

    def __init__(
        self, sample_rate: int, frame_size: int, frames: int | None = None, realtime: bool = False
    ) -> None:
        super().__init__(sample_rate, frame_size)
        self.frames = frames
        self.n = 0
        self.clock = FrameClock(sample_rate / frame_size) if realtime else None

    def read_frame(self) -> np.ndarray | None:
        if self.frames is not None and self.n >= self.frames:
            return None
        if self.clock is not None:
            self.clock.wait()
        self.n += 1
        return np.zeros(self.frame_size, dtype=np.float32)

    def write_frame(self, pcm: np.ndarray) -> None:
        pass


def read_audio_file(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """A whole audio file as mono float32 at `sample_rate` (mixed down, resampled)."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input audio file {p} does not exist")
    try:
        wav, sr = sf.read(p, dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read {p} as audio: {e}") from None
    x = wav.mean(axis=1)
    if sr != sample_rate:
        import torch

        from duplex.codecs.resample import resample

        x = resample(torch.from_numpy(x), sr, sample_rate).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class FileAudio(AudioBackend):
    """Frames from an audio file (or silence), frames to a WAV file (or nowhere).

    The input is cut into frames; a last partial frame is padded with silence. After the input
    ends, `tail_frames` frames of silence let the model finish speaking before None is returned.
    """

    def __init__(
        self,
        sample_rate: int,
        frame_size: int,
        input_path: str | os.PathLike | None = None,
        output_path: str | os.PathLike | None = None,
        realtime: bool = False,
        tail_frames: int = 0,
        silence_frames: int = 0,
        signal: np.ndarray | None = None,
    ) -> None:
        super().__init__(sample_rate, frame_size)
        if signal is not None:
            # Audio already in memory at the codec rate (a recording being replayed).
            x = np.asarray(signal, dtype=np.float32).reshape(-1)
        elif input_path is not None:
            x = read_audio_file(input_path, sample_rate)
        else:
            x = np.zeros(silence_frames * frame_size, dtype=np.float32)
        pad = (-x.size) % frame_size + tail_frames * frame_size
        self.signal = np.concatenate([x, np.zeros(pad, dtype=np.float32)])
        self.pos = 0
        self.output_path = Path(output_path) if output_path is not None else None
        self._out = None
        self.clock = FrameClock(sample_rate / frame_size) if realtime else None

    def start(self) -> None:
        if self.output_path is not None and self._out is None:
            import soundfile as sf

            self.output_path.parent.mkdir(parents=True, exist_ok=True)
            self._out = sf.SoundFile(
                self.output_path, "w", samplerate=self.sample_rate, channels=1, subtype="PCM_16"
            )

    def read_frame(self) -> np.ndarray | None:
        if self.pos + self.frame_size > self.signal.size:
            return None
        if self.clock is not None:
            self.clock.wait()
        f = self.signal[self.pos : self.pos + self.frame_size].copy()
        self.pos += self.frame_size
        return f

    def write_frame(self, pcm: np.ndarray) -> None:
        if self.output_path is not None and self._out is None:
            self.start()
        if self._out is not None:
            self._out.write(np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0))

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _import_sounddevice():
    try:
        import sounddevice as sd
    except OSError as e:
        raise AudioUnavailableError(
            f"PortAudio is not installed ({e}). Install libportaudio2, or run on files: "
            "`--input in.wav --output out.wav`. `duplex doctor` checks the install."
        ) from None
    return sd


def find_device(spec: str | int | None, kind: str) -> int | None:
    """A device index from an index, a (case-insensitive) name fragment, or None (default)."""
    sd = _import_sounddevice()
    devices = sd.query_devices()
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    usable = [i for i, d in enumerate(devices) if d[key] > 0]
    if not usable:
        raise AudioUnavailableError(
            f"no audio {kind} device found. Use `--input in.wav --output out.wav` to run on files, "
            "or start PulseAudio; `duplex doctor` lists what PortAudio sees."
        )
    if spec is None or spec == "":
        return None
    if isinstance(spec, int) or str(spec).isdigit():
        i = int(spec)
        if i not in usable:
            raise AudioUnavailableError(
                f"device {i} is not an audio {kind} device; see `duplex doctor`"
            )
        return i
    matches = [i for i in usable if str(spec).lower() in devices[i]["name"].lower()]
    if not matches:
        names = ", ".join(f"[{i}] {devices[i]['name']}" for i in usable)
        raise AudioUnavailableError(f"no {kind} device matches {spec!r}; available: {names}")
    return matches[0]


class DeviceAudio(AudioBackend):
    """Microphone and speaker through two PortAudio streams, one each way (int16 on the wire).

    The stream runs at the codec rate when the device accepts it, else at the device's default
    rate with streaming resamplers on both sides.
    """

    def __init__(
        self,
        sample_rate: int,
        frame_size: int,
        input_device: str | int | None = None,
        output_device: str | int | None = None,
        blocksize: int = 0,
        max_queue_frames: int = 16,
        prefill_frames: int = 2,
        latency: str | float = "high",
        max_restarts: int = 20,
        startup_s: float = 5.0,
        echo: EchoSettings | None = None,
    ) -> None:
        super().__init__(sample_rate, frame_size)
        self.latency = latency
        self.restarts = 0
        self.max_restarts = max_restarts
        self.startup_s = startup_s
        self.sd = _import_sounddevice()
        self.in_dev = find_device(input_device, "input")
        self.out_dev = find_device(output_device, "output")
        self.device_rate = self._choose_rate()
        self.in_fifo = FrameFifo(frame_size, max_frames=max_queue_frames)
        self.out_fifo = BlockFifo(frame_size, max_frames=max_queue_frames, prefill=prefill_frames)
        self.blocksize = blocksize
        self.in_stream = self.out_stream = None
        self._opened_at = -math.inf
        if self.device_rate != sample_rate:
            self._up = StreamResampler(self.device_rate, sample_rate)
            self._down = StreamResampler(sample_rate, self.device_rate)
            self._out_dev_fifo = BlockFifo(1024, max_frames=64)
        else:
            self._up = self._down = None
        # Echo cancellation runs at the device rate on the reader thread: the callbacks only
        # tap what was played and queue what was captured, in 10 ms chunks.
        self.echo: EchoCanceller | None = None
        self.raw_frame: np.ndarray | None = None
        if echo is not None and echo.active:
            from duplex.streamer.echo import EchoCanceller, EchoUnavailableError

            try:
                self.echo = EchoCanceller(self.device_rate, echo)
            except EchoUnavailableError as e:
                raise AudioUnavailableError(str(e)) from None
            chunks = max_queue_frames * (
                -(-frame_size * self.device_rate // sample_rate) // self.echo.chunk + 1
            )
            self._mic_fifo = FrameFifo(self.echo.chunk, max_frames=chunks)
            self._mic_dropped = 0
            self.raw_fifo = FrameFifo(frame_size, max_frames=max_queue_frames)
            self._up_raw = StreamResampler(self.device_rate, sample_rate) if self._up else None

    def _choose_rate(self) -> int:
        try:
            self.sd.check_input_settings(
                self.in_dev, channels=1, dtype="int16", samplerate=self.sample_rate
            )
            self.sd.check_output_settings(
                self.out_dev, channels=1, dtype="int16", samplerate=self.sample_rate
            )
            return self.sample_rate
        except Exception:
            info = self.sd.query_devices(self.in_dev, "input")
            return int(info["default_samplerate"])

    def _in_callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.input_overflows += 1
        x = indata[:, 0].astype(np.float32) / 32768.0
        if self.echo is not None:
            self._mic_fifo.push(x)
            return
        if self._up is not None:
            x = self._up.process(x)
        self.in_fifo.push(x)

    def _out_callback(self, outdata, frames, time_info, status) -> None:
        if status.output_underflow:
            self.output_underflows += 1
        fifo = self.out_fifo if self._down is None else self._out_dev_fifo
        y = fifo.pull(frames)
        if self.echo is not None:
            self.echo.play(y)
        outdata[:, 0] = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)

    @property
    def streams(self) -> list:
        return [s for s in (self.in_stream, self.out_stream) if s is not None]

    def start(self) -> None:
        """Open one input and one output stream. Two half-duplex streams rather than one duplex
        stream: PortAudio's ALSA duplex stream couples both directions in one poll loop and
        gives up on both when the sound server stalls either."""
        if self.streams:
            return
        common = dict(
            samplerate=self.device_rate,
            blocksize=self.blocksize,
            channels=1,
            dtype="int16",
            latency=self.latency,
        )
        try:
            self.in_stream = self.sd.InputStream(
                device=self.in_dev, callback=self._in_callback, **common
            )
            self.out_stream = self.sd.OutputStream(
                device=self.out_dev, callback=self._out_callback, **common
            )
            self.out_stream.start()
            self.in_stream.start()
            self._opened_at = time.monotonic()
            if self.echo is not None:
                self.echo.restart(self.latency_s())
        except Exception as e:
            self._close_streams()
            raise AudioUnavailableError(
                f"cannot open the audio device ({e}). Try `--device NAME`, or run on files with "
                "`--input in.wav --output out.wav`; `duplex doctor` lists the devices."
            ) from None

    def _close_streams(self) -> None:
        for st in self.streams:
            with contextlib.suppress(Exception):
                st.stop()
            with contextlib.suppress(Exception):
                st.close()
        self.in_stream = self.out_stream = None

    def latency_s(self) -> float:
        """The echo path's delay as PortAudio reports it: output plus input latency (the
        starting point before the canceller measures it)."""
        return sum(float(st.latency) for st in self.streams)

    def _pump_echo(self) -> None:
        """Cancel the echo in every whole 10 ms chunk captured so far, in order."""
        echo = self.echo
        lost = self._mic_fifo.dropped_frames - self._mic_dropped
        if lost:
            self._mic_dropped += lost
            echo.skip(lost * echo.chunk)
        while (chunk := self._mic_fifo.pop()) is not None:
            clean = echo.process(chunk)
            if self._up is not None:
                clean = self._up.process(clean)
                chunk = self._up_raw.process(chunk)
            self.in_fifo.push(clean)
            self.raw_fifo.push(chunk)

    def read_frame(self, timeout: float = 2.0) -> np.ndarray | None:
        """The next microphone frame (echo-cancelled when the device has a canceller; the
        microphone's own frame is then in `raw_frame`). A stream that PortAudio gave up on (it
        does after a long stall, e.g. a starved sound server) is reopened, at most
        `max_restarts` times in all; so is one that still reports itself active but delivered
        nothing for `timeout` seconds (a sound server that froze and came back can leave such a
        stream). Only a second silent `timeout` after that reopening is an error. A stream
        opened less than `startup_s` ago is given that long for its first frames (PortAudio's
        ALSA path with high latency takes about 1.7 s on PulseAudio)."""
        deadline = time.monotonic() + timeout
        reopened = False
        while True:
            if self.echo is not None:
                self._pump_echo()
            f = self.in_fifo.pop()
            if f is not None:
                self.dropped_input_frames = self.in_fifo.dropped_frames
                if self.echo is not None:
                    self.raw_frame = self.raw_fifo.pop()
                return f
            if self.streams and not all(st.active for st in self.streams):
                self._restart()
                deadline = time.monotonic() + timeout
            if time.monotonic() > max(deadline, self._opened_at + self.startup_s):
                if reopened or self.restarts >= self.max_restarts:
                    raise AudioUnavailableError(
                        f"the audio device stopped delivering input (silent for {timeout:g} s"
                        f"{', also after reopening it' if reopened else ''})"
                    )
                self._restart()
                reopened = True
                deadline = time.monotonic() + timeout
            time.sleep(0.001)

    def _restart(self) -> None:
        if self.restarts >= self.max_restarts:
            raise AudioUnavailableError(
                f"the audio stream failed {self.restarts + 1} times; giving up"
            )
        self.restarts += 1
        self._close_streams()
        self.start()

    def write_frame(self, pcm: np.ndarray) -> None:
        if self._down is None:
            self.out_fifo.push(pcm)
        else:
            self._out_dev_fifo.push(self._down.process(np.asarray(pcm, np.float32)))
        self.output_underruns = (
            self.out_fifo.underruns if self._down is None else self._out_dev_fifo.underruns
        )

    def close(self) -> None:
        self._close_streams()
