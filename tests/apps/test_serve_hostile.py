"""`duplex serve` under hostile clients: one client must never harm another.

Each test runs a real server on 127.0.0.1 with one honest client streaming beside the attack.
The honest client measures itself alone and during the attack, in the same run: it must never
be closed, its unanswered frames stay within 1% of its frames (one frame in 100), and its waits
for answers may grow only within the margins below.

The machine these tests run on has 2 cores shared with other jobs (load average 3-4); there
one tiny-model step took 25-30 ms (p50), more than a 20 ms frame, so a strictly real-time
client built a backlog and its waits drifted by up to 0.9 s with no attack at all. So the honest
client sends one frame per 20 ms but never more than one unanswered (real time where the
machine allows it, no backlog where it does not), streams alone before and after the attack,
and its answers under attack are judged against the worse of the two stretches: 95th
percentile wait within 200 ms, the longest wait within 500 ms. That catches every freeze issue
18 measured (10 s, 17 s, 1.1-1.6 s per load). The attacker must get a clear ERROR (or HTTP
refusal) and a close, and the server's memory may grow by less than 100 MB per attacker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from duplex.apps import protocol as P
from tests.apps.test_serve import Client, _frames, _url, client
from tests.apps.test_serve import running as _running
from tests.streamer.test_statefile import rewrite, split

P95_MARGIN_S = 0.2
MAX_MARGIN_S = 0.5


def running(parts, **kw):
    kw.setdefault("queue_frames", 50)
    return _running(parts, **kw)


@pytest.fixture(scope="module")
def parts():
    import torch

    from duplex.codecs.small import SmallCodec, SmallCodecConfig
    from duplex.model.duplex_lm import load

    torch.manual_seed(0)
    return load("tiny"), SmallCodec(SmallCodecConfig()).eval()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Run:
    """What the honest client saw in one stretch of streaming."""

    sent: int
    answered: int
    p95_wait_s: float
    max_wait_s: float
    closed: str | None

    @property
    def lost(self) -> int:
        return self.sent - self.answered


async def honest_stream(c: Client, n: int, start: int, seed: int = 5) -> Run:
    """Send n frames, one every 20 ms, but never more than one waiting for its answer: on a
    machine too loaded to step in real time, a backlog would otherwise grow and hide the
    attack in the noise. Each answer (AUDIO) is timed against its frame's send time; a frame
    not answered within 10 s is lost."""
    frames = _frames(seed, n)
    waits: list[float] = []
    t0 = time.monotonic()
    try:
        for i, f in enumerate(frames):
            await asyncio.sleep(max(0.0, t0 + 0.02 * i - time.monotonic()))
            sent = time.monotonic()
            await c.ws.send(P.encode(P.Audio(start + i, f), "client"))
            deadline = sent + 10.0
            with contextlib.suppress(TimeoutError):
                while True:
                    msg = await c.recv(timeout=max(0.0, deadline - time.monotonic()))
                    if isinstance(msg, P.Audio) and msg.frame == start + i:
                        waits.append(time.monotonic() - sent)
                        break
                    if isinstance(msg, P.Error):
                        raise AssertionError(f"the honest client got an ERROR: {msg}")
    except ConnectionClosed as e:
        return Run(n, len(waits), 0.0, 0.0, repr(e))
    p95 = float(np.percentile(waits, 95)) if waits else 0.0
    return Run(n, len(waits), p95, max(waits, default=0.0), None)


@contextlib.asynccontextmanager
async def honest_beside(server, n: int = 100):
    """An honest session: `n` frames alone, `n` frames while the body of the block attacks, and
    `n` frames alone again. Yields a dict that holds the three runs afterwards."""
    result: dict[str, Run] = {}
    async with client(server, seed=5) as c:
        result["before"] = await honest_stream(c, n, 0)
        task = asyncio.create_task(honest_stream(c, n, n))
        try:
            yield result
        finally:
            result["attack"] = await task
            result["after"] = await honest_stream(c, n, 2 * n)


def assert_unharmed(result: dict[str, Run]) -> None:
    """Never closed; waits and losses under attack within the margins of the worse of the two
    baselines (before and after: the machine's load drifts)."""
    before, attack, after = result["before"], result["attack"], result["after"]
    assert before.closed is None and attack.closed is None and after.closed is None, attack
    p95 = max(before.p95_wait_s, after.p95_wait_s)
    longest = max(before.max_wait_s, after.max_wait_s)
    lost = max(before.lost, after.lost)
    assert attack.p95_wait_s <= p95 + P95_MARGIN_S, (before, attack, after)
    assert attack.max_wait_s <= longest + MAX_MARGIN_S, (
        f"answers paused {attack.max_wait_s * 1000:.0f} ms under attack, "
        f"{longest * 1000:.0f} ms alone"
    )
    assert attack.lost - lost <= max(1, 0.01 * attack.sent), (before, attack, after)


async def _state_of(c: Client) -> bytes:
    await c.ws.send(P.encode(P.Control(P.Op.SAVE_STATE), "client"))
    while not isinstance(msg := await c.recv(), P.State):
        pass
    return msg.blob


async def _error(c: Client) -> P.Error:
    while not isinstance(msg := await c.recv(), P.Error):
        pass
    return msg


def _crafted(blob: bytes, **meta) -> bytes:
    """The attacker's own state, edited, with the checksum recomputed (no signature)."""
    header, payload = split(blob)
    header["meta"].update(meta)
    return rewrite(header, payload)


CRAFTED_META = [
    {"prev_text": 10**6},
    {"prev_user_text": -1},
    {"pending_c0": [70000]},
    {"frame": "x"},
    {"model_plain": {"backbone.reader/lengths": [2], "backbone.reader/offsets": [1 << 70]}},
]


@pytest.mark.parametrize("allow_unsigned", [False, True])
async def test_crafted_states_are_refused_and_close_no_one(parts, allow_unsigned) -> None:
    """Issue 18 #1: an edited state with a recomputed checksum used to load and then fail the
    next batched step, closing every session (1011)."""
    async with (
        running(parts, max_sessions=4, allow_unsigned_states=allow_unsigned) as server,
        honest_beside(server) as result,
        client(server, seed=1) as bad,
    ):
        await bad.send_frames(_frames(2, 2))
        blob = await _state_of(bad)
        for meta in CRAFTED_META:
            await bad.ws.send(
                P.encode(P.Control(P.Op.LOAD_STATE, _crafted(blob, **meta)), "client")
            )
            err = await _error(bad)
            assert err.code == P.ErrorCode.STATE, err
            if allow_unsigned:
                assert err.message.startswith("LOAD_STATE failed: the LOAD_STATE payload: "), err
            else:
                assert "not signed by this server" in err.message, err
            assert "/tmp" not in err.message, err.message
            await asyncio.sleep(0.6)  # within the CONTROL rate
        # The attacker's own session goes on; its genuine state still loads.
        await bad.ws.send(P.encode(P.Control(P.Op.LOAD_STATE, blob), "client"))
        while not isinstance(msg := await bad.recv(), P.Event):
            pass
        assert msg.data["event"] == "state_loaded"
        await bad.send_frames(_frames(2, 2), 2)
        await bad.collect(2)
        assert server.failed_steps == 0
    assert_unharmed(result)


async def test_tiny_state_declaring_a_huge_history(parts) -> None:
    """Issue 18 #2: ~140 KB declaring 16M ids with zero payload froze everyone 17 s and took
    2 GB. Now refused before anything is allocated."""
    async with (
        running(parts, max_sessions=4, allow_unsigned_states=True) as server,
        honest_beside(server) as result,
        client(server) as bad,
    ):
        blob = await _state_of(bad)
        header, payload = split(blob)
        (e,) = [e for e in header["tensors"] if e["name"].endswith("/ids.0")]
        e["shape"], e["nbytes"] = [16_000_000], 0
        header["meta"]["model_plain"]["backbone.reader/lengths"] = [16_000_000]
        before = rss_mb()
        t0 = time.monotonic()
        await bad.ws.send(P.encode(P.Control(P.Op.LOAD_STATE, rewrite(header, payload)), "client"))
        err = await _error(bad)
        took = time.monotonic() - t0
        assert err.code == P.ErrorCode.STATE and "holds 0 bytes" in err.message, err
        assert took < 1.0 and rss_mb() - before < 100
    assert_unharmed(result)


async def test_long_history_beyond_the_limit_is_refused(parts) -> None:
    """Issue 18 #3: a genuine 8 MiB state froze everyone 1.1-1.6 s per load. The history a
    loaded state may rebuild is bounded (--max-state-tokens), and so is the message."""
    async with (
        running(
            parts,
            max_sessions=4,
            allow_unsigned_states=True,
            max_state_tokens=2000,
            control_burst=10,
        ) as server,
        honest_beside(server) as result,
        client(server) as bad,
    ):
        blob = await _state_of(bad)
        header, payload = split(blob)
        (e,) = [e for e in header["tensors"] if e["name"].endswith("/ids.0")]
        n = 200_000
        e["shape"], e["nbytes"], e["offset"] = [n], 8 * n, len(payload)
        header["meta"]["model_plain"]["backbone.reader/lengths"] = [n]
        big = rewrite(header, payload + bytes(8 * n))
        await bad.ws.send(P.encode(P.Control(P.Op.LOAD_STATE, big), "client"))
        err = await _error(bad)
        assert "longer than this engine allows (2000)" in err.message, err
    assert_unharmed(result)


async def test_non_reading_client_cannot_grow_the_server(parts) -> None:
    """Issue 18 #3: a client that never reads, asking for STATE replies, grew the server by
    1 GB in 30 s. Output is bounded in bytes, and a second SAVE_STATE waits for the first."""
    async with (
        running(
            parts,
            max_sessions=4,
            out_queue_bytes=256 << 10,
            control_rate=200,
            control_burst=200,
            flood_rate=1000,
            flood_burst=1000,
        ) as server,
        honest_beside(server) as result,
    ):
        before = rss_mb()
        # max_queue=1: the attacker's websocket stops reading the socket almost at once.
        async with connect(_url(server), max_queue=1, compression=None) as ws:
            worst = 0
            # 200 saves of ~140 KB: far more than the socket buffers take.
            for i in range(200):
                await ws.send(P.encode(P.Audio(i, _frames(3, 1)[0]), "client"))
                await ws.send(P.encode(P.Control(P.Op.SAVE_STATE), "client"))
                await asyncio.sleep(0.01)
                worst = max(worst, *(c.out_bytes for c in server.conns))
                assert max(c.state_pending for c in server.conns) <= 1
            assert worst <= 256 << 10, worst
            # Saves asked for while the last STATE sat unread were refused, not computed.
            assert server.refused_saves > 0
        assert rss_mb() - before < 100
    assert_unharmed(result)


def test_output_queue_is_bounded_in_bytes() -> None:
    """The output queue drops its oldest messages by bytes as well as by count, and keeps
    count of queued STATE replies (a second SAVE_STATE waits for the first to be read)."""
    from duplex.apps.server_conn import Conn

    c = Conn(None, "s", None, 4, out_limit=512, out_limit_bytes=100_000)
    state = bytes([P.Kind.STATE]) + P.STATE_MAGIC + bytes(60_000)
    audio = bytes([P.Kind.AUDIO]) + bytes(644)
    c.send(state)
    assert c.state_pending == 1
    for _ in range(200):
        c.send(audio)
    assert c.out_bytes <= 100_000 and c.out_bytes == sum(map(len, c.out))
    # The STATE was the oldest: dropped to make room, and no longer pending.
    assert c.state_pending == 0 and c.dropped_output_messages > 0
    c.send(state)
    assert c.state_pending == 1
    while c.out:
        c.next_out()
    assert c.out_bytes == 0 and c.state_pending == 0
    # One message larger than the whole budget still goes (alone).
    c.send(bytes(200_000))
    assert len(c.out) == 1


async def test_typed_text_flood_is_closed(parts) -> None:
    """Issue 18 #3: typed text was unbounded (1.3 MB/s per connection, never drained without
    audio). Now the backlog waiting to enter the model is bounded."""
    async with (
        running(parts, max_sessions=4, max_typed_bytes=4096) as server,
        honest_beside(server) as result,
        client(server) as bad,
    ):
        with contextlib.suppress(ConnectionClosed):
            for _ in range(20):
                await bad.ws.send(P.encode(P.Text("x" * 1000), "client"))
        message = await bad.expect_close(P.ErrorCode.FLOOD, 1008)
        assert "typed text" in message and "4096" in message
    assert_unharmed(result)


async def test_ping_only_clients_do_not_hold_slots(parts) -> None:
    """Issue 18 #4: PING reset the idle timer, so ping-only clients held every slot and cost
    every step. Now only audio keeps a session alive."""
    async with (
        running(parts, max_sessions=4, idle_timeout=1.0) as server,
        client(server) as bad,
    ):
        t0 = time.monotonic()

        async def ping() -> None:
            with contextlib.suppress(ConnectionClosed):
                for i in range(100):
                    await bad.ws.send(P.encode(P.Ping(i), "client"))
                    await asyncio.sleep(0.1)

        pinger = asyncio.create_task(ping())
        message = await bad.expect_close(P.ErrorCode.IDLE, 4000)
        pinger.cancel()
        assert "no audio" in message and time.monotonic() - t0 < 3.0
        # An honest client that streams is never idle.
        async with honest_beside(server) as result:
            pass
    assert_unharmed(result)


async def test_connections_per_address_are_limited(parts) -> None:
    """Issue 18 #4: no per-peer or connect-rate limit (85 connects/s cost the honest client
    52% of its frames). Now HTTP 429 beyond --max-per-peer and --connect-rate."""
    async with running(parts, max_sessions=8, max_per_peer=3) as server:
        async with honest_beside(server) as result:
            async with client(server), client(server):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(_url(server)):
                        pass
                assert info.value.response.status_code == 429
                assert b"per client address" in info.value.response.body
            assert server.gate.refused_peers == 1
        assert_unharmed(result)
    async with running(parts, max_sessions=8, connect_rate=2.0, connect_burst=4.0) as server:
        async with honest_beside(server) as result:
            refused = 0
            for _ in range(40):
                try:
                    async with connect(_url(server)) as ws:
                        await ws.recv()
                except InvalidStatus as e:
                    assert e.response.status_code == 429
                    refused += 1
            # The honest client's connection used one of the burst of 4.
            assert 40 - refused <= 3 + 2 * 3, refused
        assert_unharmed(result)


@pytest.mark.timeout(120)
async def test_a_failing_step_closes_only_its_session(parts) -> None:
    """Issue 18 #1 and #4: a failing batched step closed every session in the batch (1011),
    and waited on the network I/O of a non-reading peer. The fault is injected past every
    check (as a bug in them would let it through): only that session is closed. A bystander
    sends its frames together with the attacker's, so they share the failing batch."""
    async with (
        running(parts, max_sessions=4) as server,
        honest_beside(server) as result,
        client(server, seed=2) as bystander,
    ):
        # The attacker stops reading its socket almost at once.
        async with connect(_url(server), max_queue=1, compression=None) as ws:
            hello = P.parse_server(await ws.recv(), None)
            (conn,) = [c for c in server.conns if c.sid == hello.session]

            def corrupt() -> None:
                conn.session.prev_text = 10**6

            await server.scheduler.op(corrupt)
            frames = _frames(4, 30)
            for i, f in enumerate(frames):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(P.encode(P.Audio(i, f), "client"))
                await bystander.ws.send(P.encode(P.Audio(i, f), "client"))
                await asyncio.sleep(0.02)
            audio, _, other = await bystander.collect(len(frames))
            assert [m.frame for m in audio] == list(range(len(frames)))
            assert not any(isinstance(m, P.Error) for m in other)
            assert conn.closed
        assert server.failed_steps >= 1
    assert_unharmed(result)


async def test_handshakes_are_bounded_and_failures_logged_in_one_line(parts, capsys) -> None:
    """Issue 18 #4: unfinished handshakes were unlimited and each failed accept logged a
    traceback (9.5 MB in 35 s)."""
    async with (
        running(parts, max_sessions=4, max_handshakes=8, max_per_peer=4) as server,
        honest_beside(server) as result,
    ):
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(30)]
        await asyncio.sleep(0.3)
        assert len(server.gate.handshaking) <= 8 and server.gate.refused_handshakes >= 22
        for _, w in silent:
            w.close()
        for _ in range(30):
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: nonsense\r\n\r\n")
            await w.drain()
            await r.read()
            w.close()
    assert_unharmed(result)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[:2000]
    assert err.count("opening handshake failed") <= 5, err


async def test_error_text_is_plain_and_hides_server_paths(parts) -> None:
    """Issue 18 #6, #7: the fingerprint of a state file came back in ERROR text (markup and
    escape sequences included), and ERROR texts showed the server's temporary paths."""
    async with (
        running(parts, max_sessions=2, allow_unsigned_states=True) as server,
        client(server) as c,
    ):
        blob = await _state_of(c)
        header, payload = split(blob)
        header["model_fingerprint"] = "[/x]\x1b[2J"
        await c.ws.send(P.encode(P.Control(P.Op.LOAD_STATE, rewrite(header, payload)), "client"))
        err = await _error(c)
        assert "[/x]" not in err.message and "\x1b" not in err.message
        assert "/tmp" not in err.message and "duplex-serve-" not in err.message, err.message


def test_one_line_log_filter_drops_tracebacks() -> None:
    from duplex.apps.server_guard import OneLineLog

    f = OneLineLog()
    try:
        raise ValueError("bad request line")
    except ValueError:
        import sys

        info = sys.exc_info()
    records = [
        logging.LogRecord("x", logging.ERROR, __file__, 1, "opening handshake failed", None, info)
        for _ in range(50)
    ]
    kept = [r for r in records if f.filter(r)]
    assert len(kept) == 1 and kept[0].exc_info is None
    assert "bad request line" in kept[0].getMessage()
