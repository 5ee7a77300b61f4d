"""`duplex serve`: the command line of the websocket server (the server is `duplex.apps.server`).

Every connection is one conversation; all of them are stepped together by one batched engine
through `duplex.streamer.scheduler`. This module reads the options, checks them, loads the model
and codec, and serves until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from duplex.apps.server import DuplexServer, ServeConfig
from duplex.apps.server_guard import is_loopback

if TYPE_CHECKING:
    from duplex.streamer.engine import Engine

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 picks one)")
    p.add_argument(
        "--model",
        default="default",
        help="model name or .safetensors (default: default, the trained model)",
    )
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
    from duplex.streamer.sampling import add_arguments as add_sampling_arguments

    add_sampling_arguments(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--no-codec-thread",
        dest="codec_thread",
        action="store_false",
        help="run the neural codec on the engine thread, one phase after the other, instead "
        "of on its own thread pipelined with the model step (to compare; same results)",
    )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the command line describes (token from the environment if not given)."""
    from dataclasses import asdict

    from duplex.streamer.sampling import from_args as sampling_from_args

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
        codec_thread=getattr(args, "codec_thread", True),
        record=args.record,
        record_max_mb=args.record_max_mb,
        record_session_mb=args.record_session_mb,
        certfile=args.certfile,
        keyfile=args.keyfile,
        model_name=args.model,
        codec_name=args.codec,
        sampling=asdict(sampling_from_args(args)),
    )


async def serve_until_signal(engine: Engine, cfg: ServeConfig) -> None:
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


def log_to_stderr() -> None:
    """The server's and the scheduler's log lines on stderr, prefixed like its other messages
    (the websocket layer's own lines carry the prefix already: `server_guard.OneLineLog`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("duplex serve: %(message)s"))
    for name in ("duplex.serve", "duplex.scheduler"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
    log_to_stderr()
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
