"""The websocket transport of `duplex serve`: connections in, a scheduler's sessions behind them.

One asyncio event loop does all networking; the batched stepping, the engine thread and its
operation queue are `duplex.streamer.scheduler.Scheduler`'s. This module only turns messages into
engine operations and frames, and results into messages: every engine operation (join, leave,
typed text, save or restore a state, reset) goes through the scheduler, so the engine is never
touched concurrently and a session is never stepped after it left.

A misbehaving client only ever hurts itself: every message is parsed strictly
(`duplex.apps.protocol`), and anything wrong gets an ERROR message and a close (1003 or 1008)
for that connection alone. Costs are budgeted in what they cost, not in message counts: bytes
queued for output, bytes buffered on input, typed bytes waiting to enter the model, history
tokens a loaded state rebuilds, connections and handshakes per peer (`duplex.apps.server_guard`).
State files a client uploads are untrusted: the server accepts back only states it signed itself
(unless told otherwise), and the engine checks every value in them before a slot changes. The
threat model is docs/security.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import ssl
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from duplex.apps import protocol as P
from duplex.apps.server_config import ServeConfig
from duplex.apps.server_conn import Conn, LimitError, close_reason
from duplex.apps.server_guard import WS_LOG, Gate, TokenBucket, peer_of
from duplex.apps.server_session import SessionOps
from duplex.apps.server_wire import OrderedWork
from duplex.apps.wire_opus import OpusDecoder, OpusEncoder, OpusError
from duplex.streamer.engine import SamplingConfig
from duplex.streamer.recording import RecordQuota
from duplex.streamer.scheduler import FrameIn, Lane, Scheduler
from duplex.streamer.statefile import StateFileError, StateKeys

if TYPE_CHECKING:
    import numpy as np
    from websockets.asyncio.server import Server, ServerConnection

    from duplex.streamer.engine import Engine, FrameResult

log = logging.getLogger("duplex.serve")


class DuplexServer:
    """The websocket server around an entered `Engine` whose slots bound the sessions."""

    def __init__(self, engine: Engine, cfg: ServeConfig) -> None:
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
            self.record_quota = RecordQuota(
                int(cfg.record_max_mb * 2**20),
                int(cfg.record_session_mb * 2**20),
                RecordQuota.usage(cfg.record),
            )
        engine.max_state_tokens = cfg.max_state_tokens
        engine.max_typed_bytes = cfg.max_typed_bytes
        self.gate = Gate(cfg)
        self.ops = SessionOps(engine, cfg, self.record_quota)
        self.scheduler = Scheduler(
            engine, after_tick=self._after_tick, codec_thread=cfg.codec_thread
        )
        # Per-session wire-codec work (Opus) runs here, never on the event loop that runs the
        # scheduler nor on the engine thread. Two threads a session (in and out) at most, so a
        # session whose codec is stuck holds up only its own audio.
        self.wire_pool = concurrent.futures.ThreadPoolExecutor(
            2 * cfg.max_sessions, thread_name_prefix="wire"
        )
        self.refused_full = 0
        self.refused_saves = 0
        self._background: set[asyncio.Task] = set()
        self.sampling = SamplingConfig(**cfg.sampling)
        self.fmt = P.Format(
            engine.frame_size, engine.K, int(engine.codec.cardinality), P.MAX_TEXT_BYTES
        )
        self.conns: set[Conn] = set()
        self.active = 0
        self.stopping = False
        self._server: Server | None = None
        self._last_stats = 0.0

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def batch_sizes(self) -> Any:
        return self.scheduler.batch_sizes

    @property
    def failed_steps(self) -> int:
        return self.scheduler.failed_steps

    async def start(self) -> None:
        """Bind and start serving (port 0 picks a free port: read `.port`)."""
        from websockets.asyncio.server import serve

        await self.scheduler.start()
        ctx = None
        if self.cfg.certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cfg.certfile, self.cfg.keyfile)
        self._server = await serve(
            self._handler,
            self.cfg.host,
            self.cfg.port,
            process_request=self.gate.process_request,
            compression=None,
            max_size=self.cfg.max_message_bytes,
            # Input buffered per connection is at most this many messages of max_size bytes:
            # beyond it the websocket layer stops reading the socket.
            max_queue=self.cfg.input_queue_messages,
            ping_interval=self.cfg.ping_interval,
            ping_timeout=self.cfg.ping_timeout,
            open_timeout=self.cfg.open_timeout,
            close_timeout=2.0,
            logger=WS_LOG,
            create_connection=self.gate.connection_class(),
            ssl=ctx,
        )

    async def stop(self) -> None:
        """Close every session with 1001, stop stepping, free the engine's slots."""
        self.stopping = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        await self.scheduler.stop()
        for conn in list(self.conns):
            self._stop_wire(conn)
            self.ops.leave(conn)
        self.wire_pool.shutdown(wait=False, cancel_futures=True)

    def _sampling_for(self, ws: ServerConnection) -> SamplingConfig:
        query = parse_qs(urlsplit(ws.request.path).query)
        sampling = SamplingConfig(**asdict(self.sampling))
        if "seed" in query:
            sampling.seed = int(query["seed"][0])
        return sampling

    def _deliver(self, conn: Conn, f: FrameIn, res: FrameResult) -> None:
        """The scheduler's callback for a stepped frame: PCM goes out at once; an Opus
        session's frame is encoded by its own worker and sent, in order, when ready."""
        if conn.wire_out is None:
            self._send_frame(conn, f, res, None)
            return
        encoder = conn.opus_out
        conn.wire_out.put(
            lambda: encoder.encode(P.pcm_to_int16(res.pcm)),
            lambda packet: self._send_frame(conn, f, res, packet),
        )

    def _send_frame(self, conn: Conn, f: FrameIn, res: FrameResult, packet: bytes | None) -> None:
        """One stepped frame's messages: its TOKENS and TEXT first; its AUDIO (PCM, or the
        Opus `packet`) ends it. An Opus frame whose encoding was skipped (the session's worker
        was behind) keeps its TOKENS and TEXT and loses its audio (counted)."""
        seq = f.seq
        if conn.tokens:
            conn.queue(P.encode(P.Tokens(seq, res.tokens_in, res.tokens_out)))
        if res.text:
            conn.queue(P.encode(P.Text(res.text, seq, P.Stream.MODEL)))
        if res.user_text:
            conn.queue(P.encode(P.Text(res.user_text, seq, P.Stream.USER)))
        if conn.wire_out is None:
            conn.queue(P.encode(P.Audio(seq, P.pcm_to_int16(res.pcm))))
        elif packet is None:
            conn.dropped_output_messages += 1
            return
        else:
            conn.queue(P.encode(P.Opus(seq, packet)))
        conn.frames_out += 1
        conn.latency_ms.append(1000.0 * (time.monotonic() - f.t))

    def _wire(self, conn: Conn) -> OrderedWork:
        """A worker for one direction of `conn`'s wire codec; a failure closes `conn` alone."""

        def failed(e: Exception) -> None:
            if isinstance(e, LimitError):
                self._close_soon(conn, e.code, str(e))
            else:
                log.error("session %s: wire codec failed: %r", conn.sid, e)
                self._close_soon(conn, P.ErrorCode.INTERNAL, "internal server error")

        return OrderedWork(self.wire_pool, failed, limit=self.cfg.queue_frames)

    def _stop_wire(self, conn: Conn) -> None:
        for work in (conn.wire_in, conn.wire_out):
            if work is not None:
                work.close()

    def _arrive(self, conn: Conn, frame: FrameIn) -> None:
        """An input frame for the scheduler, behind any OPUS frames still being decoded."""
        if conn.wire_in is not None and conn.wire_in.busy:
            conn.wire_in.put(None, lambda _: self._push(conn, frame))
        else:
            self._push(conn, frame)

    def _push(self, conn: Conn, frame: FrameIn) -> None:
        conn.lane.push(frame)
        self.scheduler.wake()

    def _close_soon(self, conn: Conn, code: P.ErrorCode, message: str) -> None:
        """Close a session without waiting for it: the ERROR and the close are sent by a task
        of their own, so a client that does not read delays no one else."""
        conn.closed = True
        conn.lane.closed = True
        task = asyncio.get_running_loop().create_task(self._fatal(conn, code, message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _after_tick(self, live: list[Lane]) -> None:
        now = time.monotonic()
        if now - self._last_stats < self.cfg.stats_interval:
            return
        self._last_stats = now
        snap = self.engine.stats.snapshot()
        engine = {
            "stages_ms": {
                k: {"p50": v["p50"], "p99": v["p99"]} for k, v in snap["stages_ms"].items()
            },
            "real_time_factor": snap["real_time_factor"],
            "frame_ms": snap["frame_ms"],
        }
        for c in self.conns:
            if c.lane in live:
                c.send(P.encode(c.stats(len(self.conns), engine)))

    async def _fatal(self, conn: Conn, code: P.ErrorCode, message: str) -> None:
        """Tell the client what went wrong, then close with the code the protocol assigns."""
        from websockets.exceptions import ConnectionClosed

        conn.closed = True
        if conn.lane is not None:
            conn.lane.closed = True
        close = P.CLOSE_FOR[code] or P.Close.POLICY
        try:
            # A client that does not read gets 2 s to take the ERROR, then the close (whose
            # own timeout is the connection's close_timeout), then the connection is dropped.
            async with asyncio.timeout(2.0):
                await conn.ws.send(P.encode(P.Error(int(code), message)))
        except (ConnectionClosed, TimeoutError):
            pass
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.close(int(close), close_reason(message))

    async def _writer(self, conn: Conn) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            while not conn.closed:
                await conn.wake.wait()
                conn.wake.clear()
                while conn.out and not conn.closed:
                    await conn.ws.send(conn.next_out())

    async def _handler(self, ws: ServerConnection) -> None:
        """One connection: admit, join, handshake, then read until it ends."""
        from websockets.exceptions import ConnectionClosed

        query = parse_qs(urlsplit(ws.request.path).query)
        conn = Conn(
            ws,
            secrets.token_hex(6),
            self._sampling_for(ws),
            self.cfg.queue_frames,
            self.cfg.out_queue_messages,
            self.cfg.out_queue_bytes,
            query.get("tokens", ["0"])[0] == "1",
            peer_of(ws),
        )
        if query.get("audio", ["pcm"])[0] == "opus":
            try:
                conn.opus_out = OpusEncoder(
                    int(self.engine.sample_rate), int(self.engine.frame_size), self.cfg.opus_bitrate
                )
            except OpusError as e:
                await self._fatal(conn, P.ErrorCode.UNSUPPORTED, f"no Opus here: {e}")
                return
            conn.wire_out = self._wire(conn)
        conn.lane = Lane(
            on_frame=lambda f, res: self._deliver(conn, f, res),
            on_failure=lambda why: self._close_soon(conn, P.ErrorCode.INTERNAL, why),
            queue_frames=self.cfg.queue_frames,
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
                conn.session = await self.scheduler.op(lambda: self.ops.join(conn))
            except Exception as e:
                await self._fatal(conn, P.ErrorCode.INTERNAL, f"cannot start a session: {e}")
                return
            self.conns.add(conn)
            self.scheduler.add(conn.lane)
            await ws.send(P.encode(self.ops.hello(conn, self.fmt)))
            writer = asyncio.create_task(self._writer(conn))
            await self._read(conn)
        except Exception as e:
            if not isinstance(e, ConnectionClosed):
                log.error("session %s failed: %r", conn.sid, e)
                await self._fatal(conn, P.ErrorCode.INTERNAL, "internal server error")
        finally:
            conn.closed = conn.lane.closed = True
            self._stop_wire(conn)
            self.conns.discard(conn)
            self.scheduler.discard(conn.lane)
            self.active -= 1
            # Queued now, runs before any later join: the slot is free for the next client.
            self.scheduler.op_nowait(lambda: self.ops.leave(conn))
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

    async def _dispatch(self, conn: Conn, msg: P.ClientMessage, now: float) -> None:
        op = self.scheduler.op
        if isinstance(msg, P.Audio):
            conn.last_audio = now
            self._arrive(conn, FrameIn(msg.frame, pcm=P.int16_to_pcm(msg.pcm), t=now))
        elif isinstance(msg, P.Opus):
            # Decoded in order by this session's own decoder, on its own worker (not on this
            # loop, which runs the scheduler): a packet libopus refuses closes this session
            # alone (ERROR 1, close 1008).
            if conn.opus_in is None:
                conn.opus_in = OpusDecoder(
                    int(self.engine.sample_rate), int(self.engine.frame_size)
                )
                conn.wire_in = self._wire(conn)
            conn.last_audio = now
            decoder, seq, packet = conn.opus_in, msg.frame, msg.packet
            # Decoding behind: stop reading (the socket pushes back) rather than skip packets.
            await conn.wire_in.room()
            conn.wire_in.put(
                lambda: _decode(decoder, seq, packet),
                lambda pcm: self._decoded(conn, seq, pcm, now),
            )
        elif isinstance(msg, P.Codes):
            conn.last_audio = now
            self._arrive(conn, FrameIn(msg.frame, codes=list(msg.codes), t=now))
        elif isinstance(msg, P.Ping):
            conn.send(P.encode(P.Ping(msg.nonce)))
        elif isinstance(msg, P.Text):
            text = msg.text
            frame = await op(lambda: self.ops.type_text(conn, text))
            conn.send(P.encode(P.Event({"event": "typed", "frame": frame, "text": text})))
        elif isinstance(msg, P.Control):
            what = f"{msg.op.name} failed"
            try:
                if msg.op == P.Op.SAVE_STATE:
                    if conn.state_pending:
                        self.refused_saves += 1
                        raise StateFileError(
                            "the previous STATE has not been read yet; read it first"
                        )
                    blob = await op(lambda: self.ops.save(conn))
                    conn.send(P.encode(P.State(blob)))
                elif msg.op == P.Op.LOAD_STATE:
                    # Read and checked off the engine thread: no session waits for it.
                    checked = await asyncio.to_thread(
                        self.engine.check_state, msg.blob, label="the LOAD_STATE payload"
                    )
                    msg = None  # the blob is no longer needed; do not hold it while loading
                    frame = await op(lambda: self.ops.load(conn, checked))
                    conn.send(P.encode(P.Event({"event": "state_loaded", "frame": frame})))
                else:
                    frame = await op(lambda: self.ops.reset(conn))
                    conn.send(P.encode(P.Event({"event": "reset", "frame": frame})))
            except (StateFileError, ValueError) as e:
                conn.send(P.encode(P.Error(int(P.ErrorCode.STATE), f"{what}: {e}")))
            except OSError as e:
                # The detail (a path on this server) stays in the server's log.
                log.error("session %s: %s: %s", conn.sid, what, e)
                conn.send(P.encode(P.Error(int(P.ErrorCode.STATE), f"{what}: server error")))

    def _decoded(self, conn: Conn, seq: int, pcm: np.ndarray | None, t: float) -> None:
        """An OPUS frame's PCM, back on the loop in order; None: skipped (its worker was
        behind), counted as a dropped input frame."""
        if pcm is None:
            conn.lane.dropped += 1
            return
        self._push(conn, FrameIn(seq, pcm=pcm, t=t))


def _decode(decoder: OpusDecoder, seq: int, packet: bytes) -> np.ndarray:
    """Wire worker: one OPUS packet -> one float32 frame; a refused packet is the sender's
    fault (`LimitError` with BAD_MESSAGE closes that session alone)."""
    try:
        return P.int16_to_pcm(decoder.decode(packet))
    except OpusError as e:
        raise LimitError(f"OPUS frame {seq}: {e}", P.ErrorCode.BAD_MESSAGE) from None
