"""The TUI's feed for `duplex connect`: the websocket client on its own thread and event loop.

It is the remote twin of `duplex.apps.tui.LocalFeed`: the same app shows the conversation,
whether the engine runs in this process or on a server. The client reports typed events
(`duplex.streamer.events`) that this feed passes on to `updates` (what a TUI shows); keyboard
`Request`s arrive on `commands` and the client applies them between frames (typing, mute, pause,
save/load state, reset, quit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import threading

import numpy as np

from duplex.apps.client_audio import AudioEnds
from duplex.apps.connect_config import ConnectConfig
from duplex.apps.remote_client import Client
from duplex.streamer.echo import echo_line
from duplex.streamer.events import Event, Levels, Notice, Report, Words


class RemoteFeed(threading.Thread):
    """Runs `Client` for the TUI; `exit_code` is the client's exit status once it ends."""

    def __init__(self, cfg: ConnectConfig, args: argparse.Namespace) -> None:
        super().__init__(daemon=True, name="duplex-connect")
        self.cfg, self.args = cfg, args
        self.commands: queue.Queue = queue.Queue()
        self.updates: queue.Queue = queue.Queue(maxsize=10_000)
        self.ends = AudioEnds(args)
        self.client = Client(
            cfg, self.ends.prepare, report=self._report, warn=self._warn, commands=self.commands
        )
        self.ended = False
        self.error: str | None = None
        self.exit_code: int | None = None
        self.last_warning = ""

    @property
    def muted(self) -> bool:
        return self.client.muted

    @property
    def paused(self) -> bool:
        return self.client.paused

    def _post(self, event: Event) -> None:
        with contextlib.suppress(queue.Full):
            self.updates.put_nowait(event)

    def _warn(self, line: str) -> None:
        self.last_warning = line
        self._post(Notice(line))

    def _report(self, event: Event) -> None:
        """What the TUI shows of the client's events: words, levels, timeline changes as
        notices that clear the transcripts, and any other reported line as a notice."""
        if isinstance(event, Words | Levels):
            self._post(event)
        elif isinstance(event, Report) and event.kind == "event":
            if event.event == "reset":
                self._post(Notice("conversation reset", reset=True))
            elif event.event == "state_loaded":
                self._post(Notice(f"state loaded (frame {event.frame})", reset=True))
        elif isinstance(event, Report) and event.kind not in ("stats", "done") and event.text:
            self._post(Notice(event.text))

    def run(self) -> None:
        try:
            self.exit_code = asyncio.run(self.client.run())
        except Exception as e:
            self.exit_code = 1
            self.last_warning = f"duplex connect: {e}"
        finally:
            self.ends.close()
            if self.exit_code:
                self.error = self.last_warning or f"the client ended with status {self.exit_code}"
            self.ended = True
            self._post(Notice(self.error or "session ended (Ctrl+Q quits)"))

    def latency(self) -> tuple[str, list[float]] | None:
        c = self.client.c
        lat = np.asarray(list(c.latency_ms), dtype=np.float64)
        if not lat.size:
            return None
        p50, p99 = np.percentile(lat, [50, 99]).tolist()
        rtt = "-" if c.rtt_ms is None else f"{c.rtt_ms:.1f}"
        lines = ["        p50     p99  (ms)", f"frame  {p50:6.1f}  {p99:6.1f}  sent -> answer"]
        stages = c.server.get("engine", {}).get("stages_ms", {})
        if "total" in stages:
            t = stages["total"]
            lines.append(f"server {t['p50']:6.1f}  {t['p99']:6.1f}  one step")
        lines.append(f"round trip {rtt} ms")
        jitter = self.client.jitter
        lines.append(
            f"jitter {jitter.depth} frames · dropped {jitter.dropped} · "
            f"underruns {jitter.underruns}"
        )
        return "\n".join(lines), lat[-120:].tolist()

    def facts(self) -> str:
        c, s = self.client.c, self.client.c.server
        hello = self.client.hello
        session = hello.session if hello is not None else "connecting"
        return (
            f"session {session}\nsent {c.sent} recv {c.received}\n"
            f"server frame {s.get('frame', 0)} queue {s.get('queue_depth', 0)}\n"
            f"server drops {s.get('dropped_input_frames', 0)}\n"
            f"reconnects {c.reconnects}\n{echo_line(getattr(self.client.source, 'audio', None))}"
        )
