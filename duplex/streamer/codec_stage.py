"""The codec thread: a batched step's encode and decode, off the thread that steps the model.

A server's step has three phases (`duplex.streamer.engine_step`): encode the PCM sessions' frames,
step the model, decode its codes. The scheduler runs the model phase on its engine thread and the
two codec phases here, on one thread of their own (`codec`), so while the model steps one batch
the codec decodes the batch before it and encodes the batch after it. The codec's state never
moves between threads: only this thread runs it while the scheduler steps, and the engine thread
touches it (join, leave, save, restore, reset) only when the pipeline is empty.

Each phase runs batched; if the batched call raises, it runs again session by session on the
same input (`attempt`), so one session whose audio or state breaks the codec fails alone and
its batch-mates go on. A batched call that failed part-way may already have moved some rows'
state, as the batched step always could; the usual failure is a check of the input, which moves
nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from duplex.streamer.engine_step import Heard, Thought

if TYPE_CHECKING:
    from duplex.streamer.engine import Engine, FrameResult, Session

T = TypeVar("T")
A = TypeVar("A")


@dataclass
class Attempt(Generic[T]):
    """A phase's result for the sessions that got through, the sessions that failed (and why),
    and the batched call's error when it had to go session by session."""

    result: T
    failed: dict[Session, Exception] = field(default_factory=dict)
    batch_error: Exception | None = None


def attempt(
    phase: Callable[[A], T],
    whole: A,
    parts: dict[Session, A],
    merge: Callable[[list[T]], T],
) -> Attempt[T]:
    """`phase(whole)`; if that raises, `phase` on each session's part and `merge` the results
    of the parts that pass. Runs on the calling thread."""
    try:
        return Attempt(phase(whole))
    except Exception as e:
        done, failed = [], {}
        for s, part in parts.items():
            try:
                done.append(phase(part))
            except Exception as e_s:
                failed[s] = e_s
        return Attempt(merge(done), failed, e)


def merge_thoughts(parts: list[Thought], rows: int, k: int) -> Thought:
    """One step's answer from answers computed separately (disjoint rows)."""
    import torch

    out = Thought(
        [], torch.zeros(rows, k, 1, dtype=torch.long), torch.zeros(rows, dtype=torch.bool)
    )
    for p in parts:
        out.said += p.said
        out.codes[p.decoding] = p.codes[p.decoding]
        out.decoding |= p.decoding
        out.ms_encode = max(out.ms_encode, p.ms_encode)
        out.ms_model += p.ms_model
    return out


def think_attempt(
    engine: Engine, heard: Heard, codes: dict[Session, list[int]]
) -> Attempt[Thought]:
    """The model phase, batched, else session by session (on the calling thread)."""
    parts = {s: (heard.only(s), {}) for s in heard.sessions}
    parts.update({s: (heard.only(s), {s: c}) for s, c in codes.items()})
    return attempt(
        lambda a: engine.think(*a),
        (heard, codes),
        parts,
        lambda done: merge_thoughts(done, engine.rows, engine.K),
    )


class CodecStage:
    """Runs an entered engine's codec phases on one thread of its own, batched, in the order
    they are asked for. Use from one asyncio event loop; `close()` when done."""

    def __init__(
        self, engine: Engine, executor: concurrent.futures.ThreadPoolExecutor | None = None
    ) -> None:
        """With `executor` (one thread, e.g. the engine thread) the phases run there instead
        of on a thread of the stage's own."""
        self.engine = engine
        self._own = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="codec"
        )

    async def encode(self, frames: dict[Session, np.ndarray]) -> Attempt[Heard]:
        """The PCM sessions' frames encoded in one batch (each alone if the batch fails)."""
        e = self.engine
        if not frames:
            # Only sessions that send codes: nothing for the codec (no thread hop).
            return Attempt(e.encode({}))

        def run() -> Attempt[Heard]:
            return attempt(
                e.encode,
                frames,
                {s: {s: x} for s, x in frames.items()},
                lambda done: Heard.merge(done, e.rows, e.K, e.frame_size),
            )

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def decode(self, thought: Thought) -> Attempt[dict[Session, FrameResult]]:
        """Each session's audio for one answered step, decoded in one batch (each alone if the
        batch fails); its recording gets the frame."""
        e = self.engine

        def merge(done: list[dict[Session, FrameResult]]) -> dict[Session, FrameResult]:
            return {s: r for d in done for s, r in d.items()}

        def run() -> Attempt[dict[Session, FrameResult]]:
            parts = {x.session: thought.only(x.session) for x in thought.said}
            return attempt(e.decode, thought, parts, merge)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        """Finish the phase under way and stop the thread (if it is the stage's own)."""
        if self._own:
            self._executor.shutdown(wait=True)
