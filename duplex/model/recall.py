"""`duplex eval recall`: run a recall model on a generated task and report accuracy, state and
host bytes, speed and memory.

Evaluation prefills the context with the streaming form in large chunks (each chunk runs in the
parallel form), then decodes the query section one id per step, feeding the model its own answers.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from duplex.model.backbone import Backbone
from duplex.model.recall_models import MODELS, WEIGHTS_DIR, load_recall
from duplex.model.recall_tasks import TASKS, Sample, make_task

# `duplex.model.load` finds the recall models through this module.
__all__ = ["MODELS", "WEIGHTS_DIR", "EvalReport", "evaluate", "load_recall"]


@dataclass
class TrialResult:
    items: int
    correct: int
    tokens_right: int
    tokens_total: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    prefill_tokens: int


@dataclass
class EvalReport:
    model: str
    task: str
    context: int
    trials: int
    items: int
    correct: int
    accuracy: float
    token_accuracy: float
    state_bytes: int
    host_bytes_per_token: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    peak_rss_mb: float
    seed: int
    notes: list[str] = field(default_factory=list)


def run_trial(model: Backbone, sample: Sample, chunk: int) -> tuple[TrialResult, int]:
    """Prefill the context, decode the query section one id per step with the model's own answers;
    returns the result and the host bytes held by the reader at the end."""
    ids = sample.ids.copy()
    answers = {int(i) for item in sample.items for i in item}
    pred: dict[int, int] = {}
    with torch.no_grad(), model.streaming(1):
        if model.reader is not None:
            model.reader.set_offsets([sample.offset])
        t0 = time.perf_counter()
        last = None
        for s in range(0, sample.start, chunk):
            e = min(sample.start, s + chunk)
            last = model.step(torch.from_numpy(ids[None, s:e]))[:, -1]
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(sample.start, ids.size):
            if i in answers:
                p = int(model.logits(last).argmax(-1))
                pred[i] = p
                ids[i] = p
            last = model.step(torch.from_numpy(ids[None, i : i + 1]))[:, -1]
        decode = time.perf_counter() - t0
        host = model.reader.host_bytes() if model.reader is not None else 0
    correct = sum(all(pred[int(i)] == sample.ids[i] for i in item) for item in sample.items)
    right = sum(pred[i] == sample.ids[i] for i in answers)
    res = TrialResult(
        len(sample.items),
        correct,
        right,
        len(answers),
        prefill,
        decode,
        ids.size - sample.start,
        sample.start,
    )
    return res, host


def evaluate(
    model_name: str,
    task: str,
    context: int,
    trials: int,
    seed: int = 0,
    chunk: int = 8192,
    asked: int = 1,
) -> EvalReport:
    """Run `trials` generated trials of `task` at `context` ids and summarise."""
    torch.manual_seed(seed)
    model = load_recall(model_name)
    results, hosts = [], []
    for k in range(trials):
        rng = np.random.default_rng([seed, context, k, TASKS.index(task)])
        offset = 0
        sample = make_task(task, context, rng, offset=offset, asked=asked)
        r, host = run_trial(model, sample, chunk)
        results.append(r)
        hosts.append(host / sample.ids.size)
    items = sum(r.items for r in results)
    correct = sum(r.correct for r in results)
    state = model.state_bytes()
    notes = []
    if "attn" in model.cfg.layers:
        notes.append("full attention: state_bytes is the KV cache of one token; it grows with N")
        H, D = model.cfg.attn_heads, model.cfg.attn_head_dim
        state = 2 * H * D * 4 * model.cfg.layers.count("attn") * context
    return EvalReport(
        model=model_name,
        task=task,
        context=context,
        trials=trials,
        items=items,
        correct=correct,
        accuracy=correct / max(1, items),
        token_accuracy=sum(r.tokens_right for r in results)
        / max(1, sum(r.tokens_total for r in results)),
        state_bytes=state,
        host_bytes_per_token=float(np.mean(hosts)),
        prefill_tokens_per_s=_prefill_rate(results),
        decode_ms_per_token=1000
        * sum(r.decode_s for r in results)
        / max(1, sum(r.decode_tokens for r in results)),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        seed=seed,
        notes=notes,
    )


def _prefill_rate(results: list[TrialResult]) -> float:
    t = sum(r.prefill_s for r in results)
    return 0.0 if t == 0 else sum(r.prefill_tokens for r in results) / t


# Command line: duplex eval recall

HELP = "recall suite: accuracy, state and host bytes, speed and memory of a recall model"
DESCRIPTION = """Generate a recall task at a context length, run a model on it, report the numbers.

The context is prefilled with the streaming form in chunks of --chunk ids (each chunk runs in
the parallel form), then the query section is decoded one id per step, the model's own answers fed
back. Reported: accuracy over scored items (with the trial and item counts), per-id accuracy,
model state bytes (fixed state of one stream; full attention: its KV cache at N), host bytes per
token (id log + n-gram index, GWA only), prefill ids/s, decode ms per id, peak RSS of the process.

Tasks: mqar (pairs = min(65536, N/16), keys of 2 ids past 4096 pairs, 1024 queries), passkey,
niah (4-id keys, 8-id values; --asked needles per trial), copy (1000 ids from >= 100K back, N/8
and N/2 when N is short), position (hex digits of an item's absolute index; --asked per trial),
hop2 and hop3 (chains of 1-id facts stored apart: "HOP2 a" -> the value two facts on), alias
("QUERY x" where x was declared another name of a key), update (keys assigned 2-3 times: the
newest value wins).

Models: the shipped ones in duplex/model/weights (recall-gwa, recall-gdr, recall-gwa-lookup, ...)
by name, or a .safetensors path (`duplex train recall` writes one).

Example: duplex eval recall --model recall-gwa --task mqar --context 1048576 --trials 1 --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="recall-gwa", help="model name or .safetensors path")
    p.add_argument("--task", default="mqar", choices=TASKS)
    p.add_argument("--context", type=int, default=1024, help="context length in ids")
    p.add_argument("--trials", type=int, default=10, help="independent generated sequences")
    p.add_argument("--asked", type=int, default=1, help="niah/position: items asked per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (ids per step call)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    rep = evaluate(
        args.model, args.task, args.context, args.trials, args.seed, args.chunk, asked=args.asked
    )
    if args.json:
        print(json.dumps(asdict(rep)))
        return 0
    print(
        f"{rep.model} {rep.task} N={rep.context}: accuracy {rep.accuracy:.4f} "
        f"({rep.correct}/{rep.items} items, {rep.trials} trials), token accuracy "
        f"{rep.token_accuracy:.4f}\n"
        f"  state {rep.state_bytes} B, host {rep.host_bytes_per_token:.2f} B/token, "
        f"prefill {rep.prefill_tokens_per_s:.0f} ids/s, decode {rep.decode_ms_per_token:.2f} "
        f"ms/id, peak RSS {rep.peak_rss_mb:.0f} MB"
    )
    for n in rep.notes:
        print(f"  note: {n}")
    return 0
