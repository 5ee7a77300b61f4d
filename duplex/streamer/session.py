"""One conversation in the engine: its tokens so far, its generator, its typed text, its words.

A `Session` is the engine's per-conversation record; only the engine changes it (from the one
thread that steps it), except `type_text`, which front ends call between steps.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import torch

from duplex.model.tokenizer import PAD
from duplex.streamer.recording import Recorder
from duplex.streamer.sampling import SamplingConfig


@dataclass
class FrameResult:
    """What one session got from one step."""

    frame: int
    pcm: np.ndarray
    text: str
    user_text: str
    tokens_in: list[int]
    tokens_out: list[int]


@dataclass(eq=False)
class Session:
    """One conversation in one slot of the engine."""

    id: int
    slot: int
    sampling: SamplingConfig
    generator: torch.Generator
    prev_audio: torch.Tensor
    prev_text: int = PAD
    prev_user_text: int = PAD
    frame: int = 0
    pending_c0: collections.deque = field(default_factory=collections.deque)
    typed: collections.deque = field(default_factory=collections.deque)
    recorder: Recorder | None = None
    explicit_sampling: bool = True
    # Continues a saved state (a recording then carries that state as its start).
    restored: bool = False
    transcript: list[str] = field(default_factory=list)
    user_transcript: list[str] = field(default_factory=list)
    _text_bytes: bytearray = field(default_factory=bytearray)
    _user_bytes: bytearray = field(default_factory=bytearray)

    def type_text(self, text: str) -> None:
        """Queue typed text: it enters the user's text stream one byte per frame."""
        if self.recorder is not None and text:
            self.recorder.control(self.frame, "type", text=text)
        self.typed.extend(text.encode("utf-8"))


def utf8_piece(buf: bytearray, token: int) -> str:
    """Append a byte token; return whatever complete UTF-8 text it finishes."""
    if not 0 <= token < 256:
        return ""
    buf.append(token)
    try:
        s = buf.decode("utf-8")
    except UnicodeDecodeError:
        if len(buf) >= 4:
            s = buf.decode("utf-8", errors="replace")
        else:
            return ""
    buf.clear()
    return s
