"""The batched-step scheduler: many sessions, one engine, one frame clock, a pipelined step.

Every step computes the whole batch, so a server gains nothing by stepping each session when its
frame arrives: it waits until the batch is full. The rule, in `Scheduler._until_ready`: a step
starts once every live session has a frame queued, or when the frame clock says it is time
(sessions without a frame sit that step out), or at once while some session has a backlog to
work off. Input queues are bounded: when a session (or the machine) falls behind, its oldest
frame is dropped and counted, because stale audio is worth less than keeping up.

Every engine operation (join, leave, typed text, save or restore a state, reset) and every model
step runs on the scheduler's single engine thread, in the order it was queued; operations run
only while no step is under way, so no part of the engine is touched by two threads at once and
a session is never stepped after it left. The scheduler runs as
one asyncio task; it never waits on a session's consumer (results go to a callback that must not
block), so a slow network peer delays no one else. A step that fails is retried session by
session, so only the session that made it fail is told (`Lane.on_failure`), and a bug in the
scheduler itself fails the sessions of that batch, never the scheduler.

A step is a pipeline of three phases (`duplex.streamer.engine_step`), each taking the batches in
the order they were formed: the PCM sessions' frames are encoded on the codec thread
(`duplex.streamer.codec_stage`), the model steps on the engine thread, and its codes are decoded
on the codec thread again. So the engine thread runs the model only, and while
it steps batch n the codec thread decodes batch n - 1 and encodes batch n + 1. At most one batch
waits between two phases (then the loop stops taking frames and the lanes' queues fill, as when
a step overran), so a frame's result leaves after its own encode, model and decode plus at most
one codec phase of the batch ahead of it: one frame of pipelining, no more. Engine operations
wait until every batch taken has been delivered, so they see the sessions, the codec and the
model at the same frame, as if the step had been one call.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from duplex.streamer.codec_stage import CodecStage, merge_thoughts, think_attempt

if TYPE_CHECKING:
    from duplex.streamer.engine import Engine, FrameResult, Session
    from duplex.streamer.engine_step import Heard, Thought

log = logging.getLogger("duplex.scheduler")


@dataclass(frozen=True)
class FrameIn:
    """One input frame of a session: PCM [frame_size] float32, or the K codec codes when the
    client runs the codec; `seq` is the sender's frame number, `t` when it arrived."""

    seq: int
    pcm: np.ndarray | None = None
    codes: list[int] | None = None
    t: float = 0.0


@dataclass(eq=False)
class Lane:
    """One session's place in the scheduler: its bounded input queue and where results go.

    `on_frame(frame_in, result)` and `on_failure(message)` run on the event loop and must not
    block (queue the network I/O elsewhere). A lane steps once its `session` is set.
    """

    on_frame: Callable[[FrameIn, FrameResult], None]
    on_failure: Callable[[str], None]
    queue_frames: int = 10
    session: Session | None = None
    closed: bool = False
    inbox: collections.deque = field(default_factory=collections.deque)
    dropped: int = 0
    frames_in: int = 0

    def push(self, frame: FrameIn) -> None:
        """Queue one input frame; a full queue drops its oldest frame (counted)."""
        if len(self.inbox) >= self.queue_frames:
            self.inbox.popleft()
            self.dropped += 1
        self.inbox.append(frame)
        self.frames_in += 1

    @property
    def live(self) -> bool:
        return not self.closed and self.session is not None


class Scheduler:
    """Steps the live lanes of an entered `Engine` together on the frame clock.

    Use from one asyncio event loop: `await start()`, `add(lane)` / `discard(lane)`, `wake()`
    after pushing a frame, `await op(fn)` for any engine operation, `await stop()`.
    """

    def __init__(
        self,
        engine: Engine,
        after_tick: Callable[[list[Lane]], None] | None = None,
        frame_rate: float | None = None,
        codec_thread: bool = True,
    ) -> None:
        """`codec_thread=False` runs the codec's phases on the engine thread, one step after
        the other as `Engine.step` does (to compare; results are the same)."""
        self.engine = engine
        self.after_tick = after_tick
        # The frame clock; the engine's codec rate unless told (tests slow it down).
        self.frame_rate = frame_rate or engine.frame_rate
        self.lanes: set[Lane] = set()
        # How many steps had how many sessions in them (a batched server batches).
        self.batch_sizes: collections.Counter = collections.Counter()
        self.failed_steps = 0
        self.ticks = 0
        self._ops: collections.deque = collections.deque()
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.codec = CodecStage(engine, None if codec_thread else self._executor)
        # Batches between the phases: encoded and waiting for the model, answered and waiting
        # for the decoder (one each at most: the loop waits rather than run further ahead).
        self._thinking: asyncio.Queue | None = None
        self._speaking: asyncio.Queue | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._phases: list[asyncio.Task] = []

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thinking = asyncio.Queue(maxsize=1)
        self._speaking = asyncio.Queue(maxsize=1)
        self._phases = [
            asyncio.create_task(self._think_loop()),
            asyncio.create_task(self._decode_loop()),
        ]
        self._task = asyncio.create_task(self._loop())

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued operations (the closed sessions' leaves), then stop stepping.

        Cancelling the loop instead could cancel a leave still waiting for the engine thread,
        and its session would keep its slot."""
        if self._task is not None:
            self._closing = True
            self.wake()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for task in self._phases:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.codec.close()
        self._executor.shutdown(wait=True)
        # Operations queued after the loop ended: the ones nobody waits for still run.
        while self._ops:
            fn, fut = self._ops.popleft()
            if fut is None:
                with contextlib.suppress(Exception):
                    fn()
            elif not fut.done():
                fut.cancel()

    def add(self, lane: Lane) -> None:
        self.lanes.add(lane)
        self.wake()

    def discard(self, lane: Lane) -> None:
        self.lanes.discard(lane)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def op(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between two steps; returns its result."""
        fut = asyncio.get_running_loop().create_future()
        self._ops.append((fn, fut))
        self.wake()
        return await fut

    def op_nowait(self, fn: Callable[[], Any]) -> None:
        """Queue `fn` for the engine thread without waiting (a leave from a closing handler);
        it runs before any operation queued after it."""
        self._ops.append((fn, None))
        self.wake()

    def _live(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.live]

    async def _drained(self) -> None:
        """Until every batch taken has been decoded and delivered (or failed)."""
        await self._idle.wait()

    async def _run_ops(self) -> None:
        loop = asyncio.get_running_loop()
        if self._ops:
            # The engine, its codec and the sessions at one frame before any operation.
            await self._drained()
        while self._ops:
            fn, fut = self._ops.popleft()
            try:
                result = await loop.run_in_executor(self._executor, fn)
            except Exception as e:
                if fut is not None and not fut.done():
                    fut.set_exception(e)
                elif fut is None:
                    log.error("engine operation failed: %r", e)
                continue
            if fut is not None and not fut.done():
                fut.set_result(result)

    async def _loop(self) -> None:
        """Ops, then one batched step, at least one per frame of time while sessions live."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.frame_rate
        next_t = loop.time()
        while True:
            await self._run_ops()
            if self._closing and not self._ops:
                await self._drained()
                return
            live = self._live()
            if not live:
                self._wake.clear()
                if not self._ops and not self._closing:
                    await self._wake.wait()
                next_t = loop.time()
                continue
            batch = {lane: lane.inbox.popleft() for lane in live if lane.inbox}
            if batch:
                try:
                    await self._encode(batch)
                except Exception as e:
                    # A bug in the scheduler itself: it must not die with it (every session
                    # would freeze). The sessions of this batch are failed.
                    log.error("stepping failed: %r", e)
                    for lane in batch:
                        lane.on_failure("internal server error")
            if self.after_tick is not None:
                self.after_tick(live)
            # Behind (a step overran its frame): the frame clock restarts from now. Ahead
            # (steps taken early for a backlog): at most one frame ahead, or a session with one
            # frame waiting would wait for a clock that a flooding batch-mate ran ahead.
            now = loop.time()
            next_t = min(max(next_t + period, now), now + period)
            await self._until_ready(next_t)

    async def _until_ready(self, deadline: float) -> None:
        """Wait until the next step should start (see the module doc) or an op is queued."""
        loop = asyncio.get_running_loop()
        while not self._ops and not self._closing:
            live = self._live()
            if not live or all(c.inbox for c in live) or any(len(c.inbox) > 1 for c in live):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for can swallow the loop's cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _fail(self, batch: _Batch, failed: dict[Session, Exception]) -> None:
        """Take the lanes whose session failed a phase out of the batch; they are told when the
        batch is delivered, so a lane hears of its frames and its failure in order."""
        for lane in list(batch.frames):
            if lane.session in failed:
                batch.failed[lane] = failed[lane.session]
                del batch.frames[lane]

    def _counted(self, error: Exception | None, phase: str) -> None:
        if error is not None:
            self.failed_steps += 1
            log.warning("batched %s failed (%r); stepping alone", phase, error)

    async def _encode(self, frames_in: dict[Lane, FrameIn]) -> None:
        """Encode phase (codec thread), then hand the batch to the model phase."""
        batch = _Batch(frames_in)
        frames = {lane.session: f.pcm for lane, f in frames_in.items() if f.pcm is not None}
        got = await self.codec.encode(frames)
        self._counted(got.batch_error, "encode")
        self._fail(batch, got.failed)
        self.ticks += 1
        self.batch_sizes[len(frames_in) + len(batch.failed)] += 1
        self._in_flight += 1
        self._idle.clear()
        await self._thinking.put((batch, got.result))

    def _done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _broken(self, batch: _Batch, e: Exception) -> None:
        """A bug in the scheduler itself: the batch's sessions fail, the scheduler goes on."""
        log.error("stepping failed: %r", e)
        for lane in (*batch.failed, *batch.frames):
            lane.on_failure("internal server error")

    async def _think_loop(self) -> None:
        """Model phase (engine thread): each encoded batch in turn, then to the decoder."""
        loop = asyncio.get_running_loop()
        while True:
            batch, heard = await self._thinking.get()
            try:
                thought = await self._think(loop, batch, heard)
            except Exception as e:
                self._broken(batch, e)
                self._done()
                continue
            await self._speaking.put((batch, thought))

    async def _think(self, loop: asyncio.AbstractEventLoop, batch: _Batch, heard: Heard) -> Thought:
        codes = {lane.session: f.codes for lane, f in batch.frames.items() if f.pcm is None}
        if not heard.sessions and not codes:
            # Every session of the batch failed its encode: nothing to step.
            return merge_thoughts([], self.engine.rows, self.engine.K)
        got = await loop.run_in_executor(
            self._executor, lambda: think_attempt(self.engine, heard, codes)
        )
        self._counted(got.batch_error, "model step")
        self._fail(batch, got.failed)
        return got.result

    async def _decode_loop(self) -> None:
        """Decode phase (codec thread): each answered batch in turn, then its results out."""
        while True:
            batch, thought = await self._speaking.get()
            try:
                results = {}
                if thought.said:
                    got = await self.codec.decode(thought)
                    self._counted(got.batch_error, "decode")
                    self._fail(batch, got.failed)
                    results = got.result
                for lane, e in batch.failed.items():
                    log.warning("a session failed its step: %r", e)
                    lane.on_failure("the engine failed on this session")
                for lane, f in batch.frames.items():
                    res = results.get(lane.session)
                    if res is not None and not lane.closed:
                        lane.on_frame(f, res)
            except Exception as e:
                self._broken(batch, e)
            finally:
                self._done()


@dataclass(eq=False)
class _Batch:
    """One step's frames on their way through the phases, and the lanes that failed one."""

    frames: dict[Lane, FrameIn]
    failed: dict[Lane, Exception] = field(default_factory=dict)
