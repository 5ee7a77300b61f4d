"""The batched-step scheduler: many sessions, one engine, one engine thread, one frame clock.

Every step computes the whole batch, so a server gains nothing by stepping each session when its
frame arrives: it waits until the batch is full. The rule, in `Scheduler._until_ready`: a step
starts once every live session has a frame queued, or when the frame clock says it is time
(sessions without a frame sit that step out), or at once while some session has a backlog to
work off. Input queues are bounded: when a session (or the machine) falls behind, its oldest
frame is dropped and counted, because stale audio is worth less than keeping up.

Every engine operation (join, leave, typed text, save or restore a state, reset, step) runs on
the scheduler's single engine thread, in the order it was queued, between two steps: the engine
is never touched concurrently and a session is never stepped after it left. The scheduler runs as
one asyncio task; it never waits on a session's consumer (results go to a callback that must not
block), so a slow network peer delays no one else. A step that fails is retried session by
session, so only the session that made it fail is told (`Lane.on_failure`), and a bug in the
scheduler itself fails the sessions of that batch, never the scheduler.
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

if TYPE_CHECKING:
    from duplex.streamer.engine import Engine, FrameResult, Session

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
    ) -> None:
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

    async def start(self) -> None:
        self._wake = asyncio.Event()
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
                    await self._step(batch)
                except Exception as e:
                    # A bug in the scheduler itself: it must not die with it (every session
                    # would freeze). The sessions of this batch are failed.
                    log.error("stepping failed: %r", e)
                    for lane in batch:
                        lane.on_failure("internal server error")
            if self.after_tick is not None:
                self.after_tick(live)
            # Behind (a step overran its frame): the frame clock restarts from now.
            next_t = max(next_t + period, loop.time())
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

    async def _step(self, batch: dict[Lane, FrameIn]) -> None:
        loop = asyncio.get_running_loop()
        frames = {lane.session: f.pcm for lane, f in batch.items() if f.pcm is not None}
        codes = {lane.session: f.codes for lane, f in batch.items() if f.pcm is None}
        try:
            results = await loop.run_in_executor(
                self._executor, lambda: self.engine.step(frames, codes)
            )
        except Exception as e:
            # One session's state or input made the batched step fail. Find it: each session
            # steps alone; the ones that still fail are told, the others get their frame.
            self.failed_steps += 1
            log.warning("batched step failed (%r); stepping alone", e)
            results, failed = await loop.run_in_executor(
                self._executor, lambda: self._step_alone(frames, codes)
            )
            for lane in batch:
                if lane.session in failed:
                    log.warning("a session failed its step: %r", failed[lane.session])
                    lane.on_failure("the engine failed on this session")
        self.ticks += 1
        self.batch_sizes[len(batch)] += 1
        for lane, f in batch.items():
            res = results.get(lane.session)
            if res is not None and not lane.closed:
                lane.on_frame(f, res)

    def _step_alone(
        self, frames: dict[Session, np.ndarray], codes: dict[Session, list[int]]
    ) -> tuple[dict[Session, FrameResult], dict[Session, Exception]]:
        """Engine thread: step each session by itself; (results, the sessions that failed)."""
        results, failed = {}, {}
        for s, x in [
            *((s, ({s: x}, {})) for s, x in frames.items()),
            *((s, ({}, {s: x})) for s, x in codes.items()),
        ]:
            try:
                results.update(self.engine.step(*x))
            except Exception as e:
                failed[s] = e
        return results, failed
