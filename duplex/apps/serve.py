"""`duplex serve`: a websocket server where every session is stepped by one batched engine.

Design: one asyncio event loop does all networking; one stepping task owns the engine. Every
engine operation (join, leave, typed text, save/load state, reset, step) runs in that task, in
order, on a single worker thread, so the engine is never touched concurrently and a session is
never stepped after it left. Each tick (one codec frame of wall time) the task takes at most one
frame from every session that has one and steps them all in one batched call; while any session
has a backlog, ticks follow each other without waiting, so a burst is worked off. Input queues are
bounded: when a client (or the server) falls behind, the oldest audio is dropped and counted,
because stale audio is worth less than keeping up. Output queues are bounded the same way, so a
client that stops reading cannot make the server buffer without limit.

A misbehaving client only ever hurts itself: every message is parsed strictly
(`duplex.apps.protocol`), and anything wrong gets an ERROR message and a close (1003 or 1008)
for that connection alone. Costs are budgeted in what they cost, not in message counts: bytes
queued for output, bytes buffered on input, typed bytes waiting to enter the model, history
tokens a loaded state rebuilds, connections and handshakes per peer. State files a client
uploads are untrusted: the server accepts back only states it signed itself (unless told
otherwise), and checks every value in them before a slot changes. A step that fails anyway is
retried session by session, so only the session that made it fail is closed, and the stepper
never waits on any client's network I/O. The threat model is docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from duplex.apps import protocol as P

HELP = "serve the model over websockets: many sessions stepped by one batched engine"
DESCRIPTION = """Serve the model over websockets (protocol: docs/protocol.md).

Every connection is one conversation. All sessions are stepped together by one batched engine,
one step per codec frame (20 ms with the default codec). Clients send PCM int16 frames, typed
text, control requests (save state, load state, reset) and pings; the server sends audio, the
model's text, a transcript of the user, stats once a second, errors and saved states.

Security (threat model: docs/security.md): with a token set (--token-file, or the DUPLEX_TOKEN
environment variable; --token also works but shows the token to every user of `ps`), clients must
send it as `Authorization: Bearer TOKEN` or `?token=TOKEN`; a wrong or missing one is refused with
HTTP 401 before the websocket upgrade. Listening on a non-loopback address without a token is
refused unless --insecure is given. --certfile/--keyfile enable TLS (wss://). GET /healthz
answers 200. States the server hands out (SAVE_STATE) are signed with a server secret
(--state-secret-file, one secret per line, the first signs, the others still verify, for
rotation; default: a random secret per run); LOAD_STATE accepts only states signed with one of
them unless --allow-unsigned-states, and every loaded state is checked value by value.

Limits (every one is per session unless it says otherwise; a client over one gets an ERROR and a
close for its own connection only): --max-sessions (a further client gets close code 1013),
--max-message (a bigger message closes with 1009; with --input-queue-messages it bounds the
bytes buffered per connection), --idle-timeout (no audio for that long closes 4000; PING does
not count), --queue-frames (older audio is dropped and counted), --out-queue-bytes (a client
that does not read loses its oldest messages), --max-typed-bytes (typed text waiting to enter
the model; more closes with 1008), --max-state-tokens (history a loaded state may hold),
--max-per-peer and --connect-rate (connections per client address; more is HTTP 429),
--max-handshakes (unfinished handshakes server-wide; more are dropped), and message-rate limits
(a flood closes with 1008; a LOAD_STATE costs one CONTROL per started 256 KiB).

Examples:
  duplex serve --codec default
  duplex serve --port 9000 --max-sessions 32 --record runs/server
  DUPLEX_TOKEN=s3cret duplex serve --host 0.0.0.0 --certfile cert.pem --keyfile key.pem
  curl http://127.0.0.1:8998/healthz

SIGTERM or Ctrl-C closes every session with 1001 and exits.
Exit status: 0 after a clean shutdown, 2 on a usage error (bad model/codec/TLS file, a
non-loopback address without a token), 3 when the address cannot be bound."""


@dataclass
class ServeConfig:
    """Server settings; every limit is explicit so nothing buffers without bound."""

    host: str = "127.0.0.1"
    port: int = 8998
    token: str | None = None
    max_sessions: int = 16
    max_message_bytes: int = 4 << 20
    input_queue_messages: int = 4
    idle_timeout: float = 60.0
    queue_frames: int = 10
    out_queue_messages: int = 512
    out_queue_bytes: int = 4 << 20
    max_typed_bytes: int = 4096
    max_state_tokens: int = 100_000
    max_per_peer: int = 4
    connect_rate: float = 2.0
    connect_burst: float = 8.0
    max_handshakes: int = 64
    open_timeout: float = 5.0
    state_secrets: list[bytes] | None = None
    allow_unsigned_states: bool = False
    flood_rate: float = 150.0
    flood_burst: float = 250.0
    control_rate: float = 2.0
    control_burst: float = 5.0
    stats_interval: float = 1.0
    record: str | None = None
    # Disk budget of --record: all recordings under the directory, and one session's segments.
    record_max_mb: float = 2048.0
    record_session_mb: float = 256.0
    certfile: str | None = None
    keyfile: str | None = None
    model_name: str = "tiny"
    codec_name: str = "default"
    sampling: dict[str, Any] = field(default_factory=dict)
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0


class TokenBucket:
    """Allows `rate` messages a second with bursts of `burst`; a flood empties it."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class LimitError(Exception):
    """A session went over one of its budgets: it gets `code` and a close."""

    def __init__(self, message: str, code: P.ErrorCode = P.ErrorCode.FLOOD) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Conn:
    """One client connection and its session's server-side bookkeeping."""

    ws: Any
    sid: str
    sampling: Any
    queue_frames: int
    out_limit: int
    out_limit_bytes: int = 4 << 20
    tokens: bool = False
    peer: str = ""
    session: Any = None
    segment: int = 0
    closed: bool = False
    inbox: collections.deque = field(default_factory=collections.deque)
    out: collections.deque = field(default_factory=collections.deque)
    out_bytes: int = 0
    state_pending: int = 0
    last_audio: float = field(default_factory=time.monotonic)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped_input_frames: int = 0
    dropped_output_messages: int = 0
    frames_in: int = 0
    frames_out: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))

    def push_input(self, seq: int, pcm: np.ndarray, t: float) -> None:
        """Queue one input frame (int16 PCM, or int64 codec codes when the client runs the
        codec); a full queue drops its oldest frame (counted)."""
        if len(self.inbox) >= self.queue_frames:
            self.inbox.popleft()
            self.dropped_input_frames += 1
        self.inbox.append((seq, pcm, t))
        self.frames_in += 1

    def send(self, data: bytes) -> None:
        """Queue one outgoing message for the writer task. The queue is bounded in messages
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
        if data[:1] == bytes([P.Kind.STATE]):
            self.state_pending += 1
        self.wake.set()

    def _took(self, data: bytes) -> None:
        """Bookkeeping for a message that left the output queue (sent or dropped)."""
        self.out_bytes -= len(data)
        if data[:1] == bytes([P.Kind.STATE]):
            self.state_pending -= 1

    def next_out(self) -> bytes:
        data = self.out.popleft()
        self._took(data)
        return data


def _close_reason(message: str) -> str:
    """A close reason must fit in 123 UTF-8 bytes."""
    raw = message.encode("utf-8")[:120]
    return raw.decode("utf-8", errors="ignore")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _OneLineLog(logging.Filter):
    """What the websocket layer logs about failed handshakes: one line each, no traceback, and
    at most one a second (a flood of bad connections must not flood the log)."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -1e9
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        now = time.monotonic()
        if now - self.last < 1.0:
            self.suppressed += 1
            return False
        self.last = now
        detail = f": {type(err).__name__}: {str(err)[:120]}" if err is not None else ""
        more = f" ({self.suppressed} more suppressed)" if self.suppressed else ""
        record.msg, record.args = f"duplex serve: {record.getMessage()}{detail}{more}", None
        self.suppressed = 0
        return True


_WS_LOG = logging.getLogger("duplex.serve.websockets")
_WS_LOG.addFilter(_OneLineLog())


def _peer_of(connection: Any) -> str:
    addr = getattr(connection, "remote_address", None)
    return str(addr[0]) if addr else "?"


class DuplexServer:
    """The websocket server around an entered `Engine` whose slots bound the sessions."""

    def __init__(self, engine: Any, cfg: ServeConfig) -> None:
        from duplex.streamer.engine import SamplingConfig
        from duplex.streamer.statefile import StateKeys

        if engine.slots < cfg.max_sessions:
            raise ValueError(f"engine has {engine.slots} slots, max_sessions {cfg.max_sessions}")
        self.engine = engine
        self.cfg = cfg
        # Saved states are signed with the server's secret; loads need that signature unless
        # the operator allows unsigned states.
        self.keys = StateKeys(cfg.state_secrets) if cfg.state_secrets else StateKeys.random()
        engine.state_keys = self.keys
        engine.require_signed_states = not cfg.allow_unsigned_states
        self.record_quota = None
        if cfg.record:
            from duplex.streamer.recording import RecordQuota

            self.record_quota = RecordQuota(
                int(cfg.record_max_mb * 2**20),
                int(cfg.record_session_mb * 2**20),
                RecordQuota.usage(cfg.record),
            )
        engine.max_state_tokens = cfg.max_state_tokens
        engine.max_typed_bytes = cfg.max_typed_bytes
        self._peers: dict[str, set] = collections.defaultdict(set)
        self._connect_buckets: dict[str, TokenBucket] = {}
        self._handshaking: set = set()
        self.refused_handshakes = 0
        self.refused_peers = 0
        self.failed_steps = 0
        self.refused_full = 0
        self.refused_saves = 0
        # How many steps had how many sessions in them (a batched server batches).
        self.batch_sizes: collections.Counter = collections.Counter()
        self._background: set[asyncio.Task] = set()
        self.sampling = SamplingConfig(**cfg.sampling)
        self.fmt = P.Format(
            engine.frame_size, engine.K, int(engine.codec.cardinality), P.MAX_TEXT_BYTES
        )
        self.conns: set[Conn] = set()
        self.active = 0
        self.stopping = False
        self._closing = False
        self._ops: collections.deque = collections.deque()
        self._wake: asyncio.Event | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._stepper: asyncio.Task | None = None
        self._server: Any = None
        self._last_stats = 0.0
        self.ticks = 0

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start serving (port 0 picks a free port: read `.port`)."""
        from websockets.asyncio.server import serve

        self._wake = asyncio.Event()
        self._stepper = asyncio.create_task(self._step_loop())
        ctx = None
        if self.cfg.certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cfg.certfile, self.cfg.keyfile)
        self._server = await serve(
            self._handler,
            self.cfg.host,
            self.cfg.port,
            process_request=self._process_request,
            compression=None,
            max_size=self.cfg.max_message_bytes,
            # Input buffered per connection is at most this many messages of max_size bytes:
            # beyond it the websocket layer stops reading the socket.
            max_queue=self.cfg.input_queue_messages,
            ping_interval=self.cfg.ping_interval,
            ping_timeout=self.cfg.ping_timeout,
            open_timeout=self.cfg.open_timeout,
            close_timeout=2.0,
            logger=_WS_LOG,
            create_connection=self._connection_class(),
            ssl=ctx,
        )

    def _connection_class(self) -> type:
        """A websocket connection that counts unfinished handshakes (at most `max_handshakes`
        server-wide and twice `max_per_peer` per client address: one more is dropped at once)
        and forgets its peer when it ends."""
        from websockets.asyncio.server import ServerConnection

        server = self

        class Connection(ServerConnection):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                peer = _peer_of(self)
                mine = sum(1 for c in server._handshaking if _peer_of(c) == peer)
                if (
                    len(server._handshaking) >= server.cfg.max_handshakes
                    or mine >= 2 * server.cfg.max_per_peer
                ):
                    server.refused_handshakes += 1
                    transport.abort()
                    return
                server._handshaking.add(self)

            def connection_lost(self, exc: Exception | None) -> None:
                server._handshaking.discard(self)
                peer = server._peers.get(_peer_of(self))
                if peer is not None:
                    peer.discard(self)
                    if not peer:
                        server._peers.pop(_peer_of(self), None)
                super().connection_lost(exc)

        return Connection

    async def stop(self) -> None:
        """Close every session with 1001, stop stepping, free the engine's slots."""
        self.stopping = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self._stepper is not None:
            # The stepper finishes the queued ops (the closed sessions' leaves) and returns.
            # Cancelling it instead could cancel a leave still waiting for the engine thread,
            # and the session would keep its slot.
            self._closing = True
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.shield(self._stepper)
            if not self._stepper.done():
                self._stepper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._stepper
        self._executor.shutdown(wait=True)
        # Leaves queued by the closing handlers never reached the stepper: run them here.
        while self._ops:
            fn, fut = self._ops.popleft()
            if fut is None:
                with contextlib.suppress(Exception):
                    fn()
            elif not fut.done():
                fut.cancel()
        for conn in list(self.conns):
            self._leave(conn)

    def _process_request(self, connection: Any, request: Any) -> Any:
        """Health checks and authentication, before any websocket upgrade."""
        self._handshaking.discard(connection)
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        peer = _peer_of(connection)
        now = time.monotonic()
        bucket = self._connect_buckets.get(peer)
        if bucket is None:
            if len(self._connect_buckets) > 4096:
                # Forget peers whose bucket has refilled: they are owed nothing.
                for p, b in list(self._connect_buckets.items()):
                    b.take(now, 0.0)
                    if b.tokens >= b.burst:
                        del self._connect_buckets[p]
            bucket = self._connect_buckets[peer] = TokenBucket(
                self.cfg.connect_rate, self.cfg.connect_burst
            )
        if len(self._peers.get(peer, ())) >= self.cfg.max_per_peer:
            self.refused_peers += 1
            return connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"at most {self.cfg.max_per_peer} connections per client address\n",
            )
        if not bucket.take(now):
            self.refused_peers += 1
            return connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"more than {self.cfg.connect_rate:g} connections/s from this address\n",
            )
        query = parse_qs(url.query)
        if query.get("tokens", ["0"])[0] not in ("0", "1"):
            return connection.respond(HTTPStatus.BAD_REQUEST, "tokens must be 0 or 1\n")
        if self.cfg.token:
            got = None
            auth = request.headers.get("Authorization")
            if auth is not None and auth.startswith("Bearer "):
                got = auth[len("Bearer ") :].strip()
            elif "token" in query:
                got = query["token"][0]
            if got is None or not hmac.compare_digest(
                got.encode("utf-8"), self.cfg.token.encode("utf-8")
            ):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        if "seed" in query:
            try:
                seed = int(query["seed"][0])
            except ValueError:
                return connection.respond(HTTPStatus.BAD_REQUEST, "seed must be an integer\n")
            if not 0 <= seed < 1 << 63:
                return connection.respond(HTTPStatus.BAD_REQUEST, "seed is out of range\n")
        self._peers[peer].add(connection)
        return None

    def _sampling_for(self, ws: Any) -> Any:
        query = parse_qs(urlsplit(ws.request.path).query)
        sampling = type(self.sampling)(**asdict(self.sampling))
        if "seed" in query:
            sampling.seed = int(query["seed"][0])
        return sampling

    async def _op(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between two steps; returns its result."""
        fut = asyncio.get_running_loop().create_future()
        self._ops.append((fn, fut))
        self._wake.set()
        return await fut

    def _op_nowait(self, fn: Callable[[], Any]) -> None:
        self._ops.append((fn, None))
        self._wake.set()

    async def _run_ops(self) -> None:
        loop = asyncio.get_running_loop()
        while self._ops:
            fn, fut = self._ops.popleft()
            try:
                result = await loop.run_in_executor(self._executor, fn)
            except Exception as e:
                if fut is not None and not fut.done():
                    fut.set_exception(e)
                elif fut is None:
                    print(f"duplex serve: engine operation failed: {e!r}", file=sys.stderr)
                continue
            if fut is not None and not fut.done():
                fut.set_result(result)

    def _live(self) -> list[Conn]:
        return [c for c in self.conns if not c.closed and c.session is not None]

    async def _step_loop(self) -> None:
        """The single stepping task: ops, then batched steps, at least one per frame of time.

        Every step costs the whole batch, so steps wait to be full: a step starts once every
        live session has a frame queued, or when the frame clock says it is time (sessions
        without a frame then skip it), or at once when a session has a backlog to drain.
        """
        loop = asyncio.get_running_loop()
        period = 1.0 / self.engine.frame_rate
        next_t = loop.time()
        while True:
            await self._run_ops()
            if self._closing and not self._ops:
                return
            live = self._live()
            if not live:
                self._wake.clear()
                if not self._ops and not self._closing:
                    await self._wake.wait()
                next_t = loop.time()
                continue
            batch = {c: c.inbox.popleft() for c in live if c.inbox}
            if batch:
                try:
                    await self._step(batch)
                except Exception as e:
                    # A bug in the server itself: the stepper must not die with it (every
                    # session would freeze). The sessions of this batch are closed.
                    print(f"duplex serve: stepping failed: {e!r}", file=sys.stderr)
                    for c in batch:
                        self._close_soon(c, P.ErrorCode.INTERNAL, "internal server error")
            now = loop.time()
            if now - self._last_stats >= self.cfg.stats_interval:
                self._last_stats = now
                self._send_stats(live)
            # Behind (a step overran its frame): the frame clock restarts from now.
            next_t = max(next_t + period, loop.time())
            await self._until_ready(next_t)

    async def _until_ready(self, deadline: float) -> None:
        """Wait until the next step should start (see `_step_loop`) or an op is queued."""
        loop = asyncio.get_running_loop()
        while not self._ops and not self._closing:
            live = self._live()
            if not live or all(c.inbox for c in live) or any(len(c.inbox) > 1 for c in live):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for can swallow the stepper's cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _step(self, batch: dict[Conn, tuple[int, np.ndarray, float]]) -> None:
        loop = asyncio.get_running_loop()
        frames = {
            c.session: P.int16_to_pcm(x) for c, (_, x, _) in batch.items() if x.dtype == np.int16
        }
        codes = {c.session: x.tolist() for c, (_, x, _) in batch.items() if x.dtype != np.int16}
        try:
            results = await loop.run_in_executor(
                self._executor, lambda: self.engine.step(frames, codes)
            )
        except Exception as e:
            # One session's state or input made the batched step fail. Find it: each session
            # steps alone; the ones that still fail are closed, the others get their frame.
            # (Nothing here waits on any client: closes are sent by tasks of their own.)
            self.failed_steps += 1
            print(f"duplex serve: batched step failed ({e!r}); stepping alone", file=sys.stderr)
            results, failed = await loop.run_in_executor(
                self._executor, lambda: self._step_alone(frames, codes)
            )
            for c in batch:
                if c.session in failed:
                    print(
                        f"duplex serve: session {c.sid} failed its step: {failed[c.session]!r}",
                        file=sys.stderr,
                    )
                    self._close_soon(c, P.ErrorCode.INTERNAL, "the engine failed on this session")
        self.ticks += 1
        self.batch_sizes[len(batch)] += 1
        done = time.monotonic()
        for c, (seq, _, t_in) in batch.items():
            res = results.get(c.session)
            if res is None or c.closed:
                continue
            # A frame's TOKENS and TEXT come first; its AUDIO ends it.
            if c.tokens:
                c.send(P.encode(P.Tokens(seq, res.tokens_in, res.tokens_out)))
            if res.text:
                c.send(P.encode(P.Text(res.text, seq, P.Stream.MODEL)))
            if res.user_text:
                c.send(P.encode(P.Text(res.user_text, seq, P.Stream.USER)))
            c.send(P.encode(P.Audio(seq, P.pcm_to_int16(res.pcm))))
            c.frames_out += 1
            c.latency_ms.append(1000.0 * (done - t_in))

    def _step_alone(
        self, frames: dict[Any, np.ndarray], codes: dict[Any, list[int]]
    ) -> tuple[dict[Any, Any], dict[Any, Exception]]:
        """Engine thread: step each session by itself; (results, the sessions that failed)."""
        results, failed = {}, {}
        for s, x in [
            *((s, ({s: x}, None)) for s, x in frames.items()),
            *((s, (None, {s: x})) for s, x in codes.items()),
        ]:
            try:
                results.update(self.engine.step(*x))
            except Exception as e:
                failed[s] = e
        return results, failed

    def _close_soon(self, conn: Conn, code: P.ErrorCode, message: str) -> None:
        """Close a session without waiting for it: the ERROR and the close are sent by a task
        of their own, so a client that does not read delays no one else."""
        conn.closed = True
        task = asyncio.get_running_loop().create_task(self._fatal(conn, code, message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _send_stats(self, live: list[Conn]) -> None:
        snap = self.engine.stats.snapshot()
        engine = {
            "stages_ms": {
                k: {"p50": v["p50"], "p99": v["p99"]} for k, v in snap["stages_ms"].items()
            },
            "real_time_factor": snap["real_time_factor"],
            "frame_ms": snap["frame_ms"],
        }
        for c in live:
            lat = np.fromiter(c.latency_ms, dtype=np.float64)
            p50, p99 = np.percentile(lat, [50, 99]).tolist() if lat.size else (0.0, 0.0)
            c.send(
                P.encode(
                    P.Stats(
                        {
                            "session": c.sid,
                            "frame": int(c.session.frame),
                            "frames_in": c.frames_in,
                            "frames_out": c.frames_out,
                            "queue_depth": len(c.inbox),
                            "dropped_input_frames": c.dropped_input_frames,
                            "dropped_output_messages": c.dropped_output_messages,
                            "server_latency_ms": {"p50": p50, "p99": p99},
                            "sessions": len(self.conns),
                            "engine": engine,
                        }
                    )
                )
            )

    def _join(self, conn: Conn, state: Path | None) -> Any:
        """Engine thread: a new engine session for `conn`, recorded if --record is on."""
        from duplex.streamer.recording import Recorder

        session = self.engine.join(conn.sampling, state=state)
        if self.cfg.record:
            name = conn.sid if conn.segment == 0 else f"{conn.sid}-{conn.segment}"
            directory = Path(self.cfg.record) / name
            header = {
                "config": {
                    "model": self.cfg.model_name,
                    "codec": self.cfg.codec_name,
                    "sampling": asdict(conn.sampling),
                    "state": None,
                },
                "model_fingerprint": self.engine.model_fingerprint,
                "codec_fingerprint": self.engine.codec_fingerprint,
                "frame_rate": self.engine.frame_rate,
                "server_session": conn.sid,
                "segment": conn.segment,
            }
            quota = self.record_quota
            try:
                session.recorder = Recorder(
                    directory,
                    header,
                    self.engine.sample_rate,
                    self.engine.frame_size,
                    budget=lambda n, key=conn.sid: quota.charge(key, n),
                )
                if state is not None:
                    # The state as loaded (a fresh copy: an upload's bytes are not kept).
                    initial = directory / "initial.dstate"
                    self.engine.save_session(session, initial)
                    if not quota.charge(conn.sid, initial.stat().st_size):
                        session.recorder.close()
                        session.recorder.stopped = "recording quota reached"
            except BaseException:
                self.engine.leave(session)
                raise
        conn.segment += 1
        return session

    def _save(self, conn: Conn) -> bytes:
        with tempfile.TemporaryDirectory(prefix="duplex-serve-") as d:
            path = self.engine.save_session(conn.session, Path(d) / "save.dstate")
            return path.read_bytes()

    def _load(self, conn: Conn, new: Any) -> int:
        """Engine thread: continue from a checked state; on any failure the old state goes on."""
        with tempfile.TemporaryDirectory(prefix="duplex-serve-") as d:
            backup = self.engine.save_session(conn.session, Path(d) / "backup.dstate")
            self.engine.leave(conn.session)
            conn.session = None
            try:
                conn.session = self._join(conn, new)
            except BaseException:
                try:
                    conn.session = self._join(conn, backup)
                except BaseException as e:
                    raise RuntimeError(
                        f"cannot restore the session after a failed load: {e}"
                    ) from e
                raise
        return int(conn.session.frame)

    def _type(self, conn: Conn, text: str) -> int:
        """Engine thread: queue typed text; returns the frame it starts entering at."""
        waiting = len(conn.session.typed) + len(text.encode("utf-8"))
        if waiting > self.cfg.max_typed_bytes:
            raise LimitError(
                f"typed text waiting to enter the model would be {waiting} bytes; at most "
                f"{self.cfg.max_typed_bytes} (it enters one byte per audio frame)"
            )
        conn.session.type_text(text)
        return int(conn.session.frame)

    def _reset(self, conn: Conn) -> int:
        self.engine.leave(conn.session)
        conn.session = None
        conn.session = self._join(conn, None)
        return int(conn.session.frame)

    def _leave(self, conn: Conn) -> None:
        if conn.session is not None:
            self.engine.leave(conn.session)
            conn.session = None

    def _hello(self, conn: Conn) -> P.Hello:
        e = self.engine
        return P.Hello(
            version=P.VERSION,
            model=self.cfg.model_name,
            codec=self.cfg.codec_name,
            model_fingerprint=e.model_fingerprint,
            codec_fingerprint=e.codec_fingerprint,
            sample_rate=int(e.sample_rate),
            frame_size=int(e.frame_size),
            frame_rate=float(e.frame_rate),
            num_codebooks=int(e.K),
            cardinality=self.fmt.cardinality,
            accepts=["PCM", "CODES", "TYPE", "CONTROL", "PING"],
            session=conn.sid,
            max_message_bytes=self.cfg.max_message_bytes,
            max_text_bytes=self.fmt.max_text_bytes,
            extra={
                "controls": [op.name for op in P.Op],
                "queue_frames": self.cfg.queue_frames,
                "idle_timeout": self.cfg.idle_timeout,
                "signed_states": not self.cfg.allow_unsigned_states,
                "max_typed_bytes": self.cfg.max_typed_bytes,
                "max_state_tokens": self.cfg.max_state_tokens,
                "out_queue_bytes": self.cfg.out_queue_bytes,
                "seed": conn.sampling.seed,
                "sampling": asdict(conn.sampling),
            },
        )

    async def _fatal(self, conn: Conn, code: P.ErrorCode, message: str) -> None:
        """Tell the client what went wrong, then close with the code the protocol assigns."""
        from websockets.exceptions import ConnectionClosed

        conn.closed = True
        close = P.CLOSE_FOR[code] or P.Close.POLICY
        try:
            # A client that does not read gets 2 s to take the ERROR, then the close (whose
            # own timeout is the connection's close_timeout), then the connection is dropped.
            async with asyncio.timeout(2.0):
                await conn.ws.send(P.encode(P.Error(int(code), message)))
        except (ConnectionClosed, TimeoutError):
            pass
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.close(int(close), _close_reason(message))

    async def _writer(self, conn: Conn) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            while not conn.closed:
                await conn.wake.wait()
                conn.wake.clear()
                while conn.out and not conn.closed:
                    await conn.ws.send(conn.next_out())

    async def _handler(self, ws: Any) -> None:
        """One connection: admit, join, handshake, then read until it ends."""
        conn = Conn(
            ws,
            secrets.token_hex(6),
            self._sampling_for(ws),
            self.cfg.queue_frames,
            self.cfg.out_queue_messages,
            self.cfg.out_queue_bytes,
            parse_qs(urlsplit(ws.request.path).query).get("tokens", ["0"])[0] == "1",
            _peer_of(ws),
        )
        if self.stopping:
            await ws.close(int(P.Close.GOING_AWAY), "server shutting down")
            return
        if self.active >= self.cfg.max_sessions:
            self.refused_full += 1
            await self._fatal(
                conn, P.ErrorCode.FULL, f"server is full ({self.cfg.max_sessions} sessions)"
            )
            return
        self.active += 1
        writer = None
        try:
            try:
                conn.session = await self._op(lambda: self._join(conn, None))
            except Exception as e:
                await self._fatal(conn, P.ErrorCode.INTERNAL, f"cannot start a session: {e}")
                return
            self.conns.add(conn)
            self._wake.set()
            await ws.send(P.encode(self._hello(conn)))
            writer = asyncio.create_task(self._writer(conn))
            await self._read(conn)
        except Exception as e:
            from websockets.exceptions import ConnectionClosed

            if not isinstance(e, ConnectionClosed):
                print(f"duplex serve: session {conn.sid} failed: {e!r}", file=sys.stderr)
                await self._fatal(conn, P.ErrorCode.INTERNAL, "internal server error")
        finally:
            conn.closed = True
            self.conns.discard(conn)
            self.active -= 1
            # Queued now, runs before any later join: the slot is free for the next client.
            self._op_nowait(lambda: self._leave(conn))
            if writer is not None:
                conn.wake.set()
                writer.cancel()

    async def _read(self, conn: Conn) -> None:
        from websockets.exceptions import ConnectionClosed

        bucket = TokenBucket(self.cfg.flood_rate, self.cfg.flood_burst)
        # State loads and saves cost engine time every session waits for: a tighter limit, and
        # a LOAD_STATE costs one CONTROL per started 256 KiB (its cost grows with its size).
        controls = TokenBucket(self.cfg.control_rate, self.cfg.control_burst)
        conn.last_audio = time.monotonic()
        while not conn.closed:
            # Only audio keeps a session alive: a client that only pings, types or sends
            # controls holds a slot (and a row of every step) for no conversation.
            remaining = conn.last_audio + self.cfg.idle_timeout - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, remaining)):
                    data = await conn.ws.recv()
            except TimeoutError:
                await self._fatal(
                    conn, P.ErrorCode.IDLE, f"no audio for {self.cfg.idle_timeout:g} s"
                )
                return
            except ConnectionClosed:
                return
            now = time.monotonic()
            if not bucket.take(now):
                await self._fatal(
                    conn,
                    P.ErrorCode.FLOOD,
                    f"more than {self.cfg.flood_rate:g} messages/s sustained",
                )
                return
            try:
                msg = P.parse_client(data, self.fmt)
            except P.ProtocolError as e:
                await self._fatal(conn, e.code, str(e))
                return
            del data
            if isinstance(msg, P.Control):
                cost = 1.0 + len(msg.blob) // (256 << 10)
                if not controls.take(now, min(cost, self.cfg.control_burst)):
                    await self._fatal(
                        conn,
                        P.ErrorCode.FLOOD,
                        f"more than {self.cfg.control_rate:g} CONTROL requests/s sustained "
                        "(a LOAD_STATE counts one per started 256 KiB)",
                    )
                    return
            try:
                await self._dispatch(conn, msg, now)
            except LimitError as e:
                await self._fatal(conn, e.code, str(e))
                return

    async def _dispatch(self, conn: Conn, msg: Any, now: float) -> None:
        from duplex.streamer.statefile import StateFileError

        if isinstance(msg, P.Audio):
            conn.last_audio = now
            conn.push_input(msg.frame, msg.pcm, now)
            self._wake.set()
        elif isinstance(msg, P.Ping):
            conn.send(P.encode(P.Ping(msg.nonce)))
        elif isinstance(msg, P.Text):
            text = msg.text
            frame = await self._op(lambda: self._type(conn, text))
            conn.send(P.encode(P.Event({"event": "typed", "frame": frame, "text": text})))
        elif isinstance(msg, P.Codes):
            conn.last_audio = now
            conn.push_input(msg.frame, np.asarray(msg.codes, dtype=np.int64), now)
            self._wake.set()
        elif isinstance(msg, P.Control):
            what = f"{msg.op.name} failed"
            try:
                if msg.op == P.Op.SAVE_STATE:
                    if conn.state_pending:
                        self.refused_saves += 1
                        raise StateFileError(
                            "the previous STATE has not been read yet; read it first"
                        )
                    blob = await self._op(lambda: self._save(conn))
                    conn.send(P.encode(P.State(blob)))
                elif msg.op == P.Op.LOAD_STATE:
                    checked = await self._check_upload(msg.blob)
                    msg = None  # the blob is no longer needed; do not hold it while loading
                    frame = await self._op(lambda: self._load(conn, checked))
                    conn.send(P.encode(P.Event({"event": "state_loaded", "frame": frame})))
                else:
                    frame = await self._op(lambda: self._reset(conn))
                    conn.send(P.encode(P.Event({"event": "reset", "frame": frame})))
            except (StateFileError, ValueError) as e:
                conn.send(P.encode(P.Error(int(P.ErrorCode.STATE), f"{what}: {e}")))
            except OSError as e:
                # The detail (a path on this server) stays in the server's log.
                print(f"duplex serve: session {conn.sid}: {what}: {e}", file=sys.stderr)
                conn.send(P.encode(P.Error(int(P.ErrorCode.STATE), f"{what}: server error")))

    async def _check_upload(self, blob: bytes) -> Any:
        """Read and check an uploaded state off the engine thread (no session waits for it)."""

        def check() -> Any:
            with tempfile.TemporaryDirectory(prefix="duplex-serve-") as d:
                path = Path(d) / "load.dstate"
                path.write_bytes(blob)
                return self.engine.check_state_file(path, label="the LOAD_STATE payload")

        return await asyncio.to_thread(check)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 picks one)")
    p.add_argument("--model", default="tiny", help="model name or .safetensors (default: tiny)")
    p.add_argument(
        "--codec", default="default", help="codec name or .safetensors (default: default)"
    )
    p.add_argument(
        "--token",
        help="required client token (default: $DUPLEX_TOKEN); visible in `ps`: prefer "
        "--token-file or the environment",
    )
    p.add_argument("--token-file", metavar="FILE", help="read the client token from FILE")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without a token (anyone reaching it can connect)",
    )
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent sessions (16)")
    p.add_argument(
        "--max-message", type=int, default=4 << 20, help="largest message in bytes (4 MiB)"
    )
    p.add_argument(
        "--input-queue-messages",
        type=int,
        default=4,
        help="messages buffered per connection before the server stops reading it (4); "
        "input memory per connection is at most this times --max-message",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="close a client that sent no audio for this many seconds (60; PING, TYPE and "
        "CONTROL do not count)",
    )
    p.add_argument(
        "--queue-frames", type=int, default=10, help="per-session input queue in frames (10)"
    )
    p.add_argument(
        "--out-queue-bytes",
        type=int,
        default=4 << 20,
        help="per-session output queue in bytes (4 MiB); a client that does not read loses "
        "its oldest messages",
    )
    p.add_argument(
        "--max-typed-bytes",
        type=int,
        default=4096,
        help="typed text waiting to enter the model, in bytes (4096; it enters one byte per "
        "audio frame); more closes the session with 1008",
    )
    p.add_argument(
        "--max-state-tokens",
        type=int,
        default=100_000,
        help="longest history (tokens, one per frame) a loaded state may hold (100000 = 33 "
        "min at 50 frames/s); loading rebuilds it while every session waits",
    )
    p.add_argument(
        "--max-per-peer",
        type=int,
        default=4,
        help="connections from one client address at a time (4); more get HTTP 429",
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=2.0,
        help="new connections per second from one client address (2, bursts of 8); more "
        "get HTTP 429",
    )
    p.add_argument(
        "--max-handshakes",
        type=int,
        default=64,
        help="unfinished websocket handshakes server-wide (64; each has 5 s to finish); more "
        "connections are dropped at once",
    )
    p.add_argument(
        "--state-secret-file",
        metavar="FILE",
        help="secrets that sign saved states, one per line (16+ characters); the first signs, "
        "all verify (rotate by adding a new first line). Default: a random secret per run, "
        "so states load back only into the same server run. Also $DUPLEX_STATE_SECRET",
    )
    p.add_argument(
        "--allow-unsigned-states",
        action="store_true",
        help="accept LOAD_STATE of states this server did not sign (every value is still "
        "checked; only for clients you trust)",
    )
    p.add_argument("--record", metavar="DIR", help="record each session under DIR/<session-id>")
    p.add_argument(
        "--record-max-mb",
        type=float,
        default=2048.0,
        help="disk budget of all recordings under --record, earlier runs' included (MiB, 2048); "
        "past it, sessions go on unrecorded",
    )
    p.add_argument(
        "--record-session-mb",
        type=float,
        default=256.0,
        help="disk budget of one session's recording segments (MiB, 256: about 50 minutes)",
    )
    p.add_argument("--certfile", help="TLS certificate (PEM); enables wss://")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    p.add_argument("--seed", type=int, default=0, help="default sampling seed (?seed= overrides)")
    p.add_argument("--temperature", type=float, default=0.8, help="audio sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="audio top-k (default 50)")
    p.add_argument("--text-temperature", type=float, default=0.7, help="text temperature")
    p.add_argument("--text-top-k", type=int, default=25, help="text top-k (default 25)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the command line describes (token from the environment if not given)."""
    token = args.token
    if getattr(args, "token_file", None):
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    secrets_ = None
    if getattr(args, "state_secret_file", None):
        lines = Path(args.state_secret_file).read_text(encoding="utf-8").splitlines()
        secrets_ = [ln.strip().encode("utf-8") for ln in lines if ln.strip()]
    elif os.environ.get("DUPLEX_STATE_SECRET"):
        secrets_ = [os.environ["DUPLEX_STATE_SECRET"].encode("utf-8")]
    return ServeConfig(
        host=args.host,
        port=args.port,
        token=token or os.environ.get("DUPLEX_TOKEN") or None,
        max_sessions=args.max_sessions,
        max_message_bytes=args.max_message,
        input_queue_messages=getattr(args, "input_queue_messages", 4),
        idle_timeout=args.idle_timeout,
        queue_frames=args.queue_frames,
        out_queue_bytes=getattr(args, "out_queue_bytes", 4 << 20),
        max_typed_bytes=getattr(args, "max_typed_bytes", 4096),
        max_state_tokens=getattr(args, "max_state_tokens", 100_000),
        max_per_peer=getattr(args, "max_per_peer", 4),
        connect_rate=getattr(args, "connect_rate", 2.0),
        max_handshakes=getattr(args, "max_handshakes", 64),
        state_secrets=secrets_,
        allow_unsigned_states=getattr(args, "allow_unsigned_states", False),
        record=args.record,
        record_max_mb=args.record_max_mb,
        record_session_mb=args.record_session_mb,
        certfile=args.certfile,
        keyfile=args.keyfile,
        model_name=args.model,
        codec_name=args.codec,
        sampling={
            "temperature": args.temperature,
            "top_k": args.top_k,
            "text_temperature": args.text_temperature,
            "text_top_k": args.text_top_k,
            "seed": args.seed,
        },
    )


async def serve_until_signal(engine: Any, cfg: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, then close every session with 1001."""
    server = DuplexServer(engine, cfg)
    await server.start()
    scheme = "wss" if cfg.certfile else "ws"
    print(
        json.dumps({"listening": f"{scheme}://{cfg.host}:{server.port}", "port": server.port}),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("duplex serve: shutting down", file=sys.stderr, flush=True)
    await server.stop()


def run(args: argparse.Namespace) -> int:
    import torch

    from duplex.streamer.conversation import ConversationConfig, load_parts
    from duplex.streamer.engine import Engine

    try:
        cfg = config_from_args(args)
    except OSError as e:
        print(f"duplex serve: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if cfg.state_secrets is not None and (
        not cfg.state_secrets or min(len(k) for k in cfg.state_secrets) < 16
    ):
        print("duplex serve: every state secret must be at least 16 characters", file=sys.stderr)
        return 2
    if not is_loopback(cfg.host) and not cfg.token and not args.insecure:
        print(
            f"duplex serve: refusing to listen on {cfg.host} without a token; set --token or "
            "DUPLEX_TOKEN, or pass --insecure if every client that can reach it may connect",
            file=sys.stderr,
        )
        return 2
    if (
        min(cfg.max_sessions, cfg.queue_frames, cfg.input_queue_messages, cfg.max_per_peer) < 1
        or min(cfg.max_handshakes, cfg.max_state_tokens, cfg.max_typed_bytes) < 1
        or cfg.max_message_bytes < 1024
        or cfg.out_queue_bytes < 1024
        or cfg.connect_rate <= 0
    ):
        print(
            "duplex serve: --max-sessions, --queue-frames, --input-queue-messages, "
            "--max-per-peer, --max-handshakes, --max-state-tokens, --max-typed-bytes and "
            "--connect-rate must be positive, --max-message and --out-queue-bytes >= 1024",
            file=sys.stderr,
        )
        return 2
    if bool(cfg.certfile) != bool(cfg.keyfile):
        print("duplex serve: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    if cfg.certfile:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cfg.certfile, cfg.keyfile)
        except (OSError, ssl.SSLError) as e:
            print(f"duplex serve: cannot load the TLS certificate: {e}", file=sys.stderr)
            return 2
    torch.set_num_threads(max(1, args.threads))
    try:
        model, codec = load_parts(ConversationConfig(cfg.model_name, cfg.codec_name))
    except (ValueError, FileNotFoundError) as e:
        print(f"duplex serve: {e}", file=sys.stderr)
        return 2
    with Engine(model, codec, slots=cfg.max_sessions) as engine:
        try:
            asyncio.run(serve_until_signal(engine, cfg))
        except OSError as e:
            print(f"duplex serve: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
            return 3
    return 0
