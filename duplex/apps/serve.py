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
for that connection alone.
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
import os
import secrets
import shutil
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

Security: with a token set (--token, or the DUPLEX_TOKEN environment variable), clients must send
it as `Authorization: Bearer TOKEN` or `?token=TOKEN`; a wrong or missing one is refused with HTTP
401 before the websocket upgrade. Listening on a non-loopback address without a token is refused
unless --insecure is given. --certfile/--keyfile enable TLS (wss://). GET /healthz answers 200.

Limits: --max-sessions (a further client gets close code 1013), --max-message (a bigger message
closes with 1009), --idle-timeout (close 4000), a per-session input queue of --queue-frames frames
(older audio is dropped and counted), and a message-rate limit (a flood closes with 1008).

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
    max_message_bytes: int = 8 << 20
    idle_timeout: float = 60.0
    queue_frames: int = 10
    out_queue_messages: int = 512
    flood_rate: float = 150.0
    flood_burst: float = 250.0
    control_rate: float = 2.0
    control_burst: float = 5.0
    stats_interval: float = 1.0
    record: str | None = None
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

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(eq=False)
class Conn:
    """One client connection and its session's server-side bookkeeping."""

    ws: Any
    sid: str
    sampling: Any
    queue_frames: int
    out_limit: int
    tokens: bool = False
    session: Any = None
    segment: int = 0
    closed: bool = False
    inbox: collections.deque = field(default_factory=collections.deque)
    out: collections.deque = field(default_factory=collections.deque)
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
        """Queue one outgoing message for the writer task; a full queue drops its oldest."""
        if self.closed:
            return
        if len(self.out) >= self.out_limit:
            self.out.popleft()
            self.dropped_output_messages += 1
        self.out.append(data)
        self.wake.set()


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


class DuplexServer:
    """The websocket server around an entered `Engine` whose slots bound the sessions."""

    def __init__(self, engine: Any, cfg: ServeConfig) -> None:
        from duplex.streamer.engine import SamplingConfig

        if engine.slots < cfg.max_sessions:
            raise ValueError(f"engine has {engine.slots} slots, max_sessions {cfg.max_sessions}")
        self.engine = engine
        self.cfg = cfg
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
            max_queue=32,
            ping_interval=self.cfg.ping_interval,
            ping_timeout=self.cfg.ping_timeout,
            ssl=ctx,
        )

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
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
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
                await self._step(batch)
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
            print(f"duplex serve: engine step failed: {e!r}", file=sys.stderr)
            await asyncio.gather(
                *(self._fatal(c, P.ErrorCode.INTERNAL, f"engine failed: {e}") for c in batch)
            )
            return
        self.ticks += 1
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
            try:
                session.recorder = Recorder(
                    directory, header, self.engine.sample_rate, self.engine.frame_size
                )
                if state is not None:
                    shutil.copyfile(state, directory / "initial.dstate")
            except BaseException:
                self.engine.leave(session)
                raise
        conn.segment += 1
        return session

    def _save(self, conn: Conn) -> bytes:
        with tempfile.TemporaryDirectory(prefix="duplex-serve-") as d:
            path = self.engine.save_session(conn.session, Path(d) / "save.dstate")
            return path.read_bytes()

    def _load(self, conn: Conn, blob: bytes) -> int:
        """Engine thread: continue from a state file; on any failure the old state goes on."""
        from duplex.streamer.statefile import load_state

        with tempfile.TemporaryDirectory(prefix="duplex-serve-") as d:
            new = Path(d) / "load.dstate"
            new.write_bytes(blob)
            load_state(new, self.engine.model_fingerprint, self.engine.codec_fingerprint)
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
                "seed": conn.sampling.seed,
                "sampling": asdict(conn.sampling),
            },
        )

    async def _fatal(self, conn: Conn, code: P.ErrorCode, message: str) -> None:
        """Tell the client what went wrong, then close with the code the protocol assigns."""
        from websockets.exceptions import ConnectionClosed

        conn.closed = True
        close = P.CLOSE_FOR[code] or P.Close.POLICY
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(P.encode(P.Error(int(code), message)))
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.close(int(close), _close_reason(message))

    async def _writer(self, conn: Conn) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            while not conn.closed:
                await conn.wake.wait()
                conn.wake.clear()
                while conn.out and not conn.closed:
                    await conn.ws.send(conn.out.popleft())

    async def _handler(self, ws: Any) -> None:
        """One connection: admit, join, handshake, then read until it ends."""
        conn = Conn(
            ws,
            secrets.token_hex(6),
            self._sampling_for(ws),
            self.cfg.queue_frames,
            self.cfg.out_queue_messages,
            parse_qs(urlsplit(ws.request.path).query).get("tokens", ["0"])[0] == "1",
        )
        if self.stopping:
            await ws.close(int(P.Close.GOING_AWAY), "server shutting down")
            return
        if self.active >= self.cfg.max_sessions:
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
        # State loads and saves cost engine time every session waits for: a tighter limit.
        controls = TokenBucket(self.cfg.control_rate, self.cfg.control_burst)
        while not conn.closed:
            try:
                async with asyncio.timeout(self.cfg.idle_timeout):
                    data = await conn.ws.recv()
            except TimeoutError:
                await self._fatal(
                    conn, P.ErrorCode.IDLE, f"no message for {self.cfg.idle_timeout:g} s"
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
            if isinstance(msg, P.Control) and not controls.take(now):
                await self._fatal(
                    conn,
                    P.ErrorCode.FLOOD,
                    f"more than {self.cfg.control_rate:g} CONTROL requests/s sustained",
                )
                return
            await self._dispatch(conn, msg, now)

    async def _dispatch(self, conn: Conn, msg: Any, now: float) -> None:
        from duplex.streamer.statefile import StateFileError

        if isinstance(msg, P.Audio):
            conn.push_input(msg.frame, msg.pcm, now)
            self._wake.set()
        elif isinstance(msg, P.Ping):
            conn.send(P.encode(P.Ping(msg.nonce)))
        elif isinstance(msg, P.Text):
            text = msg.text
            frame = await self._op(lambda: self._type(conn, text))
            conn.send(P.encode(P.Event({"event": "typed", "frame": frame, "text": text})))
        elif isinstance(msg, P.Codes):
            conn.push_input(msg.frame, np.asarray(msg.codes, dtype=np.int64), now)
            self._wake.set()
        elif isinstance(msg, P.Control):
            try:
                if msg.op == P.Op.SAVE_STATE:
                    blob = await self._op(lambda: self._save(conn))
                    conn.send(P.encode(P.State(blob)))
                elif msg.op == P.Op.LOAD_STATE:
                    blob = msg.blob
                    frame = await self._op(lambda: self._load(conn, blob))
                    conn.send(P.encode(P.Event({"event": "state_loaded", "frame": frame})))
                else:
                    frame = await self._op(lambda: self._reset(conn))
                    conn.send(P.encode(P.Event({"event": "reset", "frame": frame})))
            except (StateFileError, ValueError, OSError) as e:
                conn.send(P.encode(P.Error(int(P.ErrorCode.STATE), f"{msg.op.name} failed: {e}")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 picks one)")
    p.add_argument("--model", default="tiny", help="model name or .safetensors (default: tiny)")
    p.add_argument(
        "--codec", default="default", help="codec name or .safetensors (default: default)"
    )
    p.add_argument("--token", help="required client token (default: $DUPLEX_TOKEN)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without a token (anyone reaching it can connect)",
    )
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent sessions (16)")
    p.add_argument(
        "--max-message", type=int, default=8 << 20, help="largest message in bytes (8 MiB)"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=60.0, help="close a silent client after s (60)"
    )
    p.add_argument(
        "--queue-frames", type=int, default=10, help="per-session input queue in frames (10)"
    )
    p.add_argument("--record", metavar="DIR", help="record each session under DIR/<session-id>")
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
    return ServeConfig(
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("DUPLEX_TOKEN") or None,
        max_sessions=args.max_sessions,
        max_message_bytes=args.max_message,
        idle_timeout=args.idle_timeout,
        queue_frames=args.queue_frames,
        record=args.record,
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

    cfg = config_from_args(args)
    if not is_loopback(cfg.host) and not cfg.token and not args.insecure:
        print(
            f"duplex serve: refusing to listen on {cfg.host} without a token; set --token or "
            "DUPLEX_TOKEN, or pass --insecure if every client that can reach it may connect",
            file=sys.stderr,
        )
        return 2
    if cfg.max_sessions < 1 or cfg.queue_frames < 1 or cfg.max_message_bytes < 1024:
        print(
            "duplex serve: --max-sessions and --queue-frames must be >= 1, --max-message >= 1024",
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
