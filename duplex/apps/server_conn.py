"""One client connection of `duplex serve`: its lane in the scheduler and its output queue.

The scheduler hands a connection its frames' results on the event loop; the connection only
queues the messages, and a writer task of its own sends them. The output queue is bounded in
messages and in bytes: a client that stops reading loses its oldest messages (counted) instead
of making the server buffer without limit, and never delays any other session.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from duplex.apps import protocol as P
from duplex.streamer.scheduler import Lane

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from duplex.apps.server_wire import OrderedWork
    from duplex.apps.wire_opus import OpusDecoder, OpusEncoder
    from duplex.streamer.engine import SamplingConfig, Session

_STATE = bytes([P.Kind.STATE])


class LimitError(Exception):
    """A session went over one of its budgets: it gets `code` and a close."""

    def __init__(self, message: str, code: P.ErrorCode = P.ErrorCode.FLOOD) -> None:
        super().__init__(message)
        self.code = code


def close_reason(message: str) -> str:
    """A close reason must fit in 123 UTF-8 bytes."""
    raw = message.encode("utf-8")[:120]
    return raw.decode("utf-8", errors="ignore")


@dataclass(eq=False)
class Conn:
    """One client connection and its session's server-side bookkeeping."""

    ws: ServerConnection | None
    sid: str
    sampling: SamplingConfig | None
    queue_frames: int
    out_limit: int
    out_limit_bytes: int = 4 << 20
    tokens: bool = False
    peer: str = ""
    lane: Lane | None = None
    segment: int = 0
    closed: bool = False
    out: collections.deque = field(default_factory=collections.deque)
    out_bytes: int = 0
    state_pending: int = 0
    last_audio: float = field(default_factory=time.monotonic)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped_output_messages: int = 0
    frames_out: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))
    # Opus on the wire (docs/protocol.md): this session's own decoder of its OPUS input (made
    # at its first OPUS frame) and encoder of its answers (with ?audio=opus).
    opus_in: OpusDecoder | None = None
    opus_out: OpusEncoder | None = None
    # Where that codec work runs, in order, off the event loop and the engine thread
    # (`duplex.apps.server_wire`): decoding what arrives, encoding what leaves.
    wire_in: OrderedWork | None = None
    wire_out: OrderedWork | None = None

    @property
    def session(self) -> Session | None:
        return self.lane.session if self.lane is not None else None

    @session.setter
    def session(self, value: Session | None) -> None:
        self.lane.session = value

    def send(self, data: bytes) -> None:
        """Queue one outgoing message, after the frames still being encoded for this session:
        a reply never overtakes the audio of the frames stepped before it."""
        if self.wire_out is not None and self.wire_out.busy:
            self.wire_out.put(None, lambda _: self.queue(data))
        else:
            self.queue(data)

    def queue(self, data: bytes) -> None:
        """Queue one outgoing message for the writer task now. The queue is bounded in messages
        and in bytes: when either is full, its oldest messages are dropped (counted)."""
        if self.closed:
            return
        while self.out and (
            len(self.out) >= self.out_limit or self.out_bytes + len(data) > self.out_limit_bytes
        ):
            self._took(self.out.popleft())
            self.dropped_output_messages += 1
        self.out.append(data)
        self.out_bytes += len(data)
        if data[:1] == _STATE:
            self.state_pending += 1
        self.wake.set()

    def _took(self, data: bytes) -> None:
        """Bookkeeping for a message that left the output queue (sent or dropped)."""
        self.out_bytes -= len(data)
        if data[:1] == _STATE:
            self.state_pending -= 1

    def next_out(self) -> bytes:
        data = self.out.popleft()
        self._took(data)
        return data

    def stats(self, sessions: int, engine: dict[str, Any]) -> P.Stats:
        """This connection's STATS message (`engine`: the engine's stage times)."""
        lat = np.fromiter(self.latency_ms, dtype=np.float64)
        p50, p99 = np.percentile(lat, [50, 99]).tolist() if lat.size else (0.0, 0.0)
        lane = self.lane
        return P.Stats(
            {
                "session": self.sid,
                "frame": int(self.session.frame) if self.session is not None else 0,
                "frames_in": lane.frames_in,
                "frames_out": self.frames_out,
                "queue_depth": len(lane.inbox),
                "dropped_input_frames": lane.dropped,
                "dropped_output_messages": self.dropped_output_messages,
                "server_latency_ms": {"p50": p50, "p99": p99},
                "sessions": sessions,
                "engine": engine,
            }
        )
