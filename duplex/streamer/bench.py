"""`duplex bench engine`: per-frame latency, batching capacity, and flat cost over an hour.

Three measurements, each in one process so ratios compare like with like:

1. Latency at batch 1: per-stage p50/p95/p99 of encode, model and decode over `--frames` steps,
   against the frame duration.
2. Batching: step time at N sessions for growing N; the largest N whose p99 (and mean) step
   stays under the frame duration; frames/s at batch 16 vs 16 sessions stepped one by one.
3. Flat cost: two sessions in one engine after 1 minute of real steps; one of them then has its
   text log grown to 60 minutes (the log is the only part of a session that grows; the rest of
   the state is fixed-size, so the hour is simulated by appending 59 minutes of text ids at the
   measured non-pad rate instead of stepping 180,000 frames). The two are stepped alone in
   alternation, so the ratio of their median step times is measured under the same load. RSS
   before and after the growth; state bytes per session next to the KV cache a transformer of
   the same width and depth would hold for the same hour.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

HELP = "engine benchmark: per-frame latency, sessions per CPU, flat cost over an hour"
DESCRIPTION = (
    __doc__
    + """
Results: benchmarks/results/engine.json and engine.png (override with --out).
Example: duplex bench engine --frames 500 --max-batch 48"""
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="model name or .safetensors (default: default)"
    )
    p.add_argument("--codec", default="default", help="codec (default: the shipped codec)")
    p.add_argument("--frames", type=int, default=500, help="frames per latency measurement")
    p.add_argument("--batches", default="1,2,4,8,12,16,24,32,48", help="session counts to try")
    p.add_argument("--batch-frames", type=int, default=100, help="frames per batch size")
    p.add_argument("--minutes", type=float, default=60.0, help="simulated conversation length")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: faster here)")
    p.add_argument("--out", default="benchmarks/results", help="results folder")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _frames(n: int, fs: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n * fs) / 16000
    x = 0.2 * np.sin(2 * np.pi * (140 + 30 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    return [x[i * fs : (i + 1) * fs].astype(np.float32) for i in range(n)]


def _load(args: argparse.Namespace):
    from duplex import codecs
    from duplex.model import duplex_lm

    try:
        codec, trained = codecs.load(args.codec), True
    except (FileNotFoundError, ValueError):
        codec, trained = codecs.load(args.codec, pretrained=False), False
    return duplex_lm.load(args.model), codec, trained


def latency(model, codec, frames: int) -> dict:
    from duplex.streamer.engine import Engine, SamplingConfig

    data = _frames(frames + 50, codec.frame_size, 0)
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=0))
        for f in data[:50]:
            eng.step({s: f})
        eng.stats.__init__(frame_ms=eng.stats.frame_ms)
        for f in data[50:]:
            eng.step({s: f})
        return eng.stats.snapshot()


def batching(model, codec, sizes: list[int], frames: int) -> list[dict]:
    from duplex.streamer.engine import Engine, SamplingConfig

    rows = []
    frame_ms = 1000.0 / codec.frame_rate
    for n in sizes:
        data = [_frames(frames + 10, codec.frame_size, i) for i in range(n)]
        with Engine(model, codec, slots=n) as eng:
            ss = [eng.join(SamplingConfig(seed=i)) for i in range(n)]
            times = []
            for t in range(frames + 10):
                t0 = time.perf_counter()
                eng.step({s: data[i][t] for i, s in enumerate(ss)})
                if t >= 10:
                    times.append(1000 * (time.perf_counter() - t0))
        arr = np.array(times)
        row = {
            "sessions": n,
            "step_ms_mean": float(arr.mean()),
            "step_ms_p50": float(np.percentile(arr, 50)),
            "step_ms_p99": float(np.percentile(arr, 99)),
            "frames_per_s": n * 1000.0 / float(arr.mean()),
            "real_time_mean": bool(arr.mean() < frame_ms),
            "real_time_p99": bool(np.percentile(arr, 99) < frame_ms),
        }
        rows.append(row)
        print(
            f"  {n:3d} sessions: step mean {row['step_ms_mean']:6.1f} ms, "
            f"p99 {row['step_ms_p99']:6.1f} ms, {row['frames_per_s']:7.0f} frames/s",
            flush=True,
        )
    return rows


def one_by_one(model, codec, n: int, frames: int) -> float:
    """frames/s when n sessions each get their own batch-1 step, one after another."""
    import contextlib
    import copy

    from duplex.streamer.engine import Engine, SamplingConfig

    data = [_frames(frames, codec.frame_size, i) for i in range(n)]
    engines = []
    with contextlib.ExitStack() as stack:
        for i in range(n):
            # A module streams once at a time: each solo session gets its own copy.
            e = Engine(copy.deepcopy(model), copy.deepcopy(codec), slots=1)
            e = stack.enter_context(e)
            engines.append((e, e.join(SamplingConfig(seed=i))))
        t0 = time.perf_counter()
        for t in range(frames):
            for i, (e, s) in enumerate(engines):
                e.step({s: data[i][t]})
        dt = time.perf_counter() - t0
    return n * frames / dt


def flat_cost(model, codec, minutes: float) -> dict:
    """Two sessions in one engine: `young` has one minute of history, `old` has `minutes`.
    They are stepped alone, alternately, so both see the same machine load (paired timing)."""
    from duplex.model.tokenizer import PAD
    from duplex.streamer.engine import Engine, SamplingConfig

    rate = codec.frame_rate
    one_min = int(60 * rate)
    rounds = 300
    data = _frames(one_min + rounds, codec.frame_size, 5)
    with Engine(model, codec, slots=2) as eng:
        young = eng.join(SamplingConfig(seed=0))
        old = eng.join(SamplingConfig(seed=1))
        for f in data[:one_min]:
            eng.step({young: f, old: f})
        rss_1 = _rss_mb()
        host_1 = model.host_bytes() / 2
        reader = model.backbone.reader
        grown = 0
        if reader is not None:
            ref = reader.stream_state.rows[old.slot]
            # Share of frames with a byte: a text-only log (skipped PADs) holds one id per
            # such frame, a full log one per frame.
            if reader.cfg.skip_id >= 0:
                non_pad = ref.length / one_min
            else:
                log = ref.history.log.read(0, ref.length)
                non_pad = float(np.mean(log != PAD)) if log.size else 0.3
            n = int((minutes - 1) * 60 * rate)
            rng = np.random.default_rng(0)
            ids = np.where(rng.random(n) < max(non_pad, 0.3), rng.integers(32, 127, n), PAD)
            before = reader.lengths()[old.slot]
            reader.extend_history(old.slot, ids.astype(np.int64))
            grown = reader.lengths()[old.slot] - before
        rss_60 = _rss_mb()
        host_60 = model.host_bytes() - host_1
        t_young, t_old = [], []
        for i, f in enumerate(data[one_min:]):
            order = ((young, t_young), (old, t_old)) if i % 2 else ((old, t_old), (young, t_young))
            for s, ts in order:
                t0 = time.perf_counter()
                eng.step({s: f})
                ts.append(1000 * (time.perf_counter() - t0))
        state = model.state_bytes()
        codec_state = sum(st.row_bytes() for st in codec.get_state().values())
    at_1, at_60 = float(np.median(t_young)), float(np.median(t_old))
    bb = model.cfg.backbone
    hour_tokens = int(minutes * 60 * rate)
    kv_bf16 = len(bb.layers) * 2 * bb.d_model * 2 * hour_tokens
    return {
        "step_ms_after_1min": at_1,
        "step_ms_after_sim": at_60,
        "ratio": at_60 / at_1,
        "paired_rounds": rounds,
        "rss_mb_after_1min": rss_1,
        "rss_mb_after_sim": rss_60,
        "rss_ratio": rss_60 / rss_1,
        "simulated_minutes": minutes,
        "log_tokens_appended": grown,
        "host_bytes_1min": host_1,
        "host_bytes_sim": host_60,
        "model_state_bytes": state,
        "codec_state_bytes": codec_state,
        "kv_cache_bytes_same_width_bf16": kv_bf16,
    }


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, codec, trained = _load(args)
    frame_ms = 1000.0 / codec.frame_rate
    print(
        f"model {args.model} ({model.num_params() / 1e6:.2f} M params), codec {args.codec}"
        f" ({'trained' if trained else 'random weights'}), frame {frame_ms:.1f} ms, "
        f"{args.threads} threads",
        flush=True,
    )
    lat = latency(model, codec, args.frames)
    st = lat["stages_ms"]
    print("latency at batch 1 (ms):")
    for k in ("encode", "model", "decode", "total"):
        print(f"  {k:7s} p50 {st[k]['p50']:6.2f}  p95 {st[k]['p95']:6.2f}  p99 {st[k]['p99']:6.2f}")
    print(
        f"  total p50 = {100 * st['total']['p50'] / frame_ms:.0f}% of the frame (target <= 30%), "
        f"p99 = {100 * st['total']['p99'] / frame_ms:.0f}% (target <= 100%)"
    )
    print("batching:")
    sizes = [int(x) for x in args.batches.split(",")]
    rows = batching(model, codec, sizes, args.batch_frames)
    rt = [r["sessions"] for r in rows if r["real_time_p99"]]
    rt_mean = [r["sessions"] for r in rows if r["real_time_mean"]]
    serial = one_by_one(model, codec, 16, max(20, args.batch_frames // 4))
    b16 = next((r["frames_per_s"] for r in rows if r["sessions"] == 16), float("nan"))
    print(
        f"  most sessions in real time: {max(rt, default=0)} (p99 < frame), "
        f"{max(rt_mean, default=0)} (mean < frame); target >= 16"
    )
    print(
        f"  batch 16: {b16:.0f} frames/s vs one by one {serial:.0f} frames/s ({b16 / serial:.1f}x)"
    )
    print("flat cost:")
    flat = flat_cost(model, codec, args.minutes)
    print(
        f"  step after 1 min {flat['step_ms_after_1min']:.2f} ms, after {args.minutes:.0f} min "
        f"{flat['step_ms_after_sim']:.2f} ms: ratio {flat['ratio']:.3f} (target <= 1.1)"
    )
    print(
        f"  RSS {flat['rss_mb_after_1min']:.0f} MB -> {flat['rss_mb_after_sim']:.0f} MB "
        f"(ratio {flat['rss_ratio']:.3f}); host log+index {flat['host_bytes_sim'] / 1e6:.1f} MB"
    )
    kv_mb = flat["kv_cache_bytes_same_width_bf16"] / 1e6
    print(
        f"  state per session: model {flat['model_state_bytes'] / 1e3:.0f} KB + codec "
        f"{flat['codec_state_bytes'] / 1e3:.0f} KB, constant; a transformer KV cache of the same "
        f"width/depth for {args.minutes:.0f} min: {kv_mb:.0f} MB"
    )
    result = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
        "model": args.model,
        "codec": args.codec,
        "codec_trained": trained,
        "frame_ms": frame_ms,
        "latency": lat,
        "batching": rows,
        "max_realtime_sessions_p99": max(rt, default=0),
        "max_realtime_sessions_mean": max(rt_mean, default=0),
        "batch16_frames_per_s": b16,
        "one_by_one_16_frames_per_s": serial,
        "flat": flat,
    }
    (out / "engine.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "engine.png")
    print(f"wrote {out / 'engine.json'} and {out / 'engine.png'}")
    return 0


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    st = r["latency"]["stages_ms"]
    names = ["encode", "model", "decode", "total"]
    for i, q in enumerate(["p50", "p95", "p99"]):
        ax[0].bar(np.arange(4) + 0.25 * i, [st[n][q] for n in names], 0.25, label=q)
    ax[0].axhline(r["frame_ms"], color="k", ls="--", label="frame")
    ax[0].set_xticks(np.arange(4) + 0.25, names)
    ax[0].set_ylabel("ms")
    ax[0].set_title("latency at batch 1")
    ax[0].legend()
    b = r["batching"]
    n = [x["sessions"] for x in b]
    ax[1].plot(n, [x["step_ms_mean"] for x in b], "o-", label="mean")
    ax[1].plot(n, [x["step_ms_p99"] for x in b], "s-", label="p99")
    ax[1].axhline(r["frame_ms"], color="k", ls="--", label="frame")
    ax[1].set_xlabel("sessions in one batch")
    ax[1].set_ylabel("step ms")
    ax[1].set_title("batching")
    ax[1].legend()
    f = r["flat"]
    ax[2].bar(
        ["1 min", f"{f['simulated_minutes']:.0f} min"],
        [f["step_ms_after_1min"], f["step_ms_after_sim"]],
    )
    ax[2].set_ylabel("median step ms")
    ax[2].set_title(f"flat cost (ratio {f['ratio']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
