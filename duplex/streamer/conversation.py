"""One conversation from an audio backend through the engine, frame by frame.

This is the single path from microphone (or file) to speaker (or file) that `duplex talk`, its
TUI and the tests all use: read a frame, step the engine, write the frame, report.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from duplex.streamer.audio import AudioBackend
from duplex.streamer.engine import Engine, FrameResult, SamplingConfig, Session
from duplex.streamer.recording import Recorder
from duplex.streamer.transcript import Transcript


@dataclass
class ConversationConfig:
    """What to load and how to sample; recorded in session headers so replay can rebuild it."""

    model: str = "tiny"
    codec: str = "default"
    sampling: SamplingConfig = None  # type: ignore[assignment]
    state: str | None = None

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = SamplingConfig()
        elif isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)


def load_parts(cfg: ConversationConfig):
    """The model and codec a conversation config names."""
    from duplex import codecs
    from duplex.model import duplex_lm

    return duplex_lm.load(cfg.model), codecs.load(cfg.codec)


def open_session(
    engine: Engine, cfg: ConversationConfig, record: str | Path | None = None
) -> Session:
    """Join the engine as `cfg` says, recording to `record` if given."""
    recorder = None
    if record is not None:
        record = Path(record)
        header = {
            "config": asdict(cfg),
            "model_fingerprint": engine.model_fingerprint,
            "codec_fingerprint": engine.codec_fingerprint,
            "frame_rate": engine.frame_rate,
        }
        recorder = Recorder(record, header, engine.sample_rate, engine.frame_size)
        if cfg.state is not None:
            # The recording carries its starting state, so replay needs nothing else.
            shutil.copyfile(cfg.state, record / "initial.dstate")
    return engine.join(cfg.sampling, state=cfg.state, recorder=recorder)


def step_frame(
    engine: Engine,
    session: Session,
    audio: AudioBackend,
    frame: np.ndarray,
    transcript: Transcript | None = None,
) -> FrameResult:
    """One frame: step the engine on what was heard, play the reply, fold in the device counters
    (and extend the utterance transcript, when one is kept)."""
    res = engine.step({session: frame})[session]
    audio.write_frame(res.pcm)
    if transcript is not None:
        transcript.add(frame, res)
    for key, value in audio.counters().items():
        setattr(engine.stats, key, value)
    return res


def run(
    engine: Engine,
    session: Session,
    audio: AudioBackend,
    on_frame: Callable[[FrameResult], None] | None = None,
    max_frames: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    transcript: Transcript | None = None,
) -> int:
    """Stream until the input ends (or max_frames, or should_stop()); returns frames done."""
    n = 0
    while max_frames is None or n < max_frames:
        if should_stop is not None and should_stop():
            break
        frame = audio.read_frame()
        if frame is None:
            break
        res = step_frame(engine, session, audio, frame, transcript)
        if on_frame is not None:
            on_frame(res)
        n += 1
    return n


def printable(text: str) -> str:
    """Text safe to show in a terminal: control characters (an untrained model emits any byte,
    ESC included) become U+FFFD, newlines and tabs stay."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


class HeadlessPrinter:
    """Prints transcripts as they grow and one stats line per second (for --headless)."""

    def __init__(self, engine: Engine, session: Session, out=None, json_lines: bool = False):
        import sys

        self.engine, self.session = engine, session
        self.out = out or sys.stdout
        self.json_lines = json_lines
        self.last = time.monotonic()

    def __call__(self, res: FrameResult) -> None:
        if res.user_text:
            self._emit({"you": res.user_text}, f"[you] {printable(res.user_text)}")
        if res.text:
            self._emit({"model": res.text}, f"[model] {printable(res.text)}")
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            self.stats_line()

    def stats_line(self) -> None:
        snap = self.engine.stats.snapshot()
        st = snap["stages_ms"]
        line = (
            f"[stats] frame {self.session.frame} | total p50 {st['total']['p50']:.1f} ms "
            f"p99 {st['total']['p99']:.1f} ms (frame {snap['frame_ms']:.1f} ms) | "
            f"rtf {snap['real_time_factor']:.2f} | drops {snap['dropped_input_frames']} "
            f"underruns {snap['output_underruns']}"
        )
        self._emit({"stats": snap}, line)

    def _emit(self, obj: dict, line: str) -> None:
        print(json.dumps(obj) if self.json_lines else line, file=self.out, flush=True)
