"""Recall table: each model x task x context through `duplex eval recall`, one process per cell.

One process per cell keeps each peak RSS honest (ru_maxrss never goes down inside a process).
Writes benchmarks/results/gwa_recall.json (every report), gwa_recall.md (the table) and
gwa_recall_{accuracy,speed,memory}.png. Cells already in the JSON are kept (re-run with --fresh).

    .venv/bin/python benchmarks/gwa_recall.py               # the committed grid
    .venv/bin/python benchmarks/gwa_recall.py --quick       # 1K and 16K only
    .venv/bin/python benchmarks/gwa_recall.py --train --device cuda   # the recipes, then --ship
    .venv/bin/python benchmarks/gwa_recall.py --issue-trials --fresh  # >= 20 trials, 10 at 1M

Also gwa_recall_mqar_curve.png: mqar accuracy against the number of pairs (N/16: 64 at 1K ...
64K at 1M) for every model, its state bytes in the legend: where a fixed state stops recalling.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
TASKS = (
    "mqar",
    "passkey",
    "niah",
    "copy",
    "position",
    "hop2",
    "hop3",
    "alias",
    "update",
)
K = 1024

# (model, contexts); trials and asked per context length
GRID = {
    "recall-gwa": (1 * K, 16 * K, 128 * K, 1024 * K),
    "recall-gwa-lookup": (1 * K, 16 * K, 128 * K, 1024 * K),
    "recall-gdr": (1 * K, 16 * K, 128 * K, 1024 * K),
    "recall-swa": (1 * K, 16 * K, 128 * K),
    "recall-attn": (1 * K, 16 * K, 128 * K),
}
TRIALS = {1 * K: 20, 16 * K: 4, 128 * K: 2, 1024 * K: 1}
# The issue's counts: >= 20 trials per cell below 1M, >= 10 at 1M (--issue-trials).
ISSUE_TRIALS = {1 * K: 20, 16 * K: 20, 128 * K: 20, 1024 * K: 10}

# How each model is trained (--train): name -> list of `duplex train recall` argument lists,
# run in order (a later stage starts from the earlier one's weights). The fixed-state
# baselines first get off the 7.09 plateau on the mqar curriculum, then see the suite; every
# model ends on the same suite mixture at the same length, so the comparison is like for like.
# "{prev}" is the weights the stage before wrote.
RECIPES = {
    "recall-gdr": [
        "--mix mqar-curriculum --steps 8000 --lr 3e-3",
        "--mix suite --steps 4000 --lr 1e-3 --init {prev}",
    ],
    "recall-swa": [
        "--mix mqar-curriculum --steps 8000 --lr 3e-3",
        "--mix suite --steps 4000 --lr 1e-3 --init {prev}",
    ],
    "recall-attn": [
        "--mix mqar-curriculum --steps 8000 --lr 1e-3",
        "--mix suite --steps 4000 --lr 1e-3 --init {prev}",
    ],
    "recall-gwa": ["--mix suite --steps 6000 --lr 3e-3"],
    # Warm-started from recall-gwa (its four blocks are this model's first four): the second
    # read's lookup head then proposes the first link from step 0 (the cold start).
    # --freeze-warm: the copied blocks stay fixed, or the output loss removes the first link
    # from the residual the lookup heads read (measured: proposals 47/48 -> 0/48 in 200 steps).
    "recall-gwa-lookup": ["--mix suite --steps 8000 --lr 1e-3 --warm recall-gwa --freeze-warm"],
}
ASKED = {1 * K: 1, 16 * K: 8, 128 * K: 16, 1024 * K: 32}


def train_all(
    models: list[str], device: str, batch: int, ship: bool, minutes: float | None
) -> None:
    """Run the recipes (one `duplex train recall` process per stage; the last stage ships)."""
    for model in models:
        stages = RECIPES[model]
        prev = ""
        for i, stage in enumerate(stages):
            out = f"runs/{model}-stage{i}"
            cmd = [sys.executable, "-m", "duplex", "train", "recall", "--model", model]
            cmd += [*stage.format(prev=prev).split(), "--seq-len", "256"]
            cmd += ["--batch-size", str(batch), "--device", device, "--out", out, "--no-progress"]
            if minutes:
                cmd += ["--max-minutes", str(minutes)]
            prev = f"{out}/{model}.safetensors"
            if ship and i == len(stages) - 1:
                cmd.append("--ship")
            print(" ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)


def proposals(path: str, task: str = "hop2", trials: int = 3) -> str:
    """How often each lookup head proposes a chain's first link at the cue (the key whose
    windows hold the next link), and its mean log-probability when it does: the cold start and
    whether training keeps or loses the right key. 16 cues per 1K-id trial."""
    import numpy as np
    import torch

    from duplex.model import recall_tasks as RT
    from duplex.model.recall_models import load_recall

    model = load_recall(path)
    seen: dict[int, tuple] = {}
    for i, block in enumerate(model.blocks):
        if getattr(block, "lookup", None) is not None:

            def spy(x, emb, i=i, orig=block.propose):
                out = orig(x, emb)
                seen[i] = out
                return out

            block.propose = spy
    heads = [i for i, b in enumerate(model.blocks) if getattr(b, "lookup", None) is not None]
    hits: dict[int, list[float]] = {i: [] for i in heads}
    n = 0
    for k in range(trials):
        s = RT.make_task(task, 1024, np.random.default_rng([9, k]))
        ctx = s.ids[: s.start]
        with torch.no_grad():
            model(torch.from_numpy(s.ids[None]))
        for item in s.items:
            a = int(item[0])
            after = [int(ctx[p + 1]) for p in np.nonzero(ctx[:-1] == s.ids[a - 1])[0]]
            b = next(x for x in after if x < RT.FILL0)
            for i, (ids, lp) in seen.items():
                row = ids[0, a - 1].tolist()
                if b in row:
                    hits[i].append(float(lp[0, a - 1, row.index(b)]))
            n += 1
    parts = [
        f"block {i}: {len(v)}/{n}" + (f" (mean log p {np.mean(v):.2f})" if v else "")
        for i, v in sorted(hits.items())
    ]
    return f"{path} {task}: first link proposed at " + ", ".join(parts)


def cell(model: str, task: str, n: int, timeout: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "duplex",
        "eval",
        "recall",
        "--model",
        model,
        "--task",
        task,
        "--context",
        str(n),
        "--trials",
        str(TRIALS[n]),
        "--asked",
        str(ASKED[n]),
        "--json",
    ]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": model, "task": task, "context": n, "error": f"timeout {timeout:.0f}s"}
    if r.returncode != 0:
        return {"model": model, "task": task, "context": n, "error": r.stderr.strip()[-300:]}
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rep["wall_s"] = time.time() - t0
    rep["command"] = " ".join(["duplex", *cmd[3:]])
    return rep


def table(reports: list[dict]) -> str:
    lines = [
        "| model | task | context | accuracy (items) | state bytes | host B/token "
        "| prefill ids/s | decode ms/id | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(reports, key=lambda r: (r["model"], r["task"], r["context"])):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['task']} | {r['context']} | {r['error']} |||||")
            continue
        lines.append(
            f"| {r['model']} | {r['task']} | {r['context']:,} | {r['accuracy']:.4f} "
            f"({r['correct']}/{r['items']}, {r['trials']} trials) | {r['state_bytes']:,} "
            f"| {r['host_bytes_per_token']:.2f} | {r['prefill_tokens_per_s']:,.0f} "
            f"| {r['decode_ms_per_token']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def pivot(reports: list[dict]) -> str:
    """Accuracy with item counts: one row per model and task, one column per context."""
    ctxs = sorted({r["context"] for r in reports})
    head = "| model | task | " + " | ".join(f"{n // K}K" for n in ctxs) + " |"
    lines = [head, "|---|---|" + "---|" * len(ctxs)]
    for model in GRID:
        for task in TASKS:
            cells = []
            for n in ctxs:
                r = [
                    x for x in reports if (x["model"], x["task"], x["context"]) == (model, task, n)
                ]
                if not r:
                    cells.append("")
                elif "error" in r[0]:
                    cells.append("error")
                else:
                    cells.append(f"{r[0]['accuracy']:.3f} ({r[0]['correct']}/{r[0]['items']})")
            if any(cells):
                lines.append(f"| {model} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(reports: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in reports if "error" not in r]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.5), sharey=True)
    for ax, task in zip(axes, TASKS, strict=True):
        for model in GRID:
            pts = sorted(
                (r["context"], r["accuracy"])
                for r in ok
                if r["model"] == model and r["task"] == task
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context (ids)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "gwa_recall_accuracy.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in GRID:
        pts = sorted(
            (r["context"] // 16, r["accuracy"], r["state_bytes"])
            for r in ok
            if r["model"] == model and r["task"] == "mqar"
        )
        if pts:
            state = f"{pts[0][2] / 1024:.1f} KB state" + (", grows" if "attn" in model else "")
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} ({state})"
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mqar key-value pairs (context = 16 x pairs)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "gwa_recall_mqar_curve.png", dpi=110)
    for key, name, label in (
        ("decode_ms_per_token", "speed", "decode ms per id"),
        ("peak_rss_mb", "memory", "peak RSS (MB)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for model in GRID:
            pts = sorted(
                (r["context"], r[key]) for r in ok if r["model"] == model and r["task"] == "mqar"
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (ids), mqar")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / f"gwa_recall_{name}.png", dpi=110)
    plt.close("all")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="contexts up to 16K only")
    ap.add_argument("--fresh", action="store_true", help="ignore cells already measured")
    ap.add_argument("--models", nargs="*", default=list(GRID))
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--issue-trials", action="store_true", help=">= 20 trials, 10 at 1M")
    ap.add_argument("--train", action="store_true", help="train --models by RECIPES first")
    ap.add_argument("--device", default="auto", help="for --train")
    ap.add_argument("--batch-size", type=int, default=64, help="for --train")
    ap.add_argument("--no-ship", action="store_true", help="--train without --ship")
    ap.add_argument("--stage-minutes", type=float, default=None, help="--train: cap per stage")
    ap.add_argument("--proposals", nargs="*", default=None, help="lookup-head check of models")
    args = ap.parse_args()
    if args.proposals:
        for path in args.proposals:
            print(proposals(path), flush=True)
        return 0
    if args.train:
        train_all(args.models, args.device, args.batch_size, not args.no_ship, args.stage_minutes)
    if args.issue_trials:
        TRIALS.update(ISSUE_TRIALS)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "gwa_recall.json"
    reports = [] if args.fresh or not path.is_file() else json.loads(path.read_text())
    done = {(r["model"], r["task"], r["context"]) for r in reports if "error" not in r}
    for model in args.models:
        for n in GRID[model]:
            if (args.quick and n > 16 * K) or (args.max_context and n > args.max_context):
                continue
            for task in args.tasks:
                if (model, task, n) in done:
                    continue
                rep = cell(model, task, n, args.timeout)
                reports = [
                    r for r in reports if (r["model"], r["task"], r["context"]) != (model, task, n)
                ]
                reports.append(rep)
                path.write_text(json.dumps(reports, indent=1))
                acc = rep.get("accuracy", rep.get("error"))
                print(f"{model:12s} {task:9s} {n:>8d}: {acc}", flush=True)
    text = pivot(reports) + "\n" + table(reports)
    (OUT / "gwa_recall.md").write_text(text)
    plots(reports)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
