"""What `duplex connect` is told, what it counts, and how a session can end: its settings,
its counters across reconnects, the two ways a server turns it away, and its URLs."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from duplex.streamer.events import Report

if TYPE_CHECKING:
    from duplex.apps.jitter import JitterBuffer


@dataclass
class ConnectConfig:
    """Client settings."""

    url: str
    token: str | None = None
    seed: int | None = None
    text: str = ""
    jitter_target: int = 3
    jitter_max: int = 10
    retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 10.0
    tail_seconds: float = 1.0
    max_seconds: float | None = None
    save_state: str | None = None
    load_state: str | None = None
    cafile: str | None = None
    json_lines: bool = False
    record: str | None = None
    transcript: str | None = None
    # Audio on the wire: "pcm" (int16) or "opus" (20 ms packets both ways; docs/protocol.md).
    wire: str = "pcm"


class Retry(Exception):
    """The server turned the session away for now (full, shutting down): try again later."""


class ServerRefused(Exception):
    """The server refused the session for good (auth, protocol, policy): do not retry."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Counters:
    """What the client saw, across reconnects."""

    sent: int = 0
    received: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))
    rtt_ms: float | None = None
    server: dict[str, Any] = field(default_factory=dict)
    reconnects: int = 0
    sessions: int = 0
    transcript: list[str] = field(default_factory=list)
    # Audio bytes on the wire (PCM or Opus payloads), for the bitrate a session costs.
    audio_bytes_sent: int = 0
    audio_bytes_received: int = 0

    def stats(self, jitter: JitterBuffer) -> Report:
        """The once-a-second stats event: what was sent and received, round trip, latency,
        the jitter buffer (`jitter`) and what the server last said about this session."""
        lat = np.fromiter(self.latency_ms, dtype=np.float64)
        p50, p99 = np.percentile(lat, [50, 99]).tolist() if lat.size else (0.0, 0.0)
        s = self.server
        obj = {
            "sent": self.sent,
            "received": self.received,
            "rtt_ms": self.rtt_ms,
            "latency_ms": {"p50": p50, "p99": p99},
            "jitter_depth": jitter.depth,
            "jitter_dropped": jitter.dropped,
            "underruns": jitter.underruns,
            "reconnects": self.reconnects,
            "server_dropped_input": s.get("dropped_input_frames", 0),
            "server_queue": s.get("queue_depth", 0),
        }
        rtt = f"{self.rtt_ms:.1f} ms" if self.rtt_ms is not None else "-"
        line = (
            f"[stats] sent {obj['sent']} recv {obj['received']} | rtt {rtt} | latency p50 "
            f"{p50:.0f} ms p99 {p99:.0f} ms | jitter {obj['jitter_depth']} frames, dropped "
            f"{obj['jitter_dropped']}, underruns {obj['underruns']} | server drops "
            f"{obj['server_dropped_input']} queue {obj['server_queue']}"
        )
        return Report("stats", obj, line)

    def summary(self) -> Report:
        """The closing event: frames each way and everything the model said."""
        return Report(
            "done",
            {"sent": self.sent, "received": self.received},
            f"[done] sent {self.sent} frames, received {self.received}; "
            f"model said: {''.join(self.transcript)!r}",
        )


def with_query(url: str, **params: Any) -> str:
    """`url` with the given query parameters added or replaced (None values skipped)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({k: str(v) for k, v in params.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))


def redact_url(url: str) -> str:
    """The URL without a `token` query parameter: fit for titles, logs and recordings."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    return urlunsplit(parts._replace(query=urlencode(query)))
