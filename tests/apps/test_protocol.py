"""The wire protocol: every message round-trips, and every malformed input is a ProtocolError.

Hypothesis throws arbitrary bytes (and valid kind bytes followed by arbitrary bodies) at both
parsers: anything other than a parsed message or a ProtocolError is a crash a client could
trigger on the server.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.apps import protocol as P

FMT = P.Format(frame_size=320, num_codebooks=8, cardinality=256, max_text_bytes=64)


def _hello(**kw) -> P.Hello:
    base = dict(
        version=P.VERSION,
        model="tiny",
        codec="default",
        model_fingerprint="abc",
        codec_fingerprint="def",
        sample_rate=16000,
        frame_size=320,
        frame_rate=50.0,
        num_codebooks=8,
        cardinality=256,
        accepts=["PCM", "TYPE"],
        session="s1",
        max_message_bytes=1 << 20,
        max_text_bytes=64,
        extra={"controls": ["RESET"]},
    )
    base.update(kw)
    return P.Hello(**base)


@pytest.mark.parametrize(
    "msg",
    [
        P.Audio(7, np.arange(320, dtype=np.int16) - 160),
        P.Tokens(3, [1, 2, 3, 4, 5, 6, 7, 8], [9] * 10),
        P.Text("héllo", 12, P.Stream.USER),
        P.Stats({"frame": 1, "x": [1.5]}),
        P.Event({"event": "reset", "frame": 0}),
        P.Error(int(P.ErrorCode.FLOOD), "too fast"),
        P.State(P.STATE_MAGIC + b"\x00rest"),
        P.Ping(2**64 - 1),
    ],
)
def test_server_messages_round_trip(msg) -> None:
    got = P.parse_server(P.encode(msg, "server"), FMT)
    assert type(got) is type(msg)
    for k, v in vars(msg).items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(getattr(got, k), v)
        else:
            assert getattr(got, k) == v


@pytest.mark.parametrize(
    "msg",
    [
        P.Audio(2**32 - 1, np.full(320, -32768, dtype=np.int16)),
        P.Codes(5, list(range(8))),
        P.Text("typed ✓"),
        P.Control(P.Op.SAVE_STATE),
        P.Control(P.Op.RESET),
        P.Control(P.Op.LOAD_STATE, P.STATE_MAGIC + bytes(10)),
        P.Ping(42),
    ],
)
def test_client_messages_round_trip(msg) -> None:
    got = P.parse_client(P.encode(msg, "client"), FMT)
    assert type(got) is type(msg)
    for k, v in vars(msg).items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(getattr(got, k), v)
        elif k != "frame" or not isinstance(msg, P.Text):
            assert getattr(got, k) == v


def test_hello_round_trips_and_is_checked() -> None:
    hello = _hello()
    assert P.parse_server(P.encode(hello), None) == hello
    for bad, needle in (
        (_hello(version=2), "version 2"),
        (_hello(frame_size=0), "frame_size"),
        (_hello(cardinality=1 << 17), "uint16"),
        (_hello(accepts=[1]), "accepts"),
    ):
        with pytest.raises(P.ProtocolError, match=needle):
            P.parse_server(P.encode(bad), None)
    raw = P.encode(hello).replace(b'"sample_rate":16000', b'"sample_rate":true')
    with pytest.raises(P.ProtocolError, match="sample_rate"):
        P.parse_server(raw, None)
    with pytest.raises(P.ProtocolError, match="before HELLO"):
        P.parse_server(P.encode(P.Ping(1)), None)


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        (b"", P.ErrorCode.BAD_MESSAGE, "empty"),
        (b"\x7f", P.ErrorCode.UNKNOWN_KIND, "unknown message kind 0x7f"),
        (bytes([P.Kind.AUDIO]) + bytes(644), P.ErrorCode.UNKNOWN_KIND, "not one a client"),
        ("text", P.ErrorCode.UNSUPPORTED, "binary"),
        (bytes([P.Kind.PCM, 0, 0]), P.ErrorCode.BAD_MESSAGE, "truncated"),
        (bytes([P.Kind.PCM]) + bytes(4 + 638), P.ErrorCode.BAD_MESSAGE, "320 int16"),
        (bytes([P.Kind.PCM]) + bytes(4 + 641), P.ErrorCode.BAD_MESSAGE, "641 bytes"),
        (bytes([P.Kind.CODES]) + bytes(4 + 14), P.ErrorCode.BAD_MESSAGE, "8 uint16"),
        (bytes([P.Kind.CODES]) + bytes(4) + b"\x00\x01" * 8, P.ErrorCode.BAD_MESSAGE, ">= 256"),
        (bytes([P.Kind.TYPE]), P.ErrorCode.BAD_MESSAGE, "1..64"),
        (bytes([P.Kind.TYPE]) + b"x" * 65, P.ErrorCode.BAD_MESSAGE, "1..64"),
        (bytes([P.Kind.TYPE]) + b"\xff", P.ErrorCode.BAD_MESSAGE, "UTF-8"),
        (bytes([P.Kind.CONTROL]), P.ErrorCode.BAD_MESSAGE, "truncated"),
        (bytes([P.Kind.CONTROL, 0]), P.ErrorCode.BAD_MESSAGE, "operation 0"),
        (bytes([P.Kind.CONTROL, 1, 0]), P.ErrorCode.BAD_MESSAGE, "no payload"),
        (bytes([P.Kind.CONTROL, 2]) + b"DPLX", P.ErrorCode.BAD_MESSAGE, "magic"),
        (bytes([P.Kind.PING]) + bytes(7), P.ErrorCode.BAD_MESSAGE, "truncated"),
        (bytes([P.Kind.PING]) + bytes(9), P.ErrorCode.BAD_MESSAGE, "9"),
    ],
)
def test_client_parser_names_each_fault(data, code, needle) -> None:
    with pytest.raises(P.ProtocolError, match=needle) as info:
        P.parse_client(data, FMT)
    assert info.value.code == code
    assert info.value.close_code in (1003, 1008)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (bytes([P.Kind.TEXT, 0, 0, 0, 0, 5]) + b"x", "stream 5"),
        (bytes([P.Kind.TEXT, 0, 0, 0, 0, 0]), "no text"),
        (bytes([P.Kind.STATS]) + b"[1]", "JSON object"),
        (bytes([P.Kind.STATS]) + b"{", "not valid JSON"),
        (bytes([P.Kind.STATS]) + b"[" * 100000, "not valid JSON"),
        (bytes([P.Kind.EVENT]) + b'{"event": 1}', "event"),
        (bytes([P.Kind.TOKENS, 0, 0, 0, 0, 2, 1]) + bytes(11), r"2 \+ 1"),
        (bytes([P.Kind.ERROR, 1]), "truncated"),
        (bytes([P.Kind.STATE]) + b"nope", "magic"),
    ],
)
def test_server_parser_names_each_fault(data, needle) -> None:
    with pytest.raises(P.ProtocolError, match=needle):
        P.parse_server(data, FMT)


def _parse_or_protocol_error(parse, data) -> None:
    try:
        parse(data)
    except P.ProtocolError as e:
        assert str(e)
        assert e.close_code in (1003, 1008, 1011, 1013, 4000)


KINDS = st.sampled_from([int(k) for k in P.Kind] + [0, 0x40, 0x46, 0xFF])


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=700))
def test_fuzz_any_bytes(data: bytes) -> None:
    _parse_or_protocol_error(lambda d: P.parse_client(d, FMT), data)
    _parse_or_protocol_error(lambda d: P.parse_server(d, FMT), data)
    _parse_or_protocol_error(lambda d: P.parse_server(d, None), data)


@settings(max_examples=3000, deadline=None)
@given(KINDS, st.binary(max_size=700))
def test_fuzz_known_kinds_with_random_bodies(kind: int, body: bytes) -> None:
    data = bytes([kind]) + body
    _parse_or_protocol_error(lambda d: P.parse_client(d, FMT), data)
    _parse_or_protocol_error(lambda d: P.parse_server(d, FMT), data)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=20),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=20,
    ),
    st.integers(0, 3),
)
def test_fuzz_hello_bodies(obj: dict, version: int) -> None:
    import json

    data = bytes([P.Kind.HELLO]) + version.to_bytes(2, "little") + json.dumps(obj).encode()
    _parse_or_protocol_error(lambda d: P.parse_server(d, None), data)


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=16), st.integers(0, 2**32 - 1))
def test_fuzz_text_round_trip(text: str, frame: int) -> None:
    got = P.parse_server(P.encode(P.Text(text, frame, P.Stream.MODEL)), FMT)
    assert got == P.Text(text, frame, P.Stream.MODEL)
    if len(text.encode()) <= FMT.max_text_bytes:
        assert P.parse_client(P.encode(P.Text(text), "client"), FMT).text == text
