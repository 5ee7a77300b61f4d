"""Load test of `duplex serve` on loopback: N clients streaming in real time.

For each N, a fresh `duplex serve` process (one batched engine, --max-sessions N) is started and
N websocket clients in this process each send one PCM frame per frame period (20 ms) for the
duration, unsynchronised (random phase within a frame), like independent callers. A frame is
*dropped* if it never comes back as AUDIO (the server's bounded queue dropped it as stale, or it
was still unanswered 2 s after the end); the server's own count is reported too. Frame latency
is client-side: a PCM frame sent until its AUDIO arrives (network, queueing, one batched step).

Reports the largest N with zero dropped frames and its p99 frame latency; writes
benchmarks/results/serve_load.json and .png. Results depend entirely on the machine and on what
else runs on it: the JSON records CPU count, load average and torch threads.

    python benchmarks/serve_load.py                   # N = 1 2 4 8 12 16 24 32, 60 s each
    python benchmarks/serve_load.py --seconds 20 --ns 1,2,4
    python benchmarks/serve_load.py --model default --cpus 0,1                # the shipped model,
    python benchmarks/serve_load.py --model default --cpus 0,1 --no-codec-thread  # on 2 cores

`--no-codec-thread` runs the server's neural codec on its engine thread, one phase after the
other (the server before the codec stage), to compare with the pipelined default. `--cpus`
pins the server and the clients to those CPUs (a small box on a bigger machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.apps import protocol as P  # noqa: E402


@dataclass
class ClientResult:
    """What one client saw."""

    sent: int = 0
    received: int = 0
    latency_ms: list[float] = field(default_factory=list)
    server_dropped: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    """One N: totals over its clients."""

    n: int
    seconds: float
    sent: int
    received: int
    dropped: int
    server_dropped: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    errors: list[str]
    server_stages_ms: dict


def codec_for_benchmark(tmp: Path) -> tuple[str, str]:
    """The shipped codec if its weights exist, else the same architecture with random weights
    saved to a file (compute cost is identical; only the audio is meaningless)."""
    from duplex.codecs import SHIPPED

    if SHIPPED["default"].is_file():
        return "default", "trained (shipped default)"
    import torch
    from safetensors.torch import save_file

    from duplex.codecs.small import SmallCodec, SmallCodecConfig

    torch.manual_seed(0)
    codec = SmallCodec(SmallCodecConfig())
    path = tmp / "random_codec.safetensors"
    sd = {k: v.detach().contiguous().clone() for k, v in codec.state_dict().items()}
    save_file(sd, str(path), metadata={"config": json.dumps(codec.cfg.to_dict())})
    return str(path), "random weights, default architecture (trained weights not shipped yet)"


def start_server(n: int, codec: str, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "duplex", "serve", "--port", "0", "--max-sessions", str(n)]
    cmd += ["--model", args.model, "--codec", codec, "--threads", str(args.threads)]
    cmd += ["--queue-frames", str(args.queue_frames), "--idle-timeout", "600"]
    # Every client connects from 127.0.0.1: lift the per-address limits meant for strangers.
    cmd += ["--max-per-peer", str(n), "--connect-rate", "1000"]
    if not args.codec_thread:
        cmd += ["--no-codec-thread"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server did not start: {proc.stderr.read()}")
    return proc, int(json.loads(line)["port"])


async def one_client(port: int, seconds: float, warmup: float, seed: int) -> ClientResult:
    from websockets.asyncio.client import connect

    res = ClientResult()
    rng = np.random.default_rng(seed)
    async with connect(
        f"ws://127.0.0.1:{port}/?seed={seed}", compression=None, max_size=None, open_timeout=60
    ) as ws:
        hello = P.parse_server(await ws.recv(), None)
        fmt = hello.format()
        period = 1.0 / hello.frame_rate
        frames = int(seconds * hello.frame_rate)
        skip = int(warmup * hello.frame_rate)
        sent_at: dict[int, float] = {}
        t = np.arange(hello.frame_size) / hello.sample_rate

        async def receive() -> None:
            async for data in ws:
                msg = P.parse_server(data, fmt)
                if isinstance(msg, P.Audio):
                    t0 = sent_at.pop(msg.frame, None)
                    res.received += 1
                    if t0 is not None and msg.frame >= skip:
                        res.latency_ms.append(1000.0 * (time.monotonic() - t0))
                elif isinstance(msg, P.Stats):
                    res.server_dropped = int(msg.data["dropped_input_frames"])
                elif isinstance(msg, P.Error):
                    res.error = msg.message

        reader = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        # Independent callers: each starts at a random phase of the frame clock.
        await asyncio.sleep(random.Random(seed).random() * period)
        start = loop.time()
        for i in range(frames):
            x = 0.2 * np.sin(2 * np.pi * 200 * (t + i * period)) + 0.02 * rng.standard_normal(
                t.size
            )
            sent_at[i] = time.monotonic()
            await ws.send(P.encode(P.Audio(i, P.pcm_to_int16(x)), "client"))
            res.sent += 1
            await asyncio.sleep(max(0.0, start + (i + 1) * period - loop.time()))
        deadline = loop.time() + 2.0
        while sent_at and loop.time() < deadline and not reader.done():
            await asyncio.sleep(period)
        await ws.close()
        await asyncio.wait_for(reader, 10)
    return res


async def run_n(n: int, port: int, seconds: float, warmup: float) -> list[ClientResult]:
    async def guarded(i: int) -> ClientResult:
        try:
            return await one_client(port, seconds, warmup, seed=i)
        except Exception as e:
            return ClientResult(error=repr(e))

    return await asyncio.gather(*(guarded(i) for i in range(n)))


def measure(n: int, codec: str, args: argparse.Namespace) -> LoadResult:
    proc, port = start_server(n, codec, args)
    try:
        clients = asyncio.run(run_n(n, port, args.seconds, args.warmup))
        stages = asyncio.run(server_stages(port))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = np.array([x for c in clients for x in c.latency_ms] or [np.nan])
    sent = sum(c.sent for c in clients)
    received = sum(c.received for c in clients)
    return LoadResult(
        n=n,
        seconds=args.seconds,
        sent=sent,
        received=received,
        dropped=sent - received,
        server_dropped=sum(c.server_dropped for c in clients),
        latency_p50_ms=float(np.nanpercentile(lat, 50)),
        latency_p99_ms=float(np.nanpercentile(lat, 99)),
        latency_max_ms=float(np.nanmax(lat)),
        errors=[c.error for c in clients if c.error],
        server_stages_ms=stages,
    )


async def server_stages(port: int) -> dict:
    """The engine's per-stage timings as the server reports them (one short extra session)."""
    from websockets.asyncio.client import connect

    try:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=None, open_timeout=30) as ws:
            hello = P.parse_server(await ws.recv(), None)
            fmt = hello.format()
            for i in range(60):
                await ws.send(P.encode(P.Audio(i, np.zeros(hello.frame_size, np.int16)), "client"))
                await asyncio.sleep(1.0 / hello.frame_rate)
            async with asyncio.timeout(5):
                async for data in ws:
                    msg = P.parse_server(data, fmt)
                    if isinstance(msg, P.Stats):
                        return msg.data["engine"]
    except Exception as e:
        return {"error": repr(e)}
    return {}


def plot(results: list[LoadResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r.n for r in results]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ns, [r.latency_p99_ms for r in results], "o-", label="p99")
    ax[0].plot(ns, [r.latency_p50_ms for r in results], "s--", label="p50")
    ax[0].axhline(20.0, color="grey", lw=0.8, ls=":", label="one frame (20 ms)")
    ax[0].set_xlabel("concurrent clients")
    ax[0].set_ylabel("frame latency (ms)")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].bar([str(n) for n in ns], [100.0 * r.dropped / max(1, r.sent) for r in results])
    ax[1].set_xlabel("concurrent clients")
    ax[1].set_ylabel("dropped frames (%)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ns", default="1,2,4,8,12,16,24,32", help="client counts to try")
    ap.add_argument("--seconds", type=float, default=60.0, help="streaming time per N (60)")
    ap.add_argument("--warmup", type=float, default=2.0, help="latency ignores the first s (2)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (1)")
    ap.add_argument("--queue-frames", type=int, default=10, help="server input queue (10)")
    ap.add_argument("--stop-after", type=int, default=2, help="stop after this many failing N")
    ap.add_argument(
        "--no-codec-thread",
        dest="codec_thread",
        action="store_false",
        help="server runs the codec on its engine thread (serve --no-codec-thread)",
    )
    ap.add_argument("--cpus", help="pin server and clients to these CPUs, e.g. 0,1")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    if args.cpus:
        # The server process inherits this affinity.
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    conditions = {
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "server_torch_threads": args.threads,
        "model": args.model,
        "seconds_per_n": args.seconds,
        "warmup_s": args.warmup,
        "queue_frames": args.queue_frames,
        "codec_thread": args.codec_thread,
        "cpus_pinned": args.cpus,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        codec, codec_note = codec_for_benchmark(Path(tmp))
        conditions["codec"] = codec_note
        failing = 0
        print(f"{'N':>4} {'sent':>7} {'recv':>7} {'dropped':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for n in ns:
            r = measure(n, codec, args)
            results.append(r)
            print(
                f"{r.n:>4} {r.sent:>7} {r.received:>7} {r.dropped:>8} "
                f"{r.latency_p50_ms:>8.1f} {r.latency_p99_ms:>8.1f}"
                + (f"  errors: {r.errors[:2]}" if r.errors else ""),
                flush=True,
            )
            failing = failing + 1 if (r.dropped or r.errors) else 0
            if failing >= args.stop_after:
                break
    clean = [r for r in results if r.dropped == 0 and not r.errors]
    best = max(clean, key=lambda r: r.n) if clean else None
    conditions["load_average_at_end"] = os.getloadavg()
    summary = {
        "largest_n_without_drops": best.n if best else 0,
        "p99_latency_ms_at_that_n": best.latency_p99_ms if best else None,
        "conditions": conditions,
        "results": [asdict(r) for r in results],
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    load = conditions["load_average_at_start"][0]
    title = (
        f"duplex serve load, {conditions['cpus_usable']} CPUs, load avg {load:.1f}, "
        f"{args.seconds:g} s per N, model {args.model}, codec {codec_note}, "
        f"codec {'thread' if args.codec_thread else 'on the engine thread'}"
    )
    plot(results, out.with_suffix(".png"), title)
    if best:
        print(f"largest N with zero dropped frames: {best.n} (p99 {best.latency_p99_ms:.1f} ms)")
    else:
        print("no N ran without dropped frames")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
