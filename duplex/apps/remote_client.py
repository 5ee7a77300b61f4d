"""The websocket client of `duplex serve`: one conversation, surviving reconnects.

It sends one PCM frame per frame period (a WAV file paced in real time, or the microphone) and
plays what comes back through a jitter buffer (`duplex.apps.jitter`). A lost connection is
retried with exponential backoff. Once a second it reports a stats line: round-trip time
(PING/PONG), frame latency (a frame sent until its answer arrives), jitter depth, drops and
underruns, and the server's counts. What it sees goes out as typed events
(`duplex.streamer.events`), printed headless or shown by the TUI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from duplex.apps import protocol as P
from duplex.apps.connect_config import (
    ConnectConfig,
    Counters,
    Retry,
    ServerRefused,
    redact_url,
    with_query,
)
from duplex.apps.jitter import JitterBuffer
from duplex.apps.remote_recording import RemoteRecorder
from duplex.apps.remote_steer import steer
from duplex.apps.wire_opus import OpusDecoder, OpusEncoder, OpusError
from duplex.streamer.events import (
    Event,
    Levels,
    Printer,
    Report,
    Words,
    level_db,
    printable,
)
from duplex.streamer.statefile import write_atomic
from duplex.streamer.transcript import Transcript

log = logging.getLogger("duplex.connect")


class Client:
    """One conversation with the server, surviving reconnects.

    What it sees goes to `report(event)` as typed events (default: `Printer`, lines or --json)
    and its warnings to the `duplex.connect` logger (`connect.log_to_stderr` prints them);
    the TUI's feed replaces both, with `warn(line)`. With `commands`
    (a thread-safe queue of the TUI's command tuples) the conversation can be steered while it
    runs: typing, mute, pause, save/load state, reset, stop.
    """

    def __init__(
        self,
        cfg: ConnectConfig,
        prepare: Any,
        out=None,
        report: Callable[[Event], None] | None = None,
        warn: Callable[[str], None] | None = None,
        commands: queue.Queue | None = None,
    ) -> None:
        self.cfg = cfg
        self.prepare = prepare
        # Levels cost a little per frame: only a TUI shows them.
        self.wants_levels = report is not None
        self.report = report or Printer(cfg.json_lines, out)
        self.warn = warn
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
        # With --wire opus: this connection's encoder and decoder (Opus is stateful, so both
        # start afresh with every connection, as the server's do).
        self.opus_enc: OpusEncoder | None = None
        self.opus_dec: OpusDecoder | None = None
        self.sent_at: dict[int, float] = {}
        self.seq = 0
        # The frame read but not yet sent: a connection lost during its send sends it again on
        # the next one, so a reconnect loses no audio.
        self._unsent: np.ndarray | None = None
        self.input_done = False
        self.last_audio = time.monotonic()
        self.state_saved = asyncio.Event()
        # --transcript: what was sent per frame and the text of the frame being answered.
        self.lines: Transcript | None = None
        self._sent_pcm: dict[int, np.ndarray] = {}
        self._pieces = {"model": "", "user": ""}

    def _problem(self, message: str) -> None:
        """Something the user must know (a refusal, a lost connection): the TUI's line, or a
        warning in the log (on stderr, headless)."""
        if self.warn is not None:
            self.warn(f"duplex connect: {message}")
        else:
            log.warning(message)

    def notice(self, message: str) -> None:
        """The answer to a TUI command (mute, pause, a state file it could not read)."""
        if self.warn is not None:
            self.warn(message)
        else:
            log.info(message)

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
                self._problem(str(e))
                return e.exit_code
            except AudioUnavailableError as e:
                self._problem(str(e))
                return 3
            except P.ProtocolError as e:
                self._problem(f"bad message from the server: {e}")
                return 6
            except (ValueError, FileNotFoundError, FileExistsError) as e:
                self._problem(str(e))
                return 2
            except InvalidStatus as e:
                status = e.response.status_code
                if status == 401:
                    self._problem("the server refused the token (401)")
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
                self._problem(f"giving up after {failures} tries: {reason}")
                return 5
            self._problem(f"connection lost ({reason}); retrying in {delay:.1f} s")
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
        opus = self.cfg.wire == "opus"
        url = with_query(
            self.cfg.url,
            seed=self.cfg.seed,
            tokens=1 if self.cfg.record else None,
            audio="opus" if opus else None,
        )
        log.debug("connecting to %s (wire %s)", redact_url(url), self.cfg.wire)
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
            if opus:
                if "OPUS" not in hello.accepts or hello.extra.get("audio") != "opus":
                    raise ServerRefused("the server does not speak Opus; use --wire pcm", 6)
                try:
                    bitrate = int(hello.extra.get("opus", {}).get("bitrate", 24_000))
                    self.opus_enc = OpusEncoder(hello.sample_rate, hello.frame_size, bitrate)
                    self.opus_dec = OpusDecoder(hello.sample_rate, hello.frame_size)
                except (OpusError, TypeError, ValueError) as e:
                    raise ServerRefused(f"cannot use Opus with this server: {e}", 6) from None
            if self.hello is None:
                self.prepare(self, hello)
            elif (hello.sample_rate, hello.frame_size) != (
                self.hello.sample_rate,
                self.hello.frame_size,
            ):
                raise ServerRefused("after reconnecting, the server has another audio format", 6)
            self.hello = hello
            self.c.sessions += 1
            log.debug(
                "session %s: queue %s frames, idle timeout %s s, audio %s, seed %s",
                hello.session,
                hello.extra.get("queue_frames"),
                hello.extra.get("idle_timeout"),
                hello.extra.get("audio", "pcm"),
                hello.extra.get("seed"),
            )
            self.sent_at.clear()
            if self.cfg.record:
                if self.recorder is None:
                    self.recorder = RemoteRecorder(self.cfg.record, redact_url(self.cfg.url))
                directory = self.recorder.begin(hello)
                self.report(Report("recording", str(directory), f"[record] {directory}"))
            self.report(
                Report(
                    "hello",
                    vars(hello),
                    f"[connected] session {hello.session}: model {hello.model}, codec "
                    f"{hello.codec}, {hello.sample_rate} Hz, {hello.frame_size} samples/frame",
                )
            )
            if self.cfg.load_state and self.c.reconnects == 0:
                await self.load_state(ws, self.cfg.load_state)
            if self.cfg.text and self.c.reconnects == 0:
                await ws.send(P.encode(P.Text(self.cfg.text), "client"))
            tasks = [
                asyncio.create_task(self._send(ws)),
                asyncio.create_task(self._ping(ws)),
                asyncio.create_task(self._play()),
                asyncio.create_task(self._report()),
            ]
            if self.commands is not None:
                tasks.append(asyncio.create_task(steer(self, ws)))
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

    async def load_state(self, ws: Any, path: str) -> None:
        """Send the state file at `path` (--load-state, or F6 in the TUI)."""
        self.pending_state = Path(path).read_bytes()
        await ws.send(P.encode(P.Control(P.Op.LOAD_STATE, self.pending_state), "client"))

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
            if self._unsent is None:
                self._unsent = await self.source.read(loop)
            frame = self._unsent
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
            if self.opus_enc is not None:
                data = P.encode(P.Opus(self.seq, self.opus_enc.encode(pcm)), "client")
            else:
                data = P.encode(P.Audio(self.seq, pcm), "client")
            await ws.send(data)
            self._unsent = None
            self.c.audio_bytes_sent += len(data) - 5
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
        self.report(self.c.summary())

    def _levels(self, out: np.ndarray) -> None:
        """Levels of the last frame sent and the frame just received (for the TUI's meters)."""
        if not self.wants_levels:
            return
        pcm_in = np.zeros(0, np.int16) if self.level_in is None else self.level_in
        self.report(Levels(level_db(P.int16_to_pcm(pcm_in)), level_db(P.int16_to_pcm(out))))

    def _drain(self) -> None:
        """Write what is still buffered (the session is over: nothing to keep pace with)."""
        while self.jitter.frames:
            self.sink.play(P.int16_to_pcm(self.jitter.frames.popleft()))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.stats_line()

    def stats_line(self) -> None:
        self.report(self.c.stats(self.jitter))

    async def _receive(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        fmt = self.hello.format()
        try:
            async for data in ws:
                try:
                    msg = P.parse_server(data, fmt)
                    if isinstance(msg, P.Opus | P.Audio):
                        self.c.audio_bytes_received += len(data) - 5
                    if isinstance(msg, P.Opus):
                        if self.opus_dec is None:
                            raise P.ProtocolError("OPUS_AUDIO without ?audio=opus")
                        try:
                            msg = P.Audio(msg.frame, self.opus_dec.decode(msg.packet))
                        except OpusError as e:
                            raise P.ProtocolError(f"OPUS_AUDIO frame {msg.frame}: {e}") from None
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
            self._levels(msg.pcm)
        elif isinstance(msg, P.Text):
            who = "model" if msg.stream == P.Stream.MODEL else "you"
            self._pieces["model" if who == "model" else "user"] += msg.text
            if who == "model":
                self.c.transcript.append(msg.text)
            self.report(Words(who, msg.text, msg.frame))
        elif isinstance(msg, P.Ping):
            self.c.rtt_ms = (time.monotonic_ns() - msg.nonce) / 1e6
        elif isinstance(msg, P.Stats):
            self.c.server = msg.data
        elif isinstance(msg, P.Error):
            shown = printable(msg.message)
            self.report(
                Report("error", msg.code, f"[error] {shown}", extra={"message": msg.message})
            )
            if msg.code == P.ErrorCode.STATE:
                self.pending_state = None
        elif isinstance(msg, P.Event):
            kind = msg.data.get("event")
            frame = msg.data.get("frame")
            self.report(
                Report(
                    "event",
                    msg.data,
                    f"[event] {msg.data}",
                    frame=frame if isinstance(frame, int) else None,
                    event=str(kind),
                )
            )
            if kind in ("reset", "state_loaded"):
                state = self.pending_state if kind == "state_loaded" else None
                self.pending_state = None
                if self.recorder is not None:
                    self.recorder.timeline_changed(int(msg.data.get("frame", 0)), state)
        elif isinstance(msg, P.State):
            if self.save_path:
                path = write_atomic(self.save_path, msg.blob)
                self.report(Report("state", str(path), f"[state] saved to {path}"))
            self.state_saved.set()
