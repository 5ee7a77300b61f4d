"""Per-stage timing and loss counters of the frame loop, readable from any thread.

The engine records how long each stage of each frame took (encode, model, decode, total) and
counts what was lost (input frames dropped, output underruns, device status flags). `snapshot()`
gives a plain dict for the TUI, the server's stats messages and session recordings.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

STAGES = ("encode", "model", "decode", "total")


@dataclass
class StageStats:
    """Percentiles (ms) over the last `window` frames of one stage."""

    p50: float
    p95: float
    p99: float
    mean: float
    max: float
    count: int


@dataclass
class Stats:
    """Counters and recent per-stage timings of one engine (all sessions share the timings)."""

    frame_ms: float
    window: int = 2000
    frames: int = 0
    dropped_input_frames: int = 0
    output_underruns: int = 0
    input_overflows: int = 0
    output_underflows: int = 0
    device_restarts: int = 0
    _timings: dict[str, deque] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._timings = {s: deque(maxlen=self.window) for s in STAGES}

    def record(self, **stage_ms: float) -> None:
        """Add one frame's stage durations in ms, e.g. record(encode=1.2, model=3.4, ...)."""
        with self._lock:
            for k, v in stage_ms.items():
                if k not in self._timings:
                    raise KeyError(f"unknown stage {k!r}; stages are {STAGES}")
                self._timings[k].append(float(v))
            self.frames += 1

    def stage(self, name: str) -> StageStats:
        with self._lock:
            data = np.fromiter(self._timings[name], dtype=np.float64)
        if data.size == 0:
            return StageStats(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        p50, p95, p99 = np.percentile(data, [50, 95, 99])
        return StageStats(
            float(p50), float(p95), float(p99), float(data.mean()), float(data.max()), data.size
        )

    def recent(self, name: str = "total", n: int = 100) -> list[float]:
        with self._lock:
            return list(self._timings[name])[-n:]

    def snapshot(self) -> dict:
        """Plain-data view: counters, per-stage percentiles, and the real-time factor."""
        stages = {s: vars(self.stage(s)) for s in STAGES}
        total = stages["total"]["mean"]
        return {
            "frames": self.frames,
            "frame_ms": self.frame_ms,
            "dropped_input_frames": self.dropped_input_frames,
            "output_underruns": self.output_underruns,
            "input_overflows": self.input_overflows,
            "output_underflows": self.output_underflows,
            "device_restarts": self.device_restarts,
            "stages_ms": stages,
            "real_time_factor": (total / self.frame_ms) if total else 0.0,
        }
