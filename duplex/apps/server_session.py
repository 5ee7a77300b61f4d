"""What `duplex serve` does to one connection's engine session.

Every method but `hello` runs on the scheduler's engine thread (through `Scheduler.op`), between
two steps: the engine is never touched from the event loop. Each operation that starts a new
stretch of conversation (join, load, reset) starts a new recording segment with --record, under
the server's disk quota.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from duplex.apps import protocol as P
from duplex.apps.server_conn import Conn, LimitError

if TYPE_CHECKING:
    from duplex.apps.server_config import ServeConfig
    from duplex.streamer.engine import CheckedState, Engine, Session
    from duplex.streamer.recording import RecordQuota


class SessionOps:
    """The engine operations of a connection's session, with the server's settings."""

    def __init__(self, engine: Engine, cfg: ServeConfig, record_quota: RecordQuota | None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.record_quota = record_quota

    def record(self, conn: Conn, session: Session) -> None:
        """Engine thread: the next recording segment of `conn` (with --record)."""
        if not self.cfg.record:
            return
        name = conn.sid if conn.segment == 0 else f"{conn.sid}-{conn.segment}"
        quota = self.record_quota
        self.engine.record(
            session,
            Path(self.cfg.record) / name,
            model=self.cfg.model_name,
            codec=self.cfg.codec_name,
            budget=lambda n, key=conn.sid: quota.charge(key, n),
            server_session=conn.sid,
            segment=conn.segment,
        )

    def join(self, conn: Conn) -> Session:
        """Engine thread: a new engine session for `conn`, recorded if --record is on."""
        session = self.engine.join(conn.sampling)
        try:
            self.record(conn, session)
        except BaseException:
            self.engine.leave(session)
            raise
        conn.segment += 1
        return session

    def save(self, conn: Conn) -> bytes:
        return self.engine.state_bytes(conn.session)

    def load(self, conn: Conn, checked: CheckedState) -> int:
        """Engine thread: continue from a checked state (a refused one changes nothing)."""
        self.engine.restore(conn.session, checked)
        self.record(conn, conn.session)
        conn.segment += 1
        return int(conn.session.frame)

    def reset(self, conn: Conn) -> int:
        self.engine.reset(conn.session)
        self.record(conn, conn.session)
        conn.segment += 1
        return int(conn.session.frame)

    def type_text(self, conn: Conn, text: str) -> int:
        """Engine thread: queue typed text; returns the frame it starts entering at."""
        waiting = len(conn.session.typed) + len(text.encode("utf-8"))
        if waiting > self.cfg.max_typed_bytes:
            raise LimitError(
                f"typed text waiting to enter the model would be {waiting} bytes; at most "
                f"{self.cfg.max_typed_bytes} (it enters one byte per audio frame)"
            )
        conn.session.type_text(text)
        return int(conn.session.frame)

    def leave(self, conn: Conn) -> None:
        if conn.session is not None:
            self.engine.leave(conn.session)
            conn.session = None

    def hello(self, conn: Conn, fmt: P.Format) -> P.Hello:
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
            cardinality=fmt.cardinality,
            accepts=["PCM", "CODES", "TYPE", "CONTROL", "PING", "OPUS"],
            session=conn.sid,
            max_message_bytes=self.cfg.max_message_bytes,
            max_text_bytes=fmt.max_text_bytes,
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
                "audio": "opus" if conn.opus_out is not None else "pcm",
                "opus": {"bitrate": self.cfg.opus_bitrate, "packet_ms": 20},
            },
        )
