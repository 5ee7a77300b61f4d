"""GWA systems figures: prefill rate, decode cost against context, host bytes, peak RSS, state.

The accuracy table is `gwa_recall.py`'s (one `duplex eval recall` process per cell, which also
reports these figures as a by-product, on whatever load the machine had). This script measures
the systems targets of issue 14 on their own, with CPU time (`time.process_time`, one torch
thread) beside wall time, and every comparison made inside one run:

- prefill: ids/s of the whole model's prefill (chunks of 8192 through `step`) and of the host
  side alone (history append + the read of every position), at each --contexts length;
- decode: CPU time per decoded id at 1K and at 1M ids of history, interleaved (1K, 1M, 1K, ...)
  so that the machine's load drifts equally over both; the 1M history is built by the bulk
  (prefill) path and handed to the reader, which is what a prefill leaves;
- host bytes per id at 1M, itemised (log, chains, tables, id chain), entries held and RAM held;
- peak RSS of a fresh process prefilling 16K and 1M ids of mqar and decoding its queries (each
  in its own process: ru_maxrss never goes down), with the RSS after each phase;
- state bytes per stream at 1K and 1M.

    .venv/bin/python benchmarks/gwa_systems.py                 # everything (~1M-id runs)
    .venv/bin/python benchmarks/gwa_systems.py --only prefill decode bytes

Writes benchmarks/results/gwa_systems.json and prints a table per part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
K = 1024
CHUNK = 8192


def _rss_mb() -> float:
    """Current resident set of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(name: str):
    from duplex.model.backbone import Backbone
    from duplex.model.recall_models import WEIGHTS_DIR, load_recall, model_config

    if (WEIGHTS_DIR / f"{name}.safetensors").exists():
        return load_recall(name).eval()
    torch.manual_seed(0)  # not shipped (recall-gwa-lookup): random weights cost the same
    return Backbone(model_config(name)).eval()


def _ids(n: int, seed: int = 0) -> np.ndarray:
    from duplex.model.recall_tasks import make_task

    return make_task("mqar", n, np.random.default_rng(seed)).ids[:n]


def prefill(models: list[str], contexts: list[int]) -> list[dict]:
    """ids/s of the model's prefill and of the host side (history + reads) alone."""
    from duplex.model.gwa_history import History, read_histories

    rows = []
    for name in models:
        model = _model(name)
        for n in contexts:
            ids = _ids(n)
            c0, w0 = time.process_time(), time.perf_counter()
            with torch.no_grad(), model.streaming(1):
                for s in range(0, n, CHUNK):
                    model.step(torch.from_numpy(ids[None, s : s + CHUNK]))
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            c0 = time.process_time()
            h = History(model.cfg.read)
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                h.append(ids[s:e])
                read_histories([h], np.arange(s, e)[None])
            host = time.process_time() - c0
            h.close()
            rows.append(
                {
                    "model": name,
                    "context": n,
                    "model_cpu_s": cpu,
                    "model_wall_s": wall,
                    "model_ids_per_cpu_s": n / cpu,
                    "host_cpu_s": host,
                    "host_ids_per_cpu_s": n / host,
                }
            )
            print(
                f"| {name} | {n:,} | {n / cpu:,.0f} | {n / wall:,.0f} | {n / host:,.0f} |",
                flush=True,
            )
    return rows


def _decoder(model, history_ids: np.ndarray):
    """A streaming context of `model` whose reader holds `history_ids` (built by the bulk path)."""
    from duplex.model.gwa_history import History
    from duplex.model.gwa_reader import _HistoryRef

    ctx = model.streaming(1)
    ctx.__enter__()
    h = History(model.cfg.read)
    h.append(history_ids)
    st = model.reader._require_streaming()
    st.rows[0].history.close()
    st.rows[0] = _HistoryRef(h, len(h))
    return ctx


def decode(models: list[str], small: int, large: int, steps: int, rounds: int) -> list[dict]:
    """CPU ms per decoded id with `small` and `large` ids of history, interleaved."""
    rows = []
    for name in models:
        base = _model(name)
        ids = _ids(large + steps * rounds, seed=1)
        pair = {}
        for n in (small, large):
            m = _model(name)
            m.load_state_dict(base.state_dict())
            pair[n] = (m, _decoder(m, ids[:n]), [n])
        cpu = {small: 0.0, large: 0.0}
        state = {}
        with torch.no_grad():
            for _ in range(rounds):
                for n, (m, _, at) in pair.items():
                    c0 = time.process_time()
                    for _ in range(steps):
                        m.step(torch.from_numpy(ids[None, at[0] : at[0] + 1]))
                        at[0] += 1
                    cpu[n] += time.process_time() - c0
            for n, (m, _, _) in pair.items():
                state[n] = m.state_bytes()
        for _, ctx, _ in pair.values():
            ctx.__exit__(None, None, None)
        ms = {n: 1000 * cpu[n] / (steps * rounds) for n in cpu}
        rows.append(
            {
                "model": name,
                "small": small,
                "large": large,
                "steps": steps * rounds,
                "ms_per_id_small": ms[small],
                "ms_per_id_large": ms[large],
                "ratio": ms[large] / ms[small],
                "state_bytes_small": state[small],
                "state_bytes_large": state[large],
            }
        )
        print(
            f"| {name} | {ms[small]:.3f} | {ms[large]:.3f} | {ms[large] / ms[small]:.3f} "
            f"| {state[small]:,} | {state[large]:,} |",
            flush=True,
        )
    return rows


def host_bytes(models: list[str], n: int) -> list[dict]:
    """Host bytes per id of one stream's history at n ids, itemised."""
    from duplex.model.gwa_history import History
    from duplex.model.recall_models import model_config

    rows = []
    for name in models:
        h = History(model_config(name).read)
        ids = _ids(n)
        for s in range(0, n, CHUNK):
            h.append(ids[s : s + CHUNK])
        parts = {"log": h.log.nbytes()}
        for oi, m in enumerate(h.index.cfg.orders):
            parts[f"table{m}"] = h.index.head[oi].nbytes
            if h.index.prev[oi] is not None:
                parts[f"chain{m}"] = h.index.prev[oi].nbytes()
        if h.occurrences is not None:
            parts["id_chain"] = h.occurrences.prev.nbytes()
            parts["id_heads"] = h.occurrences.head.nbytes
        logs = [h.log] + [p for p in h.index.prev if p is not None]
        if h.occurrences is not None:
            logs.append(h.occurrences.prev)
        held = sum(lg._ram.nbytes for lg in logs) + sum(
            parts[k] for k in parts if k.startswith(("table", "id_heads"))
        )
        row = {
            "model": name,
            "ids": n,
            "bytes_per_id": h.nbytes() / n,
            "parts_per_id": {k: v / n for k, v in parts.items()},
            "ram_held_per_id": held / n,
        }
        h.close()
        rows.append(row)
        items = ", ".join(f"{k} {v:.3f}" for k, v in row["parts_per_id"].items())
        print(f"| {name} | {n:,} | {row['bytes_per_id']:.3f} | {held / n:.3f} | {items} |")
    return rows


def rss_worker(name: str, n: int) -> dict:
    """In a fresh process: RSS after loading, generating the task, prefill, decode."""
    from duplex.model.recall_tasks import make_task

    torch.set_num_threads(1)
    phases = {"start": _rss_mb()}
    model = _model(name)
    phases["loaded"] = _rss_mb()
    sample = make_task("mqar", n, np.random.default_rng(0))
    phases["task"] = _rss_mb()
    ids = sample.ids
    with torch.no_grad(), model.streaming(1):
        for s in range(0, sample.start, CHUNK):
            model.step(torch.from_numpy(ids[None, s : min(sample.start, s + CHUNK)]))
        phases["prefilled"] = _rss_mb()
        # the first 256 ids of the query section (decode holds nothing that grows with it)
        for i in range(sample.start, min(ids.size, sample.start + 256)):
            model.step(torch.from_numpy(ids[None, i : i + 1]))
        phases["decoded"] = _rss_mb()
        host = model.reader.host_bytes()
    return {"model": name, "context": n, "rss_mb": phases, "peak_mb": _peak_mb(), "host": host}


def rss(models: list[str], contexts: list[int]) -> list[dict]:
    rows = []
    for name in models:
        for n in contexts:
            cmd = [sys.executable, __file__, "--rss-worker", name, str(n)]
            got = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            row = json.loads(got.stdout.strip().splitlines()[-1])
            rows.append(row)
            ph = " | ".join(f"{v:.0f}" for v in row["rss_mb"].values())
            print(f"| {name} | {n:,} | {ph} | {row['peak_mb']:.0f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = ("prefill", "decode", "bytes", "rss")
    ap.add_argument("--only", nargs="+", choices=parts, default=list(parts))
    ap.add_argument("--models", nargs="+", default=["recall-gwa", "recall-gwa-lookup"])
    ap.add_argument("--prefill-contexts", nargs="+", type=int, default=[16 * K, 64 * K])
    ap.add_argument("--rss-contexts", nargs="+", type=int, default=[16 * K, 1024 * K])
    ap.add_argument("--decode-steps", type=int, default=50, help="ids per round and length")
    ap.add_argument("--decode-rounds", type=int, default=4)
    # 10**6, not 2**20: at 2**20 the next id crosses a table doubling (4 entries per bucket),
    # and that one step rebuilds the index (O(n), amortised O(1)); measured separately.
    ap.add_argument("--large", type=int, default=10**6, help="the long history (ids)")
    ap.add_argument("--out", default=str(OUT / "gwa_systems.json"))
    ap.add_argument("--rss-worker", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker[0], int(args.rss_worker[1]))))
        return
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    if "prefill" in args.only:
        print("\n| model | context | model ids/CPU-s | model ids/wall-s | host ids/CPU-s |")
        print("|---|---|---|---|---|")
        result["prefill"] = prefill(args.models, args.prefill_contexts)
    if "decode" in args.only:
        print(f"\n| model | CPU ms/id at 1K | at {args.large:,} | ratio | state B 1K | state B |")
        print("|---|---|---|---|---|---|")
        result["decode"] = decode(args.models, K, args.large, args.decode_steps, args.decode_rounds)
    if "bytes" in args.only:
        print("\n| model | ids | host B/id (entries) | RAM held B/id | parts B/id |")
        print("|---|---|---|---|---|")
        result["bytes"] = host_bytes(args.models, args.large)
    if "rss" in args.only:
        print("\n| model | context | RSS MB: start | loaded | task | prefilled | decoded | peak |")
        print("|---|---|---|---|---|---|---|---|")
        result["rss"] = rss(args.models[:1], args.rss_contexts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
