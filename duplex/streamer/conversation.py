"""One conversation from an audio backend through the engine, frame by frame.

This is the single path from microphone (or file) to speaker (or file) that `duplex talk`, its
TUI and the tests all use: read a frame, step the engine, write the frame, report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from duplex.streamer.audio import AudioBackend
from duplex.streamer.engine import Engine, FrameResult, SamplingConfig, Session
from duplex.streamer.events import Printer, Report, Words
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
            self.sampling = SamplingConfig.from_saved(self.sampling)


def load_parts(cfg: ConversationConfig):
    """The model and codec a conversation config names."""
    from duplex import codecs
    from duplex.model import duplex_lm

    return duplex_lm.load(cfg.model), codecs.load(cfg.codec)


def open_session(
    engine: Engine, cfg: ConversationConfig, record: str | Path | None = None
) -> Session:
    """Join the engine as `cfg` says, recording to `record` if given (a session that continues
    a state carries it in the recording, so replay needs nothing else)."""
    session = engine.join(cfg.sampling, state=cfg.state)
    if record is not None:
        try:
            engine.record(session, record, model=cfg.model, codec=cfg.codec, state=cfg.state)
        except BaseException:
            engine.leave(session)
            raise
    return session


def step_frame(
    engine: Engine,
    session: Session,
    audio: AudioBackend,
    frame: np.ndarray,
    transcript: Transcript | None = None,
) -> FrameResult:
    """One frame: step the engine on what was heard, play the reply, fold in the device counters
    (and extend the utterance transcript, when one is kept)."""
    raw = getattr(audio, "raw_frame", None)
    if raw is not None and session.recorder is not None:
        # The microphone before echo cancellation, beside what the model heard.
        session.recorder.mic(raw)
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


class HeadlessPrinter:
    """--headless for a local conversation: transcript pieces as they come and one stats line
    per second, printed by the same `Printer` as a remote conversation's."""

    def __init__(
        self,
        engine: Engine,
        session: Session,
        out: TextIO | None = None,
        json_lines: bool = False,
    ) -> None:
        self.engine, self.session = engine, session
        self.print = Printer(json_lines, out)
        self.last = time.monotonic()

    def __call__(self, res: FrameResult) -> None:
        if res.user_text:
            self.print(Words("you", res.user_text))
        if res.text:
            self.print(Words("model", res.text))
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
        self.print(Report("stats", snap, line))
