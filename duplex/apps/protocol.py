"""The duplex wire protocol: binary websocket messages whose first byte is the kind.

Both directions are parsed strictly: anything that is not exactly one well-formed message of a
kind the receiver accepts is a `ProtocolError` naming what is wrong, never another exception, so
a server can answer garbage with an error message and a close code instead of crashing. The byte
layouts, the handshake and every close code are documented in docs/protocol.md; this module is
the single implementation both `duplex serve` and `duplex connect` use.

Kinds are split by direction (server to client 0x01-0x0F, client to server 0x41-0x4F) so a
message sent the wrong way is recognisably unknown rather than misread. Integers are
little-endian; audio is mono int16 PCM, exactly one codec frame per message.
"""

from __future__ import annotations

import json
import struct
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

_U8 = struct.Struct("<B")
_HDR_HELLO = struct.Struct("<BH")
_HDR_FRAME = struct.Struct("<BI")
_HDR_TEXT = struct.Struct("<BIB")
_HDR_ERROR = struct.Struct("<BH")
_HDR_NONCE = struct.Struct("<BQ")
_HDR_TOKENS = struct.Struct("<BIBB")
_HDR_CONTROL = struct.Struct("<BB")

_HELLO_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "codec": str,
    "model_fingerprint": str,
    "codec_fingerprint": str,
    "sample_rate": int,
    "frame_size": int,
    "frame_rate": (int, float),
    "num_codebooks": int,
    "cardinality": int,
    "accepts": list,
    "session": str,
    "max_message_bytes": int,
    "max_text_bytes": int,
}


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _utf8(payload: bytes, what: str) -> str:
    try:
        return payload.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} is not valid UTF-8 (byte {e.start})") from None


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    text = _utf8(payload, what)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _pcm(payload: bytes, fmt: Format, what: str) -> np.ndarray:
    want = 2 * fmt.frame_size
    if len(payload) != want:
        raise ProtocolError(
            f"{what} carries {len(payload)} bytes of audio; one frame is {fmt.frame_size} int16 "
            f"samples ({want} bytes)"
        )
    return np.frombuffer(payload, dtype="<i2").astype(np.int16)


def _opus(data: bytes, kind: Kind) -> Opus:
    _, seq = _need(data, _HDR_FRAME, kind)
    packet = data[_HDR_FRAME.size :]
    if not 1 <= len(packet) <= MAX_OPUS_BYTES:
        raise ProtocolError(
            f"{kind.name} message carries {len(packet)} bytes; an Opus packet is "
            f"1..{MAX_OPUS_BYTES} bytes"
        )
    return Opus(seq, bytes(packet))


def _state_blob(payload: bytes, what: str) -> bytes:
    if not payload.startswith(STATE_MAGIC):
        raise ProtocolError(f"{what} does not hold a state file (no {STATE_MAGIC!r} magic)")
    return bytes(payload)


def _kind(data: bytes, allowed: frozenset[Kind], who: str) -> Kind:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(
            f"expected a binary message, got {type(data).__name__}", ErrorCode.UNSUPPORTED
        )
    if len(data) == 0:
        raise ProtocolError("empty message (no kind byte)")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError(
            f"unknown message kind 0x{data[0]:02x}", ErrorCode.UNKNOWN_KIND
        ) from None
    if kind not in allowed:
        raise ProtocolError(
            f"message kind {kind.name} (0x{kind:02x}) is not one a {who} may send",
            ErrorCode.UNKNOWN_KIND,
        )
    return kind


def _need(data: bytes, st: struct.Struct, kind: Kind) -> tuple:
    if len(data) < st.size:
        raise ProtocolError(
            f"{kind.name} message truncated: {len(data)} bytes, its header alone is {st.size}"
        )
    return st.unpack_from(data)


def parse_client(data: bytes, fmt: Format) -> ClientMessage:
    """Parse one client-to-server message (the server's side)."""
    kind = _kind(data, CLIENT_KINDS, "client")
    data = bytes(data)
    if kind == Kind.PCM:
        _, seq = _need(data, _HDR_FRAME, kind)
        return Audio(seq, _pcm(data[_HDR_FRAME.size :], fmt, "PCM message"))
    if kind == Kind.OPUS:
        return _opus(data, kind)
    if kind == Kind.CODES:
        _, seq = _need(data, _HDR_FRAME, kind)
        body = data[_HDR_FRAME.size :]
        if len(body) != 2 * fmt.num_codebooks:
            raise ProtocolError(
                f"CODES message carries {len(body)} bytes; one frame is {fmt.num_codebooks} "
                f"uint16 codes ({2 * fmt.num_codebooks} bytes)"
            )
        codes = np.frombuffer(body, dtype="<u2").tolist()
        bad = [c for c in codes if c >= fmt.cardinality]
        if bad:
            raise ProtocolError(f"CODES message has code {bad[0]} >= {fmt.cardinality}")
        return Codes(seq, codes)
    if kind == Kind.TYPE:
        body = data[1:]
        if not 1 <= len(body) <= fmt.max_text_bytes:
            raise ProtocolError(
                f"TYPE message carries {len(body)} bytes of text; allowed 1..{fmt.max_text_bytes}"
            )
        return Text(_utf8(body, "TYPE text"))
    if kind == Kind.CONTROL:
        _, op = _need(data, _HDR_CONTROL, kind)
        body = data[_HDR_CONTROL.size :]
        try:
            op = Op(op)
        except ValueError:
            raise ProtocolError(f"unknown CONTROL operation {op}") from None
        if op == Op.LOAD_STATE:
            return Control(op, _state_blob(body, "LOAD_STATE"))
        if body:
            raise ProtocolError(f"CONTROL {op.name} takes no payload, got {len(body)} bytes")
        return Control(op)
    _, nonce = _need(data, _HDR_NONCE, kind)
    if len(data) != _HDR_NONCE.size:
        raise ProtocolError(f"PING message must be {_HDR_NONCE.size} bytes, got {len(data)}")
    return Ping(nonce)


def parse_server(
    data: bytes, fmt: Format | None
) -> Hello | Audio | Opus | Tokens | Text | Stats | Event | Error | State | Ping:
    """Parse one server-to-client message (the client's side); `fmt` is None before HELLO."""
    kind = _kind(data, SERVER_KINDS, "server")
    data = bytes(data)
    if kind == Kind.HELLO:
        _, version = _need(data, _HDR_HELLO, kind)
        return _hello(version, _json_object(data[_HDR_HELLO.size :], "HELLO body"))
    if kind == Kind.ERROR:
        # Allowed before HELLO: a server that is full says so instead of shaking hands.
        _, code = _need(data, _HDR_ERROR, kind)
        return Error(code, _utf8(data[_HDR_ERROR.size :], "ERROR message"))
    if fmt is None:
        raise ProtocolError(f"{kind.name} before HELLO: the handshake must come first")
    if kind == Kind.AUDIO:
        _, frame = _need(data, _HDR_FRAME, kind)
        return Audio(frame, _pcm(data[_HDR_FRAME.size :], fmt, "AUDIO message"))
    if kind == Kind.OPUS_AUDIO:
        return _opus(data, kind)
    if kind == Kind.TEXT:
        _, frame, stream = _need(data, _HDR_TEXT, kind)
        try:
            stream = Stream(stream)
        except ValueError:
            raise ProtocolError(f"TEXT message names unknown stream {stream}") from None
        body = data[_HDR_TEXT.size :]
        if not body:
            raise ProtocolError("TEXT message carries no text")
        return Text(_utf8(body, "TEXT text"), frame, stream)
    if kind == Kind.TOKENS:
        _, frame, n_in, n_out = _need(data, _HDR_TOKENS, kind)
        body = data[_HDR_TOKENS.size :]
        if len(body) != 4 * (n_in + n_out):
            raise ProtocolError(
                f"TOKENS message announces {n_in} + {n_out} uint32 tokens but carries "
                f"{len(body)} bytes"
            )
        values = np.frombuffer(body, dtype="<u4").tolist()
        return Tokens(frame, values[:n_in], values[n_in:])
    if kind == Kind.STATS:
        return Stats(_json_object(data[1:], "STATS body"))
    if kind == Kind.EVENT:
        obj = _json_object(data[1:], "EVENT body")
        if not isinstance(obj.get("event"), str):
            raise ProtocolError('EVENT body lacks an "event" string')
        return Event(obj)
    if kind == Kind.STATE:
        return State(_state_blob(data[1:], "STATE message"))
    _, nonce = _need(data, _HDR_NONCE, kind)
    if len(data) != _HDR_NONCE.size:
        raise ProtocolError(f"PONG message must be {_HDR_NONCE.size} bytes, got {len(data)}")
    return Ping(nonce)


def _hello(version: int, obj: dict[str, Any]) -> Hello:
    if version != VERSION:
        raise ProtocolError(
            f"server speaks protocol version {version}; this client speaks {VERSION}",
            ErrorCode.UNSUPPORTED,
        )
    for name, typ in _HELLO_FIELDS.items():
        value = obj.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ProtocolError(f"HELLO field {name!r} is missing or not a {typ}")
    for name in ("sample_rate", "frame_size", "num_codebooks", "cardinality", "max_text_bytes"):
        if not 0 < obj[name] < 1 << 31:
            raise ProtocolError(f"HELLO field {name!r} is out of range: {obj[name]}")
    if not 0 < obj["frame_rate"] < 1e6:
        raise ProtocolError(f"HELLO frame_rate is out of range: {obj['frame_rate']}")
    if obj["cardinality"] > 1 << 16:
        raise ProtocolError(f"HELLO cardinality {obj['cardinality']} does not fit uint16 codes")
    if not all(isinstance(a, str) for a in obj["accepts"]):
        raise ProtocolError("HELLO accepts must be a list of kind names")
    known = {k: obj[k] for k in _HELLO_FIELDS}
    extra = {k: v for k, v in obj.items() if k not in _HELLO_FIELDS}
    return Hello(version=version, extra=extra, **known)


def encode(msg: Message, direction: str = "server") -> bytes:
    """Serialise a message. `direction` disambiguates the shared dataclasses: "server" makes
    AUDIO/OPUS_AUDIO/TEXT/PONG, "client" makes PCM/OPUS/TYPE/PING."""
    if direction not in ("server", "client"):
        raise ValueError("direction must be 'server' or 'client'")
    server = direction == "server"
    if isinstance(msg, Hello):
        body = {k: getattr(msg, k) for k in _HELLO_FIELDS} | msg.extra
        return _HDR_HELLO.pack(Kind.HELLO, msg.version) + _json(body)
    if isinstance(msg, Audio):
        pcm = np.asarray(msg.pcm)
        if pcm.dtype != np.int16:
            raise ValueError("audio must be int16")
        kind = Kind.AUDIO if server else Kind.PCM
        return _HDR_FRAME.pack(kind, msg.frame) + pcm.astype("<i2").tobytes()
    if isinstance(msg, Opus):
        if not 1 <= len(msg.packet) <= MAX_OPUS_BYTES:
            raise ValueError(f"an Opus packet is 1..{MAX_OPUS_BYTES} bytes")
        kind = Kind.OPUS_AUDIO if server else Kind.OPUS
        return _HDR_FRAME.pack(kind, msg.frame) + bytes(msg.packet)
    if isinstance(msg, Codes):
        return _HDR_FRAME.pack(Kind.CODES, msg.frame) + np.asarray(msg.codes, "<u2").tobytes()
    if isinstance(msg, Tokens):
        head = _HDR_TOKENS.pack(Kind.TOKENS, msg.frame, len(msg.tokens_in), len(msg.tokens_out))
        return head + np.asarray([*msg.tokens_in, *msg.tokens_out], "<u4").tobytes()
    if isinstance(msg, Text):
        if server:
            return _HDR_TEXT.pack(Kind.TEXT, msg.frame, msg.stream) + msg.text.encode("utf-8")
        return _U8.pack(Kind.TYPE) + msg.text.encode("utf-8")
    if isinstance(msg, Stats):
        return _U8.pack(Kind.STATS) + _json(msg.data)
    if isinstance(msg, Event):
        return _U8.pack(Kind.EVENT) + _json(msg.data)
    if isinstance(msg, Error):
        return _HDR_ERROR.pack(Kind.ERROR, msg.code) + msg.message.encode("utf-8")
    if isinstance(msg, State):
        return _U8.pack(Kind.STATE) + msg.blob
    if isinstance(msg, Control):
        return _HDR_CONTROL.pack(Kind.CONTROL, msg.op) + msg.blob
    if isinstance(msg, Ping):
        return _HDR_NONCE.pack(Kind.PONG if server else Kind.PING, msg.nonce)
    raise TypeError(f"not a protocol message: {type(msg).__name__}")


def pcm_to_int16(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 on the same grid the engine uses (k / 32767)."""
    return np.round(np.clip(np.asarray(x, np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)


def int16_to_pcm(x: np.ndarray) -> np.ndarray:
    """int16 samples back to float32 (k / 32767, the inverse of `pcm_to_int16`)."""
    return (np.asarray(x, np.int16).astype(np.float32) / 32767.0).astype(np.float32)
