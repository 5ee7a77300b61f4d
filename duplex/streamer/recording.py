"""Session recordings: a directory that lets a conversation be replayed exactly, frame by frame.

    header.json    versions, config, seeds, model and codec fingerprints, audio format
    in.wav         the audio the model heard (int16 mono at the codec rate; with an echo
                   canceller on the device, its output)
    mic.wav        with an echo canceller, the raw microphone, frame for frame beside in.wav,
                   so a session can be re-checked with other settings
    out.wav        the audio the model spoke
    events.jsonl   one JSON object per line, keyed by frame index "i": a "frame" event per step
                   (tokens in/out, text, per-stage timings, drops) and "control" events (typed
                   text, mute, state loads, ...)

Everything is written as it goes: per frame, both WAV files get their samples and then their
header sizes, and only then is the frame's event line written and flushed. So a process killed
at any instant (kill -9 included) leaves a recording that loads up to its last complete frame.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


class RecordingError(ValueError):
    """A directory that is not a readable session recording."""


class _WavWriter:
    """A 16-bit mono WAV whose header is kept correct after every append."""

    def __init__(self, path: Path, sample_rate: int) -> None:
        self.f = open(path, "wb")
        self.samples = 0
        self.sample_rate = sample_rate
        self.f.write(self._header(0))
        self.f.flush()

    def _header(self, n: int) -> bytes:
        data = 2 * n
        return (
            b"RIFF"
            + struct.pack("<I", 36 + data)
            + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, self.sample_rate, 2 * self.sample_rate, 2, 16)
            + b"data"
            + struct.pack("<I", data)
        )

    def append(self, pcm: np.ndarray) -> None:
        x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self.f.seek(0, os.SEEK_END)
        self.f.write(np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2").tobytes())
        self.samples += x.size
        self.f.flush()
        fd = self.f.fileno()
        os.pwrite(fd, struct.pack("<I", 36 + 2 * self.samples), 4)
        os.pwrite(fd, struct.pack("<I", 2 * self.samples), 40)

    def close(self) -> None:
        self.f.close()


def recording_header(
    *,
    model: str,
    codec: str,
    sampling: dict[str, Any],
    model_fingerprint: str,
    codec_fingerprint: str,
    frame_rate: float,
    state: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The header of every recording, whoever makes it (talk, serve, connect): the config replay
    rebuilds the conversation from, the fingerprints it checks, and what else the maker adds
    (`extra`: server session, segment, source)."""
    config = {"model": model, "codec": codec, "sampling": sampling, "state": state}
    return {
        "config": config,
        "model_fingerprint": model_fingerprint,
        "codec_fingerprint": codec_fingerprint,
        "frame_rate": frame_rate,
        **extra,
    }


class RecordQuota:
    """Bytes a server may write into recordings, per session and in all, shared by recorders.

    `charge(key, n)` books n bytes for session `key` and says whether they fit; a recorder that
    is refused stops recording (its recording stays readable up to its last whole frame)."""

    def __init__(self, total_bytes: int, session_bytes: int, used: int = 0) -> None:
        self.total_bytes, self.session_bytes = total_bytes, session_bytes
        self.used = used
        self.by_key: dict[str, int] = {}

    @staticmethod
    def usage(directory: str | os.PathLike) -> int:
        """Bytes already under `directory` (recordings from earlier runs count too)."""
        d = Path(directory)
        if not d.exists():
            return 0
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    def charge(self, key: str, n: int) -> bool:
        mine = self.by_key.get(key, 0)
        if self.used + n > self.total_bytes or mine + n > self.session_bytes:
            return False
        self.used += n
        self.by_key[key] = mine + n
        return True


class Recorder:
    """Writes one session's recording as the session runs.

    With `budget` (a function of the bytes about to be written, e.g. `RecordQuota.charge`),
    recording stops for good at the first frame the budget refuses: the session goes on, its
    recording ends at its last whole frame, and `stopped` says why."""

    def __init__(
        self,
        directory: str | os.PathLike,
        header: dict[str, Any],
        sample_rate: int,
        frame_size: int,
        budget: Callable[[int], bool] | None = None,
    ) -> None:
        self.budget = budget
        self.stopped: str | None = None
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "events.jsonl").exists():
            raise FileExistsError(f"{self.dir} already holds a recording; choose another --record")
        self.frame_size = frame_size
        full = {
            "format": "duplex-recording",
            "version": FORMAT_VERSION,
            "created_unix": time.time(),
            "sample_rate": sample_rate,
            "frame_size": frame_size,
            **header,
        }
        tmp = self.dir / ".header.json.tmp"
        tmp.write_text(json.dumps(full, indent=1, default=str))
        os.replace(tmp, self.dir / "header.json")
        self._in = _WavWriter(self.dir / "in.wav", sample_rate)
        self._out = _WavWriter(self.dir / "out.wav", sample_rate)
        self._events = open(self.dir / "events.jsonl", "a", encoding="utf-8")
        self._mic: _WavWriter | None = None
        self._sample_rate = sample_rate
        self.frames = 0

    def mic(self, pcm: np.ndarray) -> None:
        """The raw microphone frame of the step about to be recorded (before cancellation)."""
        if np.asarray(pcm).size != self.frame_size:
            raise ValueError(f"recorded frames must have {self.frame_size} samples")
        if self.stopped:
            return
        if self.budget is not None and not self.budget(2 * self.frame_size):
            self._stop("recording quota reached")
            return
        if self._mic is None:
            self._mic = _WavWriter(self.dir / "mic.wav", self._sample_rate)
        self._mic.append(pcm)

    def frame(self, index: int, pcm_in: np.ndarray, pcm_out: np.ndarray, **event: Any) -> None:
        """Record one step: its input and output audio (one frame each) and its event."""
        if (
            np.asarray(pcm_in).size != self.frame_size
            or np.asarray(pcm_out).size != self.frame_size
        ):
            raise ValueError(f"recorded frames must have {self.frame_size} samples")
        if self.stopped:
            return
        line = json.dumps({"t": "frame", "i": int(index), **event}, separators=(",", ":"))
        if self.budget is not None and not self.budget(4 * self.frame_size + len(line) + 1):
            self._stop("recording quota reached")
            return
        self._in.append(pcm_in)
        self._out.append(pcm_out)
        self._events.write(line + "\n")
        self._events.flush()
        self.frames += 1

    def control(self, index: int, kind: str, **data: Any) -> None:
        """Record a control event (typed text, mute, state load, ...) before frame `index`."""
        self._write({"t": "control", "i": int(index), "kind": kind, **data})

    def _write(self, obj: dict[str, Any]) -> None:
        if self.stopped:
            return
        line = json.dumps(obj, separators=(",", ":"))
        if self.budget is not None and not self.budget(len(line) + 1):
            self._stop("recording quota reached")
            return
        self._events.write(line + "\n")
        self._events.flush()

    def _stop(self, why: str) -> None:
        self.stopped = why
        self.close()

    def close(self) -> None:
        for f in (self._in, self._out, self._mic):
            if f is not None:
                f.close()
        self._events.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Recording:
    """A loaded recording, cut to its last complete frame."""

    directory: Path
    header: dict[str, Any]
    frames: list[dict[str, Any]]
    controls: list[dict[str, Any]]
    audio_in: np.ndarray
    audio_out: np.ndarray
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    # The raw microphone beside audio_in (recordings made with an echo canceller), else None.
    audio_mic: np.ndarray | None = None

    @property
    def frame_size(self) -> int:
        return int(self.header["frame_size"])

    @property
    def sample_rate(self) -> int:
        return int(self.header["sample_rate"])

    def input_frame(self, i: int) -> np.ndarray:
        fs = self.frame_size
        return self.audio_in[i * fs : (i + 1) * fs]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Recording:
        d = Path(directory)
        if not (d / "header.json").is_file():
            raise RecordingError(f"{d} is not a duplex recording (no header.json)")
        try:
            header = json.loads((d / "header.json").read_text())
        except json.JSONDecodeError as e:
            raise RecordingError(f"{d}/header.json is unreadable: {e}") from None
        if header.get("format") != "duplex-recording":
            raise RecordingError(f"{d}/header.json is not a duplex recording header")
        if header.get("version") != FORMAT_VERSION:
            raise RecordingError(
                f"{d} is recording format {header.get('version')}; this duplex reads "
                f"{FORMAT_VERSION}"
            )
        frames, controls, notes = [], [], []
        truncated = False
        raw = (d / "events.jsonl").read_bytes() if (d / "events.jsonl").exists() else b""
        lines = raw.split(b"\n")
        # Anything after the last newline is a line cut by a kill: drop it.
        if lines and lines[-1]:
            truncated = True
            notes.append("last event line was incomplete and is ignored")
        for n, line in enumerate(lines[:-1]):
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                raise RecordingError(f"{d}/events.jsonl line {n + 1} is not JSON") from None
            (frames if ev.get("t") == "frame" else controls).append(ev)
        fs = int(header["frame_size"])
        audio = []
        for name in ("in.wav", "out.wav"):
            audio.append(_read_wav(d / name) if (d / name).exists() else np.zeros(0, np.float32))
        complete = min(len(frames), *(a.size // fs for a in audio))
        if complete < len(frames):
            truncated = True
            notes.append(f"audio holds {complete} of {len(frames)} frames; cut there")
            frames = frames[:complete]
        # A session started from a saved state counts frames from where that state left off.
        start = frames[0].get("i", 0) if frames else 0
        for k, ev in enumerate(frames):
            if ev.get("i") != start + k:
                raise RecordingError(f"{d}: frame event {k} has index {ev.get('i')}")
        controls = [c for c in controls if c["i"] <= start + complete]
        mic = _read_wav(d / "mic.wav")[: complete * fs] if (d / "mic.wav").exists() else None
        return cls(
            d,
            header,
            frames,
            controls,
            audio[0][: complete * fs],
            audio[1][: complete * fs],
            truncated,
            notes,
            mic,
        )


def _read_wav(path: Path) -> np.ndarray:
    """Read our 16-bit mono WAV, trusting the header's size (it lags the data, never leads)."""
    data = path.read_bytes()
    if len(data) < 44 or data[:4] != b"RIFF" or data[36:40] != b"data":
        raise RecordingError(f"{path} is not a 16-bit WAV written by duplex")
    n = struct.unpack_from("<I", data, 40)[0]
    body = data[44 : 44 + n]
    body = body[: len(body) // 2 * 2]
    return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32767.0
