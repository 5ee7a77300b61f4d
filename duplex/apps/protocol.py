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
from typing import Any

import numpy as np

from duplex.apps.protocol_messages import (
    CLIENT_KINDS,
    CLOSE_FOR,
    MAX_OPUS_BYTES,
    MAX_TEXT_BYTES,
    SERVER_KINDS,
    STATE_MAGIC,
    VERSION,
    Audio,
    ClientMessage,
    Close,
    Codes,
    Control,
    Error,
    ErrorCode,
    Event,
    Format,
    Hello,
    Kind,
    Message,
    Op,
    Opus,
    Ping,
    ProtocolError,
    State,
    Stats,
    Stream,
    Text,
    Tokens,
)

# The message types live in `protocol_messages`; every caller names them through this module.
__all__ = [
    "CLIENT_KINDS",
    "CLOSE_FOR",
    "MAX_OPUS_BYTES",
    "MAX_TEXT_BYTES",
    "SERVER_KINDS",
    "STATE_MAGIC",
    "VERSION",
    "Audio",
    "ClientMessage",
    "Close",
    "Codes",
    "Control",
    "Error",
    "ErrorCode",
    "Event",
    "Format",
    "Hello",
    "Kind",
    "Message",
    "Op",
    "Opus",
    "Ping",
    "ProtocolError",
    "State",
    "Stats",
    "Stream",
    "Text",
    "Tokens",
    "encode",
    "int16_to_pcm",
    "parse_client",
    "parse_server",
    "pcm_to_int16",
]


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
