"""What `duplex connect` is told, what it counts, and how a session can end: its settings,
its counters across reconnects, the two ways a server turns it away, and its URLs."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


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
