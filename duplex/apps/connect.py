"""`duplex connect`: the client of `duplex serve` (files or microphone/speaker), TUI or headless.

The client sends one PCM frame per frame period (a WAV file paced in real time, or the
microphone), and plays what comes back through a jitter buffer: playback starts once a few frames
are buffered, and when the network delivers a burst the oldest frames are dropped so the delay
does not grow (depth and drops are reported). A lost connection is retried with exponential
backoff. Once a second it prints a stats line: round-trip time (PING/PONG), frame latency (a
frame sent until its answer arrives), jitter depth, drops and underruns, and the server's counts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import queue
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from duplex.apps import protocol as P
from duplex.apps.remote_recording import RemoteRecorder
from duplex.streamer.conversation import printable
from duplex.streamer.transcript import Transcript

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


@dataclass
class ConnectConfig:
    """Client settings."""

    url: str
    token: str | None = None
    seed: int | None = None
    text: str = ""
    jitter_target: int = 3
    jitter_max: int = 10
    retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 10.0
    tail_seconds: float = 1.0
    max_seconds: float | None = None
    save_state: str | None = None
    load_state: str | None = None
    cafile: str | None = None
    json_lines: bool = False
    record: str | None = None
    transcript: str | None = None


class JitterBuffer:
    """Received frames waiting to be played: playback waits for `target` frames, and when more
    than `max_frames` wait the oldest are dropped down to `target` (catch up, counted)."""

    def __init__(self, target: int, max_frames: int) -> None:
        if not 1 <= target <= max_frames:
            raise ValueError("need 1 <= jitter target <= jitter max")
        self.target, self.max_frames = target, max_frames
        self.frames: collections.deque[np.ndarray] = collections.deque()
        self.playing = False
        self.dropped = 0
        self.underruns = 0

    def push(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        if len(self.frames) > self.max_frames:
            while len(self.frames) > self.target:
                self.frames.popleft()
                self.dropped += 1

    def pull(self, frame_size: int) -> np.ndarray | None:
        """The next frame to play; silence (counted) on an underrun; None before playback."""
        if not self.playing:
            if len(self.frames) < self.target:
                return None
            self.playing = True
        if self.frames:
            return self.frames.popleft()
        self.underruns += 1
        # Re-buffer after running dry, so one late burst does not cause a run of underruns.
        self.playing = False
        return np.zeros(frame_size, dtype=np.int16)

    @property
    def depth(self) -> int:
        return len(self.frames)


class Retry(Exception):
    """The server turned the session away for now (full, shutting down): try again later."""


class ServerRefused(Exception):
    """The server refused the session for good (auth, protocol, policy): do not retry."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Counters:
    """What the client saw, across reconnects."""

    sent: int = 0
    received: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))
    rtt_ms: float | None = None
    server: dict[str, Any] = field(default_factory=dict)
    reconnects: int = 0
    sessions: int = 0
    transcript: list[str] = field(default_factory=list)


def with_query(url: str, **params: Any) -> str:
    """`url` with the given query parameters added or replaced (None values skipped)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({k: str(v) for k, v in params.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))


class Client:
    """One conversation with the server, surviving reconnects.

    What it sees goes to `report(obj, line)` (default: print the line, or the JSON object with
    --json) and `warn(line)` (default: stderr); the TUI's feed replaces both. With `commands`
    (a thread-safe queue of the TUI's command tuples) the conversation can be steered while it
    runs: typing, mute, pause, save/load state, reset, stop.
    """

    def __init__(
        self,
        cfg: ConnectConfig,
        prepare: Any,
        out=None,
        report: Callable[[dict[str, Any], str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        commands: queue.Queue | None = None,
    ) -> None:
        self.cfg = cfg
        self.prepare = prepare
        self.report = report
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.commands = commands
        self.muted = False
        self.paused = False
        self.quitting = False
        self.recorder: RemoteRecorder | None = None
        self.save_path = cfg.save_state
        self.pending_state: bytes | None = None
        self.level_in: np.ndarray | None = None
        self.source: Any = None
        self.sink: Any = None
        self.out = out or sys.stdout
        self.c = Counters()
        self.jitter = JitterBuffer(cfg.jitter_target, cfg.jitter_max)
        self.error: BaseException | None = None
        self.hello: P.Hello | None = None
        self.sent_at: dict[int, float] = {}
        self.seq = 0
        self.input_done = False
        self.last_audio = time.monotonic()
        self.state_saved = asyncio.Event()
        # --transcript: what was sent per frame and the text of the frame being answered.
        self.lines: Transcript | None = None
        self._sent_pcm: dict[int, np.ndarray] = {}
        self._pieces = {"model": "", "user": ""}

    def emit(self, obj: dict[str, Any], line: str) -> None:
        if self.report is not None:
            self.report(obj, line)
            return
        print(json.dumps(obj) if self.cfg.json_lines else line, file=self.out, flush=True)

    async def run(self) -> int:
        """Connect (and reconnect) until the input is done; returns the exit status."""
        try:
            return await self._run()
        finally:
            if self.recorder is not None:
                self.recorder.close()
            if self.lines is not None:
                self.lines.close()

    async def _run(self) -> int:
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        from duplex.streamer.audio import AudioUnavailableError

        delay = self.cfg.backoff
        failures = 0
        while True:
            sessions = self.c.sessions
            try:
                await self._session()
                return 0
            except ServerRefused as e:
                self.warn(f"duplex connect: {e}")
                return e.exit_code
            except AudioUnavailableError as e:
                self.warn(f"duplex connect: {e}")
                return 3
            except P.ProtocolError as e:
                self.warn(f"duplex connect: bad message from the server: {e}")
                return 6
            except (ValueError, FileNotFoundError, FileExistsError) as e:
                self.warn(f"duplex connect: {e}")
                return 2
            except InvalidStatus as e:
                status = e.response.status_code
                if status == 401:
                    self.warn("duplex connect: the server refused the token (401)")
                    return 4
                reason = f"HTTP {status}"
            except (OSError, ConnectionClosed, TimeoutError, Retry) as e:
                reason = str(e) or type(e).__name__
            if self.quitting:
                return 0
            if self.c.sessions > sessions:
                # The connection had worked: a new outage gets the whole retry budget again.
                failures, delay = 0, self.cfg.backoff
            failures += 1
            if failures > self.cfg.retries:
                self.warn(f"duplex connect: giving up after {failures} tries: {reason}")
                return 5
            self.warn(f"duplex connect: connection lost ({reason}); retrying in {delay:.1f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.backoff_max)
            self.c.reconnects += 1

    async def _session(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        headers = {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else None
        ctx = None
        if self.cfg.url.startswith("wss://"):
            ctx = ssl.create_default_context(cafile=self.cfg.cafile)
        url = with_query(self.cfg.url, seed=self.cfg.seed, tokens=1 if self.cfg.record else None)
        async with connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=None,
            ssl=ctx,
            open_timeout=10,
        ) as ws:
            hello = P.parse_server(await asyncio.wait_for(ws.recv(), 30), None)
            if isinstance(hello, P.Error):
                with contextlib.suppress(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                if hello.code == P.ErrorCode.FULL:
                    raise Retry(f"server busy: {printable(hello.message)}")
                raise ServerRefused(
                    f"the server refused the session: {printable(hello.message)}", 6
                )
            if not isinstance(hello, P.Hello):
                raise ServerRefused(f"the server's first message was {type(hello).__name__}", 6)
            if "PCM" not in hello.accepts:
                raise ServerRefused("the server does not accept PCM audio", 6)
            if self.hello is None:
                self.prepare(self, hello)
            elif (hello.sample_rate, hello.frame_size) != (
                self.hello.sample_rate,
                self.hello.frame_size,
            ):
                raise ServerRefused("after reconnecting, the server has another audio format", 6)
            self.hello = hello
            self.c.sessions += 1
            self.sent_at.clear()
            if self.cfg.record:
                if self.recorder is None:
                    self.recorder = RemoteRecorder(self.cfg.record, redact_url(self.cfg.url))
                directory = self.recorder.begin(hello)
                self.emit({"recording": str(directory)}, f"[record] {directory}")
            self.emit(
                {"hello": vars(hello)},
                f"[connected] session {hello.session}: model {hello.model}, codec {hello.codec}, "
                f"{hello.sample_rate} Hz, {hello.frame_size} samples/frame",
            )
            if self.cfg.load_state and self.c.reconnects == 0:
                await self._load_state(ws, self.cfg.load_state)
            if self.cfg.text and self.c.reconnects == 0:
                await ws.send(P.encode(P.Text(self.cfg.text), "client"))
            tasks = [
                asyncio.create_task(self._send(ws)),
                asyncio.create_task(self._ping(ws)),
                asyncio.create_task(self._play()),
                asyncio.create_task(self._report()),
            ]
            if self.commands is not None:
                tasks.append(asyncio.create_task(self._steer(ws)))
            try:
                await self._receive(ws)
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _send(self, ws: Any) -> None:
        """Send frames at the frame rate, then (when the input ends) finish the session."""
        from websockets.exceptions import ConnectionClosed

        try:
            await self._send_frames(ws)
        except ConnectionClosed:
            pass
        except Exception as e:
            # Remembered for the receiver, which ends when this close arrives.
            self.error = e
            await ws.close(1000, "client failed")

    async def _load_state(self, ws: Any, path: str) -> None:
        self.pending_state = Path(path).read_bytes()
        await ws.send(P.encode(P.Control(P.Op.LOAD_STATE, self.pending_state), "client"))

    async def _steer(self, ws: Any) -> None:
        """Apply the TUI's commands (polled: the queue is filled from another thread)."""
        while True:
            while not self.commands.empty():
                cmd = self.commands.get_nowait()
                kind = cmd[0]
                if kind == "stop":
                    self.quitting = self.input_done = True
                    await ws.close(1000, "client quit")
                    return
                if kind == "type":
                    await ws.send(P.encode(P.Text(cmd[1]), "client"))
                elif kind == "mute":
                    self.muted = not self.muted
                    self.warn("microphone muted" if self.muted else "microphone on")
                elif kind == "pause":
                    self.paused = not self.paused
                    self.warn("paused (nothing is sent)" if self.paused else "resumed")
                elif kind == "save":
                    self.save_path = cmd[1]
                    await ws.send(P.encode(P.Control(P.Op.SAVE_STATE), "client"))
                elif kind == "load":
                    try:
                        await self._load_state(ws, cmd[1])
                    except OSError as e:
                        self.warn(f"could not read {cmd[1]}: {e}")
                elif kind == "reset":
                    await ws.send(P.encode(P.Control(P.Op.RESET), "client"))
            await asyncio.sleep(0.02)

    async def _send_frames(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        fs = self.hello.frame_size
        period = 1.0 / self.hello.frame_rate
        limit = None
        if self.cfg.max_seconds is not None:
            limit = int(self.cfg.max_seconds * self.hello.frame_rate)
        next_t = loop.time()
        while not self.input_done:
            if self.paused:
                await asyncio.sleep(period)
                next_t = loop.time()
                continue
            frame = await self.source.read(loop)
            if frame is None or (limit is not None and self.seq >= limit):
                self.input_done = True
                break
            if frame.size != fs:
                raise ValueError(f"input frame has {frame.size} samples, expected {fs}")
            pcm = P.pcm_to_int16(frame)
            if self.muted:
                pcm = np.zeros_like(pcm)
            self.sent_at[self.seq] = time.monotonic()
            if self.recorder is not None:
                self.recorder.sent_frame(self.seq, pcm)
            if self.cfg.transcript:
                if self.lines is None:
                    self.lines = Transcript(self.hello.frame_rate, self.cfg.transcript)
                self._sent_pcm[self.seq] = pcm
            self.level_in = pcm
            await ws.send(P.encode(P.Audio(self.seq, pcm), "client"))
            self.seq += 1
            self.c.sent += 1
            if self.source.paced_by_device:
                continue
            next_t += period
            await asyncio.sleep(max(0.0, next_t - loop.time()))
        # Let the last answers arrive, then save the state if asked and say goodbye.
        # A server that is behind still answers: wait while answers keep coming (at most 30 s),
        # give up after 2 s without one.
        end = loop.time() + 30.0
        while self.sent_at and loop.time() < end and time.monotonic() - self.last_audio < 2.0:
            await asyncio.sleep(period)
        if self.cfg.save_state:
            self.save_path = self.cfg.save_state
            self.state_saved.clear()
            await ws.send(P.encode(P.Control(P.Op.SAVE_STATE), "client"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state_saved.wait(), 30)
        await ws.close(1000, "done")

    async def _ping(self, ws: Any) -> None:
        while True:
            await ws.send(P.encode(P.Ping(time.monotonic_ns()), "client"))
            await asyncio.sleep(1.0)

    async def _play(self) -> None:
        """Playout clock: one frame per period from the jitter buffer to the sink."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.hello.frame_rate
        next_t = loop.time()
        while True:
            frame = self.jitter.pull(self.hello.frame_size)
            if frame is not None:
                self.sink.play(P.int16_to_pcm(frame))
            next_t += period
            await asyncio.sleep(max(0.0, next_t - loop.time()))

    def _transcribe(self, msg: P.Audio) -> None:
        """One answered frame into the --transcript lines (text arrives before its audio).

        No end-of-turn tokens reach the client, so utterances close after a second without
        text."""
        for k in [k for k in self._sent_pcm if k < msg.frame]:
            del self._sent_pcm[k]
        sent = self._sent_pcm.pop(msg.frame, None)
        heard = P.int16_to_pcm(sent) if sent is not None else np.zeros(0, np.float32)
        model, user = self._pieces["model"], self._pieces["user"]
        self._pieces = {"model": "", "user": ""}
        self.lines.frame(msg.frame, heard, P.int16_to_pcm(msg.pcm), model, user)

    def finish(self) -> None:
        """The last stats line and the summary of the whole conversation."""
        self.stats_line()
        self.emit(
            {"done": {"sent": self.c.sent, "received": self.c.received}},
            f"[done] sent {self.c.sent} frames, received {self.c.received}; "
            f"model said: {''.join(self.c.transcript)!r}",
        )

    def emit_levels(self, out: np.ndarray) -> None:
        """Levels of the last frame sent and the frame just received (for the TUI's meters)."""
        if self.report is None:
            return
        pcm_in = np.zeros(0) if self.level_in is None else self.level_in
        self.report({"levels": (pcm_in, out)}, "")

    def _drain(self) -> None:
        """Write what is still buffered (the session is over: nothing to keep pace with)."""
        while self.jitter.frames:
            self.sink.play(P.int16_to_pcm(self.jitter.frames.popleft()))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.stats_line()

    def stats_line(self) -> None:
        lat = np.fromiter(self.c.latency_ms, dtype=np.float64)
        p50, p99 = np.percentile(lat, [50, 99]).tolist() if lat.size else (0.0, 0.0)
        s = self.c.server
        obj = {
            "sent": self.c.sent,
            "received": self.c.received,
            "rtt_ms": self.c.rtt_ms,
            "latency_ms": {"p50": p50, "p99": p99},
            "jitter_depth": self.jitter.depth,
            "jitter_dropped": self.jitter.dropped,
            "underruns": self.jitter.underruns,
            "reconnects": self.c.reconnects,
            "server_dropped_input": s.get("dropped_input_frames", 0),
            "server_queue": s.get("queue_depth", 0),
        }
        rtt = f"{self.c.rtt_ms:.1f} ms" if self.c.rtt_ms is not None else "-"
        line = (
            f"[stats] sent {obj['sent']} recv {obj['received']} | rtt {rtt} | latency p50 "
            f"{p50:.0f} ms p99 {p99:.0f} ms | jitter {obj['jitter_depth']} frames, dropped "
            f"{obj['jitter_dropped']}, underruns {obj['underruns']} | server drops "
            f"{obj['server_dropped_input']} queue {obj['server_queue']}"
        )
        self.emit({"stats": obj}, line)

    async def _receive(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        fmt = self.hello.format()
        try:
            async for data in ws:
                try:
                    msg = P.parse_server(data, fmt)
                except P.ProtocolError as e:
                    await ws.close(int(P.Close.POLICY), str(e)[:120])
                    raise ServerRefused(f"bad message from the server: {e}", 6) from None
                self._handle(msg)
        except ConnectionClosed:
            pass
        if self.error is not None:
            raise self.error
        rcvd = ws.close_code
        if rcvd == 1000 and self.input_done:
            self._drain()
            return
        if rcvd in (1003, 1008, 1009, 4000):
            raise ServerRefused(f"the server closed the session ({rcvd}: {ws.close_reason})", 6)
        raise Retry(f"the server closed the connection ({rcvd}: {ws.close_reason or 'no reason'})")

    def _handle(self, msg: Any) -> None:
        if self.recorder is not None:
            self.recorder.received(msg)
        if isinstance(msg, P.Audio):
            t = self.sent_at.pop(msg.frame, None)
            if t is not None:
                self.c.latency_ms.append(1000.0 * (time.monotonic() - t))
            for k in [k for k in self.sent_at if k < msg.frame]:
                # Frames the server dropped never come back; forget them.
                del self.sent_at[k]
            self.c.received += 1
            self.last_audio = time.monotonic()
            if self.lines is not None:
                self._transcribe(msg)
            self.jitter.push(msg.pcm)
            self.sink.received(P.int16_to_pcm(msg.pcm))
            self.emit_levels(msg.pcm)
        elif isinstance(msg, P.Text):
            who = "model" if msg.stream == P.Stream.MODEL else "you"
            self._pieces["model" if who == "model" else "user"] += msg.text
            if who == "model":
                self.c.transcript.append(msg.text)
            self.emit({who: msg.text, "frame": msg.frame}, f"[{who}] {printable(msg.text)}")
        elif isinstance(msg, P.Ping):
            self.c.rtt_ms = (time.monotonic_ns() - msg.nonce) / 1e6
        elif isinstance(msg, P.Stats):
            self.c.server = msg.data
        elif isinstance(msg, P.Error):
            shown = printable(msg.message)
            self.emit({"error": msg.code, "message": msg.message}, f"[error] {shown}")
            if msg.code == P.ErrorCode.STATE:
                self.pending_state = None
        elif isinstance(msg, P.Event):
            self.emit({"event": msg.data}, f"[event] {msg.data}")
            kind = msg.data.get("event")
            if kind in ("reset", "state_loaded"):
                state = self.pending_state if kind == "state_loaded" else None
                self.pending_state = None
                if self.recorder is not None:
                    self.recorder.timeline_changed(int(msg.data.get("frame", 0)), state)
        elif isinstance(msg, P.State):
            if self.save_path:
                path = Path(self.save_path)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(msg.blob)
                os.replace(tmp, path)
                self.emit({"state": str(path)}, f"[state] saved to {path}")
            self.state_saved.set()


class FileSource:
    """Frames from a WAV file (resampled to the server's rate), then `tail` s of silence."""

    paced_by_device = False

    def __init__(self, path: str | None, seconds: float | None, tail: float) -> None:
        self.path, self.seconds, self.tail = path, seconds, tail
        self.audio = None

    async def read(self, loop: asyncio.AbstractEventLoop) -> np.ndarray | None:
        return self.audio.read_frame()

    def open(self, sample_rate: int, frame_size: int) -> None:
        from duplex.streamer.audio import FileAudio

        if self.audio is not None:
            return
        tail = round(self.tail * sample_rate / frame_size)
        silence = 0 if self.path else int((self.seconds or 10.0) * sample_rate / frame_size)
        self.audio = FileAudio(
            sample_rate, frame_size, self.path, None, tail_frames=tail, silence_frames=silence
        )


class DeviceSource:
    """Microphone frames (the device paces the sender)."""

    paced_by_device = True

    def __init__(self, audio: Any) -> None:
        self.audio = audio

    async def read(self, loop: asyncio.AbstractEventLoop) -> np.ndarray | None:
        return await loop.run_in_executor(None, self.audio.read_frame)


class Sink:
    """Where the model's audio goes: the speaker (through the jitter buffer's playout clock,
    so the listener hears its underruns) or a WAV file (every frame as received, in order, so
    the file is the model's reply whatever the network did; the jitter buffer still runs to
    report what a speaker would have played)."""

    def __init__(self, audio: Any | None, speaker: bool) -> None:
        self.audio = audio
        self.speaker = speaker

    def play(self, pcm: np.ndarray) -> None:
        if self.speaker and self.audio is not None:
            self.audio.write_frame(pcm)

    def received(self, pcm: np.ndarray) -> None:
        if not self.speaker and self.audio is not None:
            self.audio.write_frame(pcm)


def redact_url(url: str) -> str:
    """The URL without a `token` query parameter: fit for titles, logs and recordings."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    return urlunsplit(parts._replace(query=urlencode(query)))


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
    p.add_argument("--text", default="", help="text to type to the model at the start")
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
    feed.client.report = None
    feed.client.finish()
    return feed.exit_code if feed.exit_code is not None else 0


class AudioEnds:
    """The client's audio: files (--input/--output) or the audio device, opened once the
    server's HELLO gives the rate and frame size (`prepare`), closed at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.opened: list[Any] = []

    def prepare(self, client: Client, hello: P.Hello) -> None:
        from duplex.streamer.audio import DeviceAudio, FileAudio

        args = self.args
        sr, fs = hello.sample_rate, hello.frame_size
        frame_ms = 1000.0 / hello.frame_rate
        target = max(1, round(args.jitter_ms / frame_ms))
        client.jitter = JitterBuffer(target, max(target, round(args.max_jitter_ms / frame_ms)))
        if args.input or args.output:
            source = FileSource(args.input, args.seconds, args.tail)
            source.open(sr, fs)
            out = FileAudio(sr, fs, None, args.output) if args.output else None
            if out is not None:
                out.start()
                self.opened.append(out)
            client.source, client.sink = source, Sink(out, speaker=False)
        else:
            device = DeviceAudio(sr, fs, args.device, args.device)
            device.start()
            self.opened.append(device)
            client.source, client.sink = DeviceSource(device), Sink(device, speaker=True)

    def close(self) -> None:
        for audio in self.opened:
            audio.close()
        self.opened.clear()


async def _main(cfg: ConnectConfig, args: argparse.Namespace) -> int:
    ends = AudioEnds(args)
    client = Client(cfg, ends.prepare)
    try:
        code = await client.run()
    finally:
        ends.close()
    client.finish()
    return code
