"""What a conversation feed tells its front end, and what the front end asks of the feed.

A *feed* runs a conversation (the local engine, or a websocket client of a server) and reports
what happens as the small typed events below; a front end (the TUI, or `Printer` for headless
runs) shows them. Each event knows its one printed line and its `--json` object, so local and
remote runs print alike and no front end parses another's output. The other way, the front end
sends `Request`s: a `Command` and, for some, an argument.
"""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np


def printable(text: str) -> str:
    """Text safe to show in a terminal: control characters (an untrained model emits any byte,
    ESC included) become U+FFFD, newlines and tabs stay."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


class Command(enum.Enum):
    """What a front end can ask of a running conversation."""

    TYPE = "type"
    MUTE = "mute"
    PAUSE = "pause"
    SAVE = "save"
    LOAD = "load"
    RESET = "reset"
    STOP = "stop"


@dataclass(frozen=True)
class Request:
    """One command for the feed; `arg` is the typed text (TYPE) or the state path (SAVE, LOAD)."""

    command: Command
    arg: str = ""


@dataclass(frozen=True)
class Event:
    """Something a feed reports: one printed `line()` and one `--json` object (None: shown
    only by a TUI)."""

    def line(self) -> str:
        return ""

    def to_json(self) -> dict[str, Any] | None:
        return None


@dataclass(frozen=True)
class Words(Event):
    """A piece of a transcript: the model's words or the user's ("you"), at `frame` when the
    feed knows it."""

    speaker: str
    text: str
    frame: int | None = None

    def line(self) -> str:
        return f"[{self.speaker}] {printable(self.text)}"

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {self.speaker: self.text}
        if self.frame is not None:
            obj["frame"] = self.frame
        return obj


@dataclass(frozen=True)
class Levels(Event):
    """Levels (dB) of the frame heard and the frame played, for the meters."""

    level_in: float
    level_out: float


@dataclass(frozen=True)
class Notice(Event):
    """A status line for the user; `reset` also clears the transcripts (a new timeline)."""

    text: str
    reset: bool = False

    def line(self) -> str:
        return self.text


@dataclass(frozen=True)
class Report(Event):
    """A line for the log with its JSON form: stats, connections, saved states, server events
    and errors, the summary. `kind` is the JSON object's key; `frame` is set for server events
    that move the timeline ("reset", "state_loaded")."""

    kind: str
    data: Any
    text: str
    frame: int | None = None
    event: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return self.text

    def to_json(self) -> dict[str, Any]:
        return {self.kind: self.data, **self.extra}


class Printer:
    """The headless front end of local and remote runs: each event's line, or its JSON."""

    def __init__(self, json_lines: bool = False, out: TextIO | None = None) -> None:
        self.json_lines = json_lines
        self.out = out

    def __call__(self, event: Event) -> None:
        if self.json_lines:
            obj = event.to_json()
            if obj is not None:
                print(json.dumps(obj), file=self.out or sys.stdout, flush=True)
            return
        if event.to_json() is not None:
            print(event.line(), file=self.out or sys.stdout, flush=True)


def level_db(x: np.ndarray) -> float:
    """The RMS level of float audio in dB (floor -60), for the meters."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return max(-60.0, 20 * np.log10(rms + 1e-9))
