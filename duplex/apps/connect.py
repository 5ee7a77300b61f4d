"""`duplex connect`: the command line of the client of `duplex serve`, TUI or headless.

The jobs live beside it: the conversation and its retries in `duplex.apps.remote_client`, its
settings and counters in `duplex.apps.connect_config`, the jitter buffer in `duplex.apps.jitter`,
the audio ends in `duplex.apps.client_audio`, and the TUI's feed and commands in
`duplex.apps.remote_feed` and `duplex.apps.remote_steer`. Headless, its warnings (and with -v
what it does) go through the `duplex.connect` logger to stderr, as `duplex serve` logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from duplex.apps.client_audio import AudioEnds
from duplex.apps.connect_config import ConnectConfig, redact_url
from duplex.apps.remote_client import Client
from duplex.streamer.events import Printer

HELP = "talk to a `duplex serve` server: WAV files or microphone/speaker, TUI or headless"
DESCRIPTION = """Connect to a `duplex serve` server (ws:// or wss://) and talk to the model.

Your side comes from --input WAV (paced in real time) or the microphone; the model's audio goes
to --output WAV (every frame received, in order) or the speaker, through a jitter buffer that
drops old audio to catch up (with a file it reports what a speaker would have played).
A dropped connection is retried with exponential backoff (--retries); the server starts a new
session then (save the state with --save-state to keep a conversation).

In a terminal this opens the same text UI as `duplex talk`: both transcripts, latency (frame
sent -> answer, the server's step time, round trip, jitter buffer), levels and session facts;
type to the model, F2 mute, F3 pause, F5/F6 save/load the state (--save-state names the file,
default duplex.dstate), F7 reset, Ctrl+Q quit. With --headless (or --json, or no terminal) the
words are printed as they arrive, with a stats line per second.

--record DIR writes what crossed the wire as a session recording (your frames as sent, the
server's tokens, text and audio): `duplex replay DIR` shows it, and `duplex replay DIR --check`
re-runs it on a local copy of the model and verifies every token. A reconnect, reset or state
load mid-conversation starts the next segment in DIR-1, DIR-2, ...

Examples:
  duplex connect ws://127.0.0.1:8998 --input question.wav --output reply.wav
  DUPLEX_TOKEN=s3cret duplex connect wss://box:8998 --cafile cert.pem --input q.wav
  duplex connect ws://127.0.0.1:8998 --text "hello" --seconds 10 --output reply.wav
  duplex connect ws://127.0.0.1:8998 --input q.wav --save-state end.dstate --json
  duplex connect ws://127.0.0.1:8998 --input q.wav --record runs/remote1 --headless
  duplex connect ws://127.0.0.1:8998            (microphone and speaker, in the TUI)

With neither --input nor --output the audio device is used (see `duplex doctor`); with --output
only, silence is sent for --seconds.
Exit status: 0 on success, 2 on a usage or input error, 3 when no audio device is usable,
4 when the server refuses the token (HTTP 401), 5 when the server stays unreachable after
--retries, 6 when the server closes the session for a protocol error or a policy (1003, 1008,
1009, 4000)."""


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        return Path(args.token_file).read_text(encoding="utf-8").strip() or None
    return args.token or os.environ.get("DUPLEX_TOKEN") or None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="server address, ws://HOST:PORT or wss://HOST:PORT")
    p.add_argument(
        "--token",
        help="server token (default: $DUPLEX_TOKEN); visible to every user in `ps`: prefer "
        "--token-file or the environment",
    )
    p.add_argument("--token-file", metavar="FILE", help="read the server token from FILE")
    p.add_argument("--cafile", help="CA or self-signed certificate to trust for wss://")
    p.add_argument("--input", metavar="WAV", help="read your side from this audio file")
    p.add_argument("--output", metavar="WAV", help="write the model's audio to this WAV file")
    p.add_argument("--device", help="audio device name fragment or index (both directions)")
    from duplex.streamer.echo import add_arguments as add_echo_arguments

    add_echo_arguments(p)
    p.add_argument("--text", default="", help="text to type to the model at the start")
    p.add_argument(
        "--wire",
        choices=("pcm", "opus"),
        default="pcm",
        help="audio on the wire: pcm (int16, 256 kbps each way at 16 kHz) or opus (20 ms "
        "packets, about 24 kbps; needs PyAV)",
    )
    p.add_argument("--seed", type=int, help="ask the server for this sampling seed")
    p.add_argument("--seconds", type=float, help="stop sending after this many seconds")
    p.add_argument("--tail", type=float, default=1.0, help="seconds of silence after --input")
    p.add_argument(
        "--jitter-ms", type=float, default=60.0, help="playback starts at this depth (60)"
    )
    p.add_argument(
        "--max-jitter-ms",
        type=float,
        default=200.0,
        help="deeper than this, old audio is dropped to catch up (200)",
    )
    p.add_argument("--retries", type=int, default=5, help="reconnect attempts (default 5)")
    p.add_argument("--save-state", metavar="FILE", help="ask the server for the state at the end")
    p.add_argument("--load-state", metavar="FILE", help="send this state file at the start")
    p.add_argument("--record", metavar="DIR", help="record the session here (see above)")
    p.add_argument(
        "--transcript",
        metavar="FILE",
        help="append one JSON line per finished utterance to FILE (see `duplex talk --help`); "
        "utterances end after 1 s without text",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of text (headless)")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="headless: also log what the client does on stderr (connections, session settings)",
    )
    p.add_argument("--headless", action="store_true", help="print instead of showing the TUI")
    p.add_argument(
        "--exit-at-end", action="store_true", help="TUI: quit when the input file has been sent"
    )


def run(args: argparse.Namespace) -> int:
    if not args.url.startswith(("ws://", "wss://")):
        print("duplex connect: the address must start with ws:// or wss://", file=sys.stderr)
        return 2
    if args.jitter_ms <= 0 or args.max_jitter_ms < args.jitter_ms:
        print("duplex connect: need 0 < --jitter-ms <= --max-jitter-ms", file=sys.stderr)
        return 2
    if args.load_state and not Path(args.load_state).is_file():
        print(f"duplex connect: {args.load_state} does not exist", file=sys.stderr)
        return 2
    try:
        token = _token(args)
    except OSError as e:
        print(f"duplex connect: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    cfg = ConnectConfig(
        url=args.url,
        token=token,
        seed=args.seed,
        text=args.text,
        retries=args.retries,
        tail_seconds=args.tail,
        max_seconds=args.seconds,
        save_state=args.save_state,
        load_state=args.load_state,
        cafile=args.cafile,
        json_lines=args.json,
        record=args.record,
        transcript=args.transcript,
        wire=args.wire,
    )
    if args.record and (Path(args.record) / "events.jsonl").exists():
        print(
            f"duplex connect: {args.record} already holds a recording; choose another --record",
            file=sys.stderr,
        )
        return 2
    if not args.headless and not args.json and sys.stdout.isatty():
        return run_tui(cfg, args)
    return asyncio.run(_main(cfg, args))


def run_tui(cfg: ConnectConfig, args: argparse.Namespace) -> int:
    """The TUI over a remote session; returns the client's exit status."""
    from duplex.apps.remote_feed import RemoteFeed
    from duplex.apps.tui import DuplexApp, TalkOptions

    feed = RemoteFeed(cfg, args)
    options = TalkOptions(
        args.save_state or "duplex.dstate",
        args.exit_at_end,
        title=f"duplex connect {redact_url(cfg.url)}",
    )
    DuplexApp(feed, options).run()
    if feed.error:
        print(feed.error, file=sys.stderr)
    # The app is gone: the summary goes to the terminal.
    feed.client.report = Printer()
    feed.client.finish()
    return feed.exit_code if feed.exit_code is not None else 0


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is when a line is logged, so a test's (or
    anyone's) replacement of stderr gets the lines, as `print(..., file=sys.stderr)` did."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_HANDLER = _Stderr()
_HANDLER.setFormatter(logging.Formatter("duplex connect: %(message)s"))


def log_to_stderr(verbose: int = 0) -> None:
    """The client's log lines on stderr, prefixed like its other messages: warnings (refusals,
    lost connections, retries) always; with -v what it does too."""
    logger = logging.getLogger("duplex.connect")
    logger.setLevel(logging.DEBUG if verbose > 0 else logging.WARNING)
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.propagate = False


async def _main(cfg: ConnectConfig, args: argparse.Namespace) -> int:
    log_to_stderr(getattr(args, "verbose", 0))
    ends = AudioEnds(args)
    client = Client(cfg, ends.prepare)
    try:
        code = await client.run()
    finally:
        ends.close()
    client.finish()
    return code
