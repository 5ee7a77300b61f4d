"""The Textual front end of `duplex talk`, `duplex connect` and `duplex replay`.

The app shows transcripts, latency, levels and session facts, takes typed text and controls.
What produces the conversation is a *feed*: a thread that runs the frame loop (the local engine
in `LocalFeed`, a websocket client in `duplex.apps.remote_feed.RemoteFeed`) and only ever puts
typed events (`duplex.streamer.events`) on a queue; the app drains that queue on a timer (10 Hz)
and is the only code that touches widgets. `Request`s from the keyboard go the other way on a
second queue and are applied by the feed between frames, so the engine (or the connection) is
only ever used from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import Footer, Header, Input, Log, Sparkline, Static

from duplex.streamer.audio import AudioBackend, AudioUnavailableError
from duplex.streamer.conversation import step_frame
from duplex.streamer.echo import echo_line
from duplex.streamer.engine import Engine, Session
from duplex.streamer.events import (
    Command,
    Levels,
    Notice,
    Request,
    Words,
    level_db,
    printable,
)
from duplex.streamer.statefile import StateFileError
from duplex.streamer.transcript import Transcript

HELP_TEXT = (
    "Type and press Enter to send text to the model (it enters your text stream frame by frame). "
    "F2 mute mic · F3 pause · F5 save state · F6 load state · F7 reset · F1 help · Ctrl+Q quit"
)


def _meter(db: float, width: int = 20) -> str:
    n = round((db + 60) / 60 * width)
    return "█" * n + "·" * (width - n) + f" {db:5.1f} dB"


@dataclass
class TalkOptions:
    """What the TUI needs beyond the engine: where states go, how the session was configured."""

    state_path: str = "duplex.dstate"
    exit_at_end: bool = False
    schedule: dict[int, list[str]] | None = None
    title: str = "duplex"


class Feed(Protocol):
    """What the app needs from the thread that runs a conversation.

    `updates` carries events: `Words` (transcript pieces), `Levels` (dB), `Notice` (a line for
    the status bar; with `reset`, clear the transcripts). `commands` takes `Request`s.
    """

    updates: queue.Queue
    commands: queue.Queue
    muted: bool
    paused: bool
    ended: bool
    error: str | None

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...

    def latency(self) -> tuple[str, list[float]] | None:
        """The latency panel's text and sparkline values (None before the first frame)."""
        ...

    def facts(self) -> str:
        """The session panel's text."""
        ...


class LocalFeed(threading.Thread):
    """The local frame loop (a `Feed`): reads `commands`, writes `updates`, no widgets."""

    def __init__(
        self,
        engine: Engine,
        session: Session,
        audio: AudioBackend,
        schedule: dict[int, list[str]] | None = None,
    ) -> None:
        super().__init__(daemon=True, name="duplex-frames")
        self.engine, self.session, self.audio = engine, session, audio
        # Text typed at given frames (a recording being replayed types what its user typed).
        self.schedule = schedule or {}
        self.commands: queue.Queue = queue.Queue()
        self.updates: queue.Queue = queue.Queue(maxsize=10_000)
        self.muted = False
        self.paused = False
        self.ended = False
        self.error: str | None = None
        # Utterance lines (`duplex talk --transcript`), when asked for.
        self.transcript: Transcript | None = None

    def _post(self, event: Words | Levels | Notice) -> None:
        with contextlib.suppress(queue.Full):
            self.updates.put_nowait(event)

    def _apply(self, req: Request) -> bool:
        kind = req.command
        if kind == Command.STOP:
            return False
        if kind == Command.TYPE:
            self.session.type_text(req.arg)
        elif kind == Command.MUTE:
            self.muted = not self.muted
            self._post(Notice("microphone muted" if self.muted else "microphone on"))
        elif kind == Command.PAUSE:
            self.paused = not self.paused
            self._post(Notice("paused" if self.paused else "resumed"))
        elif kind == Command.SAVE:
            path = self.engine.save_session(self.session, req.arg)
            self._post(Notice(f"state saved to {path}"))
        elif kind == Command.LOAD:
            try:
                # Checked before anything changes: a refused state leaves the conversation as
                # it was.
                self.engine.restore(self.session, req.arg)
            except (StateFileError, ValueError, OSError) as e:
                self._post(Notice(f"could not load state: {e}; the conversation goes on"))
            else:
                what = f"state loaded from {req.arg} (frame {self.session.frame})"
                self._post(Notice(what, reset=True))
        elif kind == Command.RESET:
            self.engine.reset(self.session)
            self._post(Notice("conversation reset", reset=True))
        return True

    def run(self) -> None:
        fs = self.engine.frame_size
        try:
            while True:
                while not self.commands.empty():
                    if not self._apply(self.commands.get_nowait()):
                        return
                if self.paused or self.ended:
                    time.sleep(0.02)
                    continue
                frame = self.audio.read_frame()
                if frame is None:
                    self.ended = True
                    self._post(Notice("input ended (Ctrl+Q quits)"))
                    continue
                for text in self.schedule.get(self.session.frame, ()):
                    self.session.type_text(text)
                heard = np.zeros(fs, np.float32) if self.muted else frame
                res = step_frame(self.engine, self.session, self.audio, heard, self.transcript)
                if res.text:
                    self._post(Words("model", res.text))
                if res.user_text:
                    self._post(Words("you", res.user_text))
                self._post(Levels(level_db(heard), level_db(res.pcm)))
        except AudioUnavailableError as e:
            self.error = str(e)
            self._post(Notice(f"audio stopped: {e}"))
        finally:
            self.audio.close()

    def latency(self) -> tuple[str, list[float]] | None:
        snap = self.engine.stats.snapshot()
        if not snap["frames"]:
            return None
        st = snap["stages_ms"]
        text = (
            "        p50     p99  (ms)\n"
            + "\n".join(
                f"{k:7s}{st[k]['p50']:6.1f}  {st[k]['p99']:6.1f}"
                for k in ("encode", "model", "decode", "total")
            )
            + f"\nframe {snap['frame_ms']:.1f} ms · real-time factor "
            f"{snap['real_time_factor']:.2f}"
        )
        return text, self.engine.stats.recent("total", 120)

    def facts(self) -> str:
        snap = self.engine.stats.snapshot()
        model = self.engine.model
        log_tokens = 0
        reader = model.backbone.reader
        if reader is not None and reader.is_streaming:
            log_tokens = reader.lengths()[self.session.slot]
        return (
            f"frames {self.session.frame}\nlog tokens {log_tokens}\n"
            f"state {model.state_bytes() / 1e3:.0f} KB\nlog {model.host_bytes() / 1e3:.0f} KB\n"
            f"drops {snap['dropped_input_frames']} underruns {snap['output_underruns']}"
            f"\n{echo_line(self.audio)}"
        )


class DuplexApp(App):
    """A conversation in a terminal: `duplex talk`, `duplex connect` and `duplex replay`."""

    TITLE = "duplex"
    CSS = """
    #panes { height: 1fr; }
    .pane { width: 1fr; border: round $accent; }
    #bottom { height: 9; }
    #latency { width: 2fr; border: round $secondary; }
    #levels { width: 1fr; border: round $secondary; }
    #facts { width: 1fr; border: round $secondary; }
    #spark { height: 2; }
    #notice { height: 1; color: $warning; }
    """
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("f1", "help", "Help"),
        Binding("f2", "mute", "Mute mic"),
        Binding("f3", "pause", "Pause"),
        Binding("f5", "save", "Save state"),
        Binding("f6", "load", "Load state"),
        Binding("f7", "reset", "Reset"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, feed: Feed, options: TalkOptions) -> None:
        super().__init__()
        self.options = options
        self.worker = feed
        self.title = options.title
        self.spark_data: list[float] = []
        self._exiting = False

    @classmethod
    def local(
        cls, engine: Engine, session: Session, audio: AudioBackend, options: TalkOptions
    ) -> DuplexApp:
        """The app over the local engine (talk, replay)."""
        return cls(LocalFeed(engine, session, audio, options.schedule), options)

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Horizontal(id="panes"):
            you = Log(id="you", classes="pane")
            you.border_title = "You"
            yield you
            model = Log(id="model", classes="pane")
            model.border_title = "Model"
            yield model
        with Horizontal(id="bottom"):
            with Vertical(id="latency"):
                yield Static("latency: waiting for frames", id="latency_text")
                yield Sparkline([0.0], id="spark")
            yield Static("", id="levels")
            # Session facts and notices carry text from outside (a server's session id and
            # error messages, exception text): shown as plain text, never parsed as markup.
            yield Static("", id="facts", markup=False)
        yield Static("", id="notice", markup=False)
        yield Input(placeholder="type to the model, Enter to send", id="typed")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#latency").border_title = "Latency"
        self.query_one("#levels").border_title = "Levels"
        self.query_one("#facts").border_title = "Session"
        self.worker.start()
        self.set_interval(0.1, self.refresh_from_worker)

    def refresh_from_worker(self) -> None:
        """Drain the worker's updates and redraw (throttled to this timer's rate)."""
        try:
            self._redraw()
        except NoMatches:
            # The timer can fire once more while the app is shutting down.
            return

    def _redraw(self) -> None:
        you, model = self.query_one("#you", Log), self.query_one("#model", Log)
        level_in = level_out = None
        notices = []
        while True:
            try:
                u = self.worker.updates.get_nowait()
            except queue.Empty:
                break
            if isinstance(u, Words):
                (model if u.speaker == "model" else you).write(printable(u.text))
            elif isinstance(u, Levels):
                level_in, level_out = u.level_in, u.level_out
            elif isinstance(u, Notice):
                if u.reset:
                    you.clear()
                    model.clear()
                notices.append(u.text)
        if notices:
            self.query_one("#notice", Static).update(notices[-1])
        if self.options.exit_at_end and self.worker.ended and not self._exiting:
            self._exiting = True
            self.run_worker(self.action_quit())
        latency = self.worker.latency()
        if latency is not None:
            text, self.spark_data = latency
            self.query_one("#latency_text", Static).update(text)
            self.query_one("#spark", Sparkline).data = list(self.spark_data)
        if level_in is not None:
            self.query_one("#levels", Static).update(
                f"in  {_meter(level_in)}\nout {_meter(level_out)}"
                + ("\nMUTED" if self.worker.muted else "")
                + ("\nPAUSED" if self.worker.paused else "")
            )
        self.query_one("#facts", Static).update(self.worker.facts())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value
        if text:
            self.worker.commands.put(Request(Command.TYPE, text + " "))
            self.query_one("#you", Log).write_line(f"> {text}")
        event.input.value = ""

    def action_help(self) -> None:
        self.query_one("#notice", Static).update(HELP_TEXT)

    def action_mute(self) -> None:
        self.worker.commands.put(Request(Command.MUTE))

    def action_pause(self) -> None:
        self.worker.commands.put(Request(Command.PAUSE))

    def action_save(self) -> None:
        self.worker.commands.put(Request(Command.SAVE, self.options.state_path))

    def action_load(self) -> None:
        if not Path(self.options.state_path).is_file():
            self.query_one("#notice", Static).update(
                f"no state at {self.options.state_path}: save one first (F5)"
            )
            return
        self.worker.commands.put(Request(Command.LOAD, self.options.state_path))

    def action_reset(self) -> None:
        self.worker.commands.put(Request(Command.RESET))

    async def action_quit(self) -> None:
        self.worker.commands.put(Request(Command.STOP))
        # Wait for the worker off the event loop: the feed may need this loop to finish (a
        # server in the same process answering its goodbye), and the screen stays live.
        await asyncio.to_thread(self.worker.join, 5)
        self.exit()
