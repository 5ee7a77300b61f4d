"""Per-frame cost of the model side of one session: backbone step, depth draws, text sampling.

Issue 12's "one session, one core" target is bound by per-op overhead at batch 1 (a 6.5M
parameter model does a few hundred kFLOP per op), so this script reports, per frame of the
shipped `default` model on one torch thread:

- ops/step: aten ops the profiler records per step (nested ones included), split into the
  backbone step (`DuplexLM.step`), the depth model (`sample_audio` less its draws) and the
  draws (`sample` of the 8 audio codebooks and the text);
- ms/step: CPU time (`time.thread_time`) per step of each part, the median of --rounds rounds.

With --against REF the same measurement runs on the code of git revision REF (extracted to a
temporary folder), rounds interleaved with the working tree's (ref, new, ref, new, ...), each
round a fresh process run one after the other, so a loaded machine drifts over both alike; the
ratio new / ref is then measured in one run. Both feed the model its own draws from the same
seeds, so the sampled codes and text must be identical: the script checks it.

    .venv/bin/python benchmarks/model_step.py --against a130e33

Writes benchmarks/results/model_step.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
PARTS = ("model", "depth", "draw")


def worker(steps: int, prof_steps: int, warm: int) -> dict:
    """Run in the process whose `duplex` is under test; returns its figures."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from duplex.model import load as load_model
    from duplex.streamer.sampling import sample

    torch.set_num_threads(1)
    m = load_model("default").eval()
    K, card = m.cfg.num_codebooks, m.cfg.codebook_size
    Vt = m.cfg.text_vocab
    g = torch.Generator().manual_seed(0)
    acc = dict.fromkeys(PARTS, 0.0)
    digest, hidden = hashlib.sha256(), hashlib.sha256()
    state = {"audio": torch.full((1, K), card), "text": torch.zeros(1, dtype=torch.long)}
    at_, ak = torch.tensor([0.8]), torch.tensor([50])
    tt, tk = torch.tensor([0.7]), torch.tensor([25])

    def one(timed: bool) -> None:
        ua = torch.randint(0, card, (1, K), generator=g)
        c0 = time.thread_time()
        with record_function("part:model"):
            lg = m.step(ua, state["audio"], state["text"], torch.zeros(1, dtype=torch.long))
        c1 = time.thread_time()
        spent = [0.0]

        def draw(k: int, logits: torch.Tensor) -> torch.Tensor:
            u = torch.rand(1, card, generator=g)
            d0 = time.thread_time()
            with record_function("part:draw"):
                out = sample(logits, at_, ak, u)
            spent[0] += time.thread_time() - d0
            return out

        with record_function("part:depth"):
            codes = m.sample_audio(lg.hidden, draw)
        c2 = time.thread_time()
        u = torch.rand(1, Vt, generator=g)
        with record_function("part:draw"):
            text = sample(lg.text, tt, tk, u)
        c3 = time.thread_time()
        if timed:
            acc["model"] += c1 - c0
            acc["depth"] += c2 - c1 - spent[0]
            acc["draw"] += spent[0] + c3 - c2
        digest.update(codes.numpy().tobytes() + text.numpy().tobytes())
        hidden.update(lg.hidden.numpy().tobytes())
        state["audio"], state["text"] = codes, text

    with torch.inference_mode(), m.streaming(1):
        for _ in range(warm):
            one(False)
        for _ in range(steps):
            one(True)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(prof_steps):
                one(False)
    ops = dict.fromkeys(PARTS, 0)
    for e in p.events():
        if not e.name.startswith("aten::"):
            continue
        up = e.cpu_parent
        while up is not None and not up.name.startswith("part:"):
            up = up.cpu_parent
        if up is not None:
            ops[up.name[5:]] += 1
    return {
        "ms": {k: 1000 * v / steps for k, v in acc.items()},
        "ops": {k: v / prof_steps for k, v in ops.items()},
        "digest": digest.hexdigest(),
        "hidden": hidden.hexdigest(),
    }


def run_worker(root: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    cmd += ["--steps", str(args.steps), "--prof-steps", str(args.prof_steps)]
    cmd += ["--warm", str(args.warm)]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default=None, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--prof-steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT / "model_step.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.prof_steps, args.warm)))
        return
    variants = {"new": ROOT}
    tmp = None
    if args.against:
        tmp = tempfile.TemporaryDirectory()
        arch = subprocess.run(
            ["git", "archive", args.against, "duplex"], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp.name], input=arch.stdout, check=True)
        variants = {"ref": Path(tmp.name), "new": ROOT}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for name, root in variants.items():
            runs[name].append(run_worker(root, args))
            got = runs[name][-1]["ms"]
            print(f"round {r} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in got.items()))
    result: dict = {"steps": args.steps, "rounds": args.rounds, "against": args.against}
    for name, rs in runs.items():
        ms = {k: statistics.median(x["ms"][k] for x in rs) for k in PARTS}
        ms["total"] = statistics.median(sum(x["ms"].values()) for x in rs)
        ops = dict(rs[0]["ops"])
        ops["total"] = sum(ops.values())
        result[name] = {"ms": ms, "ops": ops, "digest": rs[0]["digest"], "hidden": rs[0]["hidden"]}
    print(f"\n{'':6}" + "".join(f"{p:>16}" for p in (*PARTS, "total")))
    for name in runs:
        row = result[name]
        cells = [f"{row['ops'][p]:7.0f} {row['ms'][p]:6.2f}ms" for p in (*PARTS, "total")]
        print(f"{name:6}" + "".join(f"{c:>16}" for c in cells))
    if "ref" in result:
        ratio = {p: result["new"]["ms"][p] / result["ref"]["ms"][p] for p in (*PARTS, "total")}
        ops_ratio = {p: result["new"]["ops"][p] / result["ref"]["ops"][p] for p in ratio}
        result["ratio_ms"], result["ratio_ops"] = ratio, ops_ratio
        print(f"{'ratio':6}" + "".join(f"{ops_ratio[p]:7.2f} {ratio[p]:8.2f}" for p in ratio))
        same = result["new"]["digest"] == result["ref"]["digest"]
        bits = result["new"]["hidden"] == result["ref"]["hidden"]
        result["same_draws"], result["same_hidden_bits"] = same, bits
        print(f"same draws as {args.against}: {same}; bit-identical hidden states: {bits}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
