"""The TUI's feed for `duplex connect`: the websocket client on its own thread and event loop.

It is the remote twin of `duplex.apps.tui.Worker`: the same app shows the conversation, whether
the engine runs in this process or on a server. The client reports what it sees through
callbacks that only put plain data on `updates`; keyboard commands arrive on `commands` and the
client applies them between frames (typing, mute, pause, save/load state, reset, quit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import threading
from typing import Any

import numpy as np

from duplex.apps import protocol as P
from duplex.apps.connect import AudioEnds, Client, ConnectConfig
from duplex.apps.tui import level_db


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

    def _post(self, **item: object) -> None:
        with contextlib.suppress(queue.Full):
            self.updates.put_nowait(item)

    def _warn(self, line: str) -> None:
        self.last_warning = line
        self._post(notice=line)

    def _report(self, obj: dict[str, Any], line: str) -> None:
        if "model" in obj:
            self._post(text=obj["model"])
        elif "you" in obj:
            self._post(user_text=obj["you"])
        elif "levels" in obj:
            pcm_in, pcm_out = obj["levels"]
            self._post(
                level_in=level_db(P.int16_to_pcm(pcm_in)),
                level_out=level_db(P.int16_to_pcm(pcm_out)),
            )
        elif "event" in obj:
            kind = obj["event"].get("event")
            if kind == "reset":
                self._post(notice="conversation reset", reset=True)
            elif kind == "state_loaded":
                frame = obj["event"].get("frame")
                self._post(notice=f"state loaded (frame {frame})", reset=True)
        elif "stats" not in obj and "done" not in obj and line:
            self._post(notice=line)

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
            self._post(notice=self.error or "session ended (Ctrl+Q quits)")

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
            f"reconnects {c.reconnects}"
        )
