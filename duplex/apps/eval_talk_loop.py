"""The conversation driver of `duplex eval talk`: held-out dialogues spoken through the real loop.

Each dialogue's user track goes into its own engine session, all batched as `serve` batches its
clients, along `duplex talk --input`'s path: frames in through the codec, a model step, frames
out. Nothing is teacher-forced, so what is scored afterwards is what a listener would hear.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from duplex.apps.eval_talk_script import ScriptedLM, script_for
from duplex.data import dialogue as G
from duplex.model.tokenizer import EOT, PAD
from duplex.streamer.transcript import Transcript

if TYPE_CHECKING:
    from duplex.codecs.base import StreamingCodec
    from duplex.streamer.engine import Engine, SamplingConfig


@dataclass
class Heard:
    """What came out of one run through the loop, per frame."""

    frame_rate: float
    frame_size: int
    out_pcm: np.ndarray
    text: np.ndarray
    user: np.ndarray
    transcript: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def model_text(self, f0: int, f1: int) -> str:
        """The model's text emitted in frames [f0, f1)."""
        return decode_ids(self.text[max(0, f0) : max(0, f1)])


def decode_ids(ids: Iterable[int]) -> str:
    """Byte ids to text; an end of turn separates words like a space, other controls vanish."""
    data = bytes(32 if int(i) == EOT else int(i) for i in ids if 0 <= int(i) < 256 or i == EOT)
    return data.decode("utf-8", errors="replace")


def run_dialogues(
    engine: Engine,
    dialogues: list[G.Dialogue],
    sampling: SamplingConfig | None = None,
    states: list[str | None] | None = None,
    saves: list[str | None] | None = None,
    scripted: ScriptedLM | None = None,
    script_codec: StreamingCodec | None = None,
    kind: str = "oracle",
    on_progress: Callable[[float], object] | None = None,
) -> list[Heard]:
    """Speak each dialogue's user track into its own session, all batched in one engine (as
    `serve` steps its clients): frames in through the codec, model step, frames out, exactly
    `duplex talk --input`'s path. A session leaves when its audio ends. -> one Heard per
    dialogue (and each session's state saved where asked)."""
    from duplex.streamer.audio import FileAudio

    n = len(dialogues)
    states = states or [None] * n
    saves = saves or [None] * n
    sessions = [engine.join(sampling, state=st) for st in states]
    if scripted is not None:
        for s, d in zip(sessions, dialogues, strict=True):
            script_for(scripted, s.slot, d, script_codec, kind)
    audio = [FileAudio(engine.sample_rate, engine.frame_size, signal=d.user) for d in dialogues]
    lines = [Transcript(engine.frame_rate) for _ in dialogues]
    frames = [math.ceil(len(d.user) / engine.frame_size) for d in dialogues]
    text: list[list[int]] = [[] for _ in dialogues]
    user: list[list[int]] = [[PAD] for _ in dialogues]
    out: list[list[np.ndarray]] = [[] for _ in dialogues]
    t0 = time.perf_counter()
    live = dict(enumerate(sessions))
    for i in range(max(frames, default=0)):
        heard = {s: audio[k].read_frame() for k, s in live.items()}
        results = engine.step(heard)
        for k, s in list(live.items()):
            res = results[s]
            lines[k].add(heard[s], res)
            out[k].append(res.pcm)
            text[k].append(res.tokens_out[-2])
            user[k].append(res.tokens_out[-1])
            if i + 1 >= frames[k]:
                # Its audio is over: save it if asked and free its row, so the batch shrinks.
                lines[k].close()
                if saves[k] is not None:
                    engine.save_session(s, saves[k])
                engine.leave(s)
                del live[k]
        if on_progress is not None and (i + 1) % 250 == 0:
            on_progress(250 / engine.frame_rate)
    seconds = time.perf_counter() - t0
    return [
        Heard(
            engine.frame_rate,
            engine.frame_size,
            np.concatenate(out[k]) if out[k] else np.zeros(0, np.float32),
            np.array(text[k], np.int64),
            np.array(user[k][: len(text[k])], np.int64),
            lines[k].lines,
            seconds,
        )
        for k in range(n)
    ]
