"""The messages of the duplex wire protocol: kinds, codes, and one dataclass per message.

What crosses the wire, as values: `duplex.apps.protocol` turns bytes into these (strictly) and
these into bytes. The byte layouts, the handshake and every close code are in docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

VERSION = 1
STATE_MAGIC = b"DPLXSTAT"
MAX_TEXT_BYTES = 1024
# The largest Opus packet of one frame (RFC 6716, 3.2.1); larger is not one Opus packet.
MAX_OPUS_BYTES = 1275


class Kind(IntEnum):
    """Message kinds (byte 0 of every message)."""

    HELLO = 0x01
    AUDIO = 0x02
    TEXT = 0x03
    STATS = 0x04
    ERROR = 0x05
    STATE = 0x06
    PONG = 0x07
    EVENT = 0x08
    TOKENS = 0x09
    OPUS_AUDIO = 0x0A
    PCM = 0x41
    CODES = 0x42
    TYPE = 0x43
    CONTROL = 0x44
    PING = 0x45
    OPUS = 0x46


# The direction is in the number: server to client below 0x40, client to server above.
SERVER_KINDS = frozenset(k for k in Kind if k < 0x40)
CLIENT_KINDS = frozenset(k for k in Kind if k > 0x40)


class Op(IntEnum):
    """CONTROL operations."""

    SAVE_STATE = 1
    LOAD_STATE = 2
    RESET = 3


class Stream(IntEnum):
    """Which text stream a TEXT message carries."""

    MODEL = 0
    USER = 1


class ErrorCode(IntEnum):
    """Codes of ERROR messages; `CLOSE_FOR` says which websocket close code follows."""

    BAD_MESSAGE = 1
    UNKNOWN_KIND = 2
    UNSUPPORTED = 3
    FLOOD = 4
    STATE = 5
    FULL = 6
    INTERNAL = 7
    IDLE = 8


class Close(IntEnum):
    """Websocket close codes the server uses (see docs/protocol.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN = 1013
    IDLE = 4000


# An ERROR with STATE is advisory (the session goes on); every other code ends the session.
CLOSE_FOR: dict[ErrorCode, Close | None] = {
    ErrorCode.BAD_MESSAGE: Close.POLICY,
    ErrorCode.UNKNOWN_KIND: Close.UNSUPPORTED_DATA,
    ErrorCode.UNSUPPORTED: Close.UNSUPPORTED_DATA,
    ErrorCode.FLOOD: Close.POLICY,
    ErrorCode.STATE: None,
    ErrorCode.FULL: Close.TRY_AGAIN,
    ErrorCode.INTERNAL: Close.INTERNAL,
    ErrorCode.IDLE: Close.IDLE,
}


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is the ERROR code to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(message)
        self.code = code

    @property
    def close_code(self) -> int:
        close = CLOSE_FOR[self.code]
        return int(close if close is not None else Close.POLICY)


@dataclass(frozen=True)
class Format:
    """What the receiver needs to know to check sizes: fixed by the handshake."""

    frame_size: int
    num_codebooks: int
    cardinality: int
    max_text_bytes: int = MAX_TEXT_BYTES


@dataclass
class Hello:
    """The server's first message: who it is and what the client may send."""

    version: int
    model: str
    codec: str
    model_fingerprint: str
    codec_fingerprint: str
    sample_rate: int
    frame_size: int
    frame_rate: float
    num_codebooks: int
    cardinality: int
    accepts: list[str]
    session: str
    max_message_bytes: int
    max_text_bytes: int = MAX_TEXT_BYTES
    extra: dict[str, Any] = field(default_factory=dict)

    def format(self) -> Format:
        return Format(self.frame_size, self.num_codebooks, self.cardinality, self.max_text_bytes)


@dataclass
class Audio:
    """One frame of PCM: server output (AUDIO) or client input (PCM). `pcm` is int16."""

    frame: int
    pcm: np.ndarray


@dataclass
class Opus:
    """One 20 ms frame as an Opus packet: server output (OPUS_AUDIO) or client input (OPUS).
    Only the packet's size is checked here; whether libopus takes it is the receiver's
    decoder's business (`duplex.apps.wire_opus`), since a packet depends on those before it."""

    frame: int
    packet: bytes


@dataclass
class Codes:
    """One frame of codec tokens from the client ([num_codebooks] ints)."""

    frame: int
    codes: list[int]


@dataclass
class Tokens:
    """The tokens of one step (opt-in with ?tokens=1): what the codec made of the client's frame
    and what the model sampled (its audio codebooks, its text token, the user-text token)."""

    frame: int
    tokens_in: list[int]
    tokens_out: list[int]


@dataclass
class Text:
    """A piece of text: the model's words or the user's transcript (server), or typed (client)."""

    text: str
    frame: int = 0
    stream: Stream = Stream.MODEL


@dataclass
class Stats:
    """A JSON stats object the server sends about once a second."""

    data: dict[str, Any]


@dataclass
class Event:
    """A JSON event (state loaded, reset done, ...), always with an "event" string."""

    data: dict[str, Any]


@dataclass
class Error:
    """An error report; unless the code is STATE, a close follows."""

    code: int
    message: str


@dataclass
class State:
    """A saved state file's bytes (server reply to SAVE_STATE)."""

    blob: bytes


@dataclass
class Control:
    """A client request: save state, load state (with its bytes), reset."""

    op: Op
    blob: bytes = b""


@dataclass
class Ping:
    """A client ping (PING) or the server's echo (PONG) of the same nonce."""

    nonce: int


Message = (
    Hello | Audio | Opus | Codes | Tokens | Text | Stats | Event | Error | State | Control | Ping
)
ClientMessage = Audio | Opus | Codes | Text | Control | Ping
