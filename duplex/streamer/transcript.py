"""Utterance transcripts of a conversation, one JSON line per finished utterance.

`{"speaker": "user"|"model", "start": s, "end": s, "text": ...}`: the model's words (its inner
monologue) with the times of its speech in the output audio, and the user's words as the model
transcribed them with the times of their speech in the input audio. Lines are written (and
flushed) as utterances finish, so a killed process leaves whole lines.

An utterance opens at its speaker's first text byte and closes at an end-of-turn token or after
`idle_s` without text. Its times come from the audio, not the text: the model's text leads its
speech and the user's transcript lags theirs, so the audio is what a listener would time. Speech
is a frame whose RMS is well above a running noise floor (`VoiceActivity`).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from duplex.model.tokenizer import EOT


class VoiceActivity:
    """Per-frame speech detection: RMS above `ratio` x a noise floor that follows the quietest
    frames (falls at once, rises slowly), and above an absolute `min_rms`."""

    def __init__(self, ratio: float = 4.0, min_rms: float = 2e-3) -> None:
        self.ratio, self.min_rms = ratio, min_rms
        self.floor: float | None = None

    def __call__(self, pcm: np.ndarray) -> bool:
        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0
        if self.floor is None or rms < self.floor:
            self.floor = max(rms, 1e-5)
        else:
            self.floor *= 1.002
        return rms > max(self.ratio * self.floor, self.min_rms)


def model_activity() -> VoiceActivity:
    """Speech detection for the model's output: a fixed level (-44 dBFS RMS), since the codec
    decodes silence to near zero and a floor that followed a noisy output would hide it."""
    return VoiceActivity(ratio=0.0, min_rms=6e-3)


def voiced_frames(
    audio: np.ndarray, frame_size: int, vad: VoiceActivity | None = None
) -> np.ndarray:
    """Speech detection over a whole signal -> bool [frames]."""
    vad = vad or VoiceActivity()
    n = len(audio) // frame_size
    return np.array([vad(audio[i * frame_size : (i + 1) * frame_size]) for i in range(n)], bool)


@dataclass
class _Open:
    first: int
    last: int
    parts: list[str] = field(default_factory=list)
    closed_at: int | None = None


class Transcript:
    """Turns a conversation's frames into utterance lines.

    Call `frame()` once per frame with what went in and out, and `close()` at the end. `lines`
    holds every finished utterance; `out` (a path or an open text file) receives them as JSON.
    """

    def __init__(
        self,
        frame_rate: float,
        out: str | Path | TextIO | None = None,
        idle_s: float = 1.0,
        tail_s: float = 0.6,
        history_s: float = 30.0,
    ) -> None:
        self.frame_rate = frame_rate
        self.idle = max(1, round(idle_s * frame_rate))
        self.tail = max(1, round(tail_s * frame_rate))
        self.lines: list[dict] = []
        self._file: TextIO | None = None
        self._own = False
        if isinstance(out, (str, Path)):
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(out, "a", encoding="utf-8")
            self._own = True
        elif out is not None:
            self._file = out
        self._vad = {"user": VoiceActivity(), "model": model_activity()}
        self._voiced: dict[str, deque] = {
            s: deque(maxlen=round(history_s * frame_rate)) for s in ("user", "model")
        }
        self._open: dict[str, _Open | None] = {"user": None, "model": None}
        self._prev_user_token: int | None = None
        self._last_voiced = {"user": -1, "model": -1}
        self.frame_index = -1

    def frame(
        self,
        index: int,
        pcm_in: np.ndarray,
        pcm_out: np.ndarray,
        text: str,
        user_text: str,
        tokens_out: list[int] | None = None,
    ) -> None:
        """One frame: input and output audio, the text pieces the engine reported, and the
        tokens it sampled ([*audio codes, text, user text]; used for end-of-turn)."""
        self.frame_index = index
        for speaker, pcm in (("user", pcm_in), ("model", pcm_out)):
            v = self._vad[speaker](np.asarray(pcm))
            self._voiced[speaker].append((index, v))
            if v:
                self._last_voiced[speaker] = index
        model_eot = tokens_out is not None and tokens_out[-2] == EOT
        # The user text fed this frame is the one sampled last frame (the engine reports it now).
        user_eot = self._prev_user_token == EOT
        self._prev_user_token = tokens_out[-1] if tokens_out is not None else None
        self._text("model", index, text, model_eot)
        self._text("user", index, user_text, user_eot)
        for speaker in ("user", "model"):
            u = self._open[speaker]
            if u is None:
                continue
            if u.closed_at is None and index - u.last >= self.idle:
                u.closed_at = index
            if u.closed_at is None:
                continue
            # A last word's speech can outlast its text: wait until the speaker has been quiet
            # for 100 ms (at most `tail_s`).
            quiet = index - self._last_voiced[speaker] >= 5
            if quiet or index >= u.closed_at + self.tail:
                self._finish(speaker)

    def add(self, pcm_in: np.ndarray, res) -> None:
        """One engine step's `FrameResult` and the input frame it heard."""
        self.frame(res.frame, pcm_in, res.pcm, res.text, res.user_text, res.tokens_out)

    def _text(self, speaker: str, index: int, piece: str, eot: bool) -> None:
        u = self._open[speaker]
        if piece:
            if u is not None and u.closed_at is not None:
                self._finish(speaker)
                u = None
            if u is None:
                u = self._open[speaker] = _Open(index, index)
            u.parts.append(piece)
            u.last = index
        if eot and u is not None and u.closed_at is None:
            u.closed_at = index

    def _span(self, speaker: str, u: _Open) -> tuple[float, float]:
        """Seconds of the utterance's speech: the voiced run around its text."""
        frames = dict(self._voiced[speaker])
        end_limit = max(self.frame_index, u.last)
        if speaker == "model":
            # The model's speech follows its text: the first voiced frame from the text on.
            starts = [f for f, v in frames.items() if v and u.first - 2 <= f <= end_limit]
            start = starts[0] if starts else u.first
        else:
            # The user's transcript follows their speech: walk back through the voiced run.
            start = u.first
            gap = 0
            f = u.first
            while f - 1 in frames and u.first - f < 2 * self.frame_rate:
                f -= 1
                if frames[f]:
                    start, gap = f, 0
                else:
                    gap += 1
                    if gap > 10:
                        break
        ends = [f for f, v in frames.items() if v and start <= f <= end_limit]
        end = ends[-1] + 1 if ends else u.last + 1
        return start / self.frame_rate, end / self.frame_rate

    def _finish(self, speaker: str) -> None:
        u = self._open[speaker]
        self._open[speaker] = None
        if u is None:
            return
        text = "".join(u.parts).strip()
        if not text:
            return
        start, end = self._span(speaker, u)
        line = {"speaker": speaker, "start": round(start, 3), "end": round(end, 3), "text": text}
        self.lines.append(line)
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Finish open utterances and close the file (if this object opened it)."""
        for speaker in ("user", "model"):
            self._finish(speaker)
        if self._own and self._file is not None:
            self._file.close()
            self._file = None
