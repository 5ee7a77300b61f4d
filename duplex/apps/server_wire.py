"""One session's wire-codec work for `duplex serve`, kept off the stepping path.

The scheduler's task and the engine thread serve every session at once: whatever runs there for
one session is time every other session waits. Opus decoding of what a client sends and Opus
encoding of what it is sent are per-session costs (and a stateful codec: each packet depends on
the ones before it), so each session gets an `OrderedWork`: its jobs run one at a time, in the
order they were queued, on a thread pool shared by the server, and each result is handed back on
the event loop in that same order. A session whose codec is slow, or stuck, only falls behind on
its own audio; the step, and every other session's frames, go on.

The backlog is bounded like every other queue of the server. A producer that can wait (the reader
of a connection, decoding what arrives) awaits `room()` first: it stops reading, as it did when
decoding ran inline, and the socket pushes back on the client. One that must not wait (the
scheduler's callback, encoding what leaves) never does: past `limit` jobs waiting, the oldest
loses its work (its result is None, which the caller turns into a dropped frame), and past
`4 * limit` items the oldest goes altogether. Both are counted.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("duplex.serve")


@dataclass
class _Job:
    work: Callable[[], Any] | None
    then: Callable[[Any], None]


class OrderedWork:
    """Jobs of one session, run in order on `pool`; results delivered in order on the loop.

    `put(work, then)` queues `work()` for a pool thread and `then(result)` for the event loop
    after it; `put(None, then)` queues only `then(None)`, in order (a message that must not
    overtake the frames queued before it). A job that raises stops the worker: `on_error(e)` is
    called on the loop and nothing queued after it runs. Use from the event loop only.
    """

    def __init__(
        self,
        pool: concurrent.futures.Executor,
        on_error: Callable[[Exception], None],
        limit: int = 10,
    ) -> None:
        self.pool = pool
        self.on_error = on_error
        self.limit = max(1, limit)
        self.skipped = 0
        self.dropped = 0
        self.closed = False
        self._jobs: collections.deque[_Job] = collections.deque()
        self._running = False
        self._moved = asyncio.Event()

    @property
    def busy(self) -> bool:
        """A job is running or waiting: whatever is queued now comes after it."""
        return self._running or bool(self._jobs)

    def _waiting(self) -> list[_Job]:
        return [j for j in self._jobs if j.work is not None]

    async def room(self) -> None:
        """Wait until fewer than `limit` jobs wait, so the next `put` skips nothing."""
        while not self.closed and len(self._waiting()) >= self.limit:
            self._moved.clear()
            await self._moved.wait()

    def put(self, work: Callable[[], Any] | None, then: Callable[[Any], None]) -> None:
        if self.closed:
            return
        self._jobs.append(_Job(work, then))
        waiting = self._waiting()
        if len(waiting) > self.limit:
            # Behind: the oldest waiting job is not worth doing any more (stale audio).
            waiting[0].work = None
            self.skipped += 1
        if len(self._jobs) > 4 * self.limit:
            self._jobs.popleft()
            self.dropped += 1
        self._pump()

    def close(self) -> None:
        """Run nothing more (a job already on a pool thread finishes there, unheard)."""
        self.closed = True
        self._jobs.clear()
        self._moved.set()

    def _pump(self) -> None:
        while self._jobs and not self._running and not self.closed:
            job = self._jobs.popleft()
            if job.work is None:
                self._then(job, None)
                continue
            self._running = True
            fut = asyncio.get_running_loop().run_in_executor(self.pool, job.work)
            fut.add_done_callback(lambda f, job=job: self._done(job, f))

    def _done(self, job: _Job, fut: asyncio.Future) -> None:
        self._running = False
        self._moved.set()
        if self.closed or fut.cancelled():
            return
        e = fut.exception()
        if e is not None:
            self.close()
            self.on_error(e)
            return
        self._then(job, fut.result())
        self._pump()

    def _then(self, job: _Job, result: Any) -> None:
        try:
            job.then(result)
        except Exception as e:
            # The caller's own delivery failed: this session stops, the loop goes on.
            log.error("wire delivery failed: %r", e)
            self.close()
            self.on_error(e)
