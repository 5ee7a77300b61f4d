"""Recall tasks, the small recall models, and `duplex eval recall` / `duplex train recall`.

Everything is generated here from a seed, at any context length, with one vocabulary of 8192 ids:

    0-15     control: PAD BOS SEP QUERY PASSKEY COPY POS
    16-31    digits 0..15
    32-47    digit-place markers P0..P15 (which digit of a position is asked)
    64-4159  key ids (4096)     4160-6207  value ids (2048)     6208-8191  filler ids (1984)

Tasks (each returns the ids and which of them are answers, grouped into items scored exactly):
- mqar: P key-value pairs spread through filler, then queries "key value" (keys of 2 ids when P
  exceeds the 4096 one-id keys); queried pairs half uniform, half at power-law distances.
- passkey: "PASSKEY d d d d d" at a random depth in filler; "QUERY PASSKEY" -> the 5 digits.
- niah: a haystack of (4-id key, 8-id value) pairs; "QUERY key" -> the 8-id value.
- copy: random ids; "COPY" + the first 8 ids of a span of 1000 (N/8 when shorter) that starts at
  least 100K (N/2 when shorter) ids back -> the rest of the span, fed back one id at a time.
- position: 4-id items in filler; "P_j key" -> hex digit j of the absolute index of the item's last
  id, for j = 0..5 (an item is right when all 6 digits are).

Evaluation prefills the context with the streaming form in large chunks (each chunk runs in the
parallel form), then decodes the query section one id per step, feeding the model its own answers.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from duplex.model.backbone import Backbone, BackboneConfig
from duplex.model.gwa import GWAReadConfig

VOCAB = 8192
PAD, BOS, SEP, QUERY, PASSKEY, COPY, POS = 0, 1, 2, 3, 4, 5, 6
DIGIT0 = 16
PLACE0 = 32
KEY0, N_KEY = 64, 4096
VAL0, N_VAL = KEY0 + N_KEY, 2048
FILL0 = VAL0 + N_VAL
N_FILL = VOCAB - FILL0
CONTENT0 = KEY0
POS_DIGITS, POS_BASE = 6, 16
TASKS = ("mqar", "passkey", "niah", "copy", "position")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass
class Sample:
    """ids [N]; answer index arrays grouped per scored item (each index i: ids[i] is predicted
    from the output at i - 1); `start`: first id of the query section (prefill covers ids before
    it); `offset`: absolute position of ids[0]."""

    ids: np.ndarray
    items: list[np.ndarray]
    start: int
    offset: int = 0


def _filler(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(FILL0, VOCAB, size=n)


def _distinct(rng: np.random.Generator, n: int, space: int) -> np.ndarray:
    """n distinct integers in [0, space)."""
    if n > space:
        raise ValueError(f"cannot draw {n} distinct values from {space}")
    out = np.unique(rng.integers(0, space, size=n))
    while out.size < n:
        out = np.unique(np.concatenate([out, rng.integers(0, space, size=n - out.size)]))
    return rng.permutation(out)[:n]


def _place(rng: np.random.Generator, ctx: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """Write blocks at random non-overlapping places of ctx, in order; returns their starts."""
    n, total = ctx.size, sum(b.size for b in blocks)
    if total > n:
        raise ValueError(f"{total} ids of items do not fit in a context of {n}")
    gaps = rng.multinomial(n - total, np.ones(len(blocks) + 1) / (len(blocks) + 1))
    starts = np.empty(len(blocks), dtype=np.int64)
    pos = 0
    for i, b in enumerate(blocks):
        pos += gaps[i]
        starts[i] = pos
        ctx[pos : pos + b.size] = b
        pos += b.size
    return starts


def _place_fast(rng: np.random.Generator, ctx: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Like `_place` for P equal-length items [P, L] (vectorised for 64K pairs at 1M)."""
    P, L = items.shape
    free = ctx.size - P * L
    if free < 0:
        raise ValueError(f"{P * L} ids of items do not fit in a context of {ctx.size}")
    cuts = np.sort(rng.integers(0, free + 1, size=P))
    starts = cuts + np.arange(P) * L
    idx = starts[:, None] + np.arange(L)[None]
    ctx[idx] = items
    return starts


def mqar(
    N: int,
    rng: np.random.Generator,
    pairs: int | None = None,
    queries: int | None = None,
    key_len: int | None = None,
    key_pool: int | None = None,
) -> Sample:
    """Multi-query associative recall (see module docstring). `key_pool` (training only) draws
    each id of a 2-id key from a small pool so that keys share ids and only the pair identifies."""
    P = pairs if pairs is not None else max(4, min(65536, N // 16))
    kl = key_len if key_len is not None else (1 if P <= N_KEY else 2)
    Q = min(P, queries if queries is not None else 1024)
    C = N - Q * (kl + 1)
    if kl == 1:
        keys = KEY0 + _distinct(rng, P, N_KEY)[:, None]
    else:
        pool = key_pool or N_KEY
        a = rng.choice(N_KEY, size=pool, replace=False) if pool < N_KEY else np.arange(N_KEY)
        b = rng.choice(N_KEY, size=pool, replace=False) if pool < N_KEY else np.arange(N_KEY)
        flat = _distinct(rng, P, pool * pool)
        keys = KEY0 + np.stack([a[flat // pool], b[flat % pool]], axis=1)
    vals = VAL0 + rng.integers(0, N_VAL, size=(P, 1))
    ctx = _filler(rng, C)
    _place_fast(rng, ctx, np.concatenate([keys, vals], axis=1))
    # Queries: half uniform over pairs, half at power-law distance (rank from the newest pair).
    n_pow = Q // 2
    rank = np.floor(np.exp(rng.uniform(0, math.log(P), size=n_pow))).astype(np.int64)
    chosen = np.unique(np.concatenate([P - np.clip(rank, 1, P), rng.integers(0, P, size=Q)]))
    chosen = rng.permutation(chosen)[:Q]
    if chosen.size < Q:
        rest = np.setdiff1d(np.arange(P), chosen)
        chosen = np.concatenate([chosen, rng.permutation(rest)[: Q - chosen.size]])
    chosen = rng.permutation(chosen)
    qs = np.concatenate([keys[chosen], vals[chosen]], axis=1).reshape(-1)
    ids = np.concatenate([ctx, qs])
    ans = C + np.arange(Q) * (kl + 1) + kl
    return Sample(ids, [np.array([a]) for a in ans], C)


def passkey(N: int, rng: np.random.Generator) -> Sample:
    """A 5-digit number at a random depth in filler, asked at the end."""
    key = DIGIT0 + rng.integers(0, 10, size=5)
    C = N - 7
    ctx = _filler(rng, C)
    _place(rng, ctx, [np.concatenate([[PASSKEY], key])])
    ids = np.concatenate([ctx, [QUERY, PASSKEY], key])
    return Sample(ids, [C + 2 + np.arange(5)], C)


def niah(N: int, rng: np.random.Generator, asked: int = 1) -> Sample:
    """Haystack of (4-id key, 8-id value) pairs; `asked` of them queried at the end."""
    per = 12
    C = N - asked * (1 + per)
    P = C // per
    keys = KEY0 + rng.integers(0, N_KEY, size=(P, 4))
    vals = VAL0 + rng.integers(0, N_VAL, size=(P, 8))
    ctx = _filler(rng, C)
    _place_fast(rng, ctx, np.concatenate([keys, vals], axis=1))
    which = rng.choice(P, size=asked, replace=False)
    parts, items = [ctx], []
    pos = C
    for w in which:
        parts.append(np.concatenate([[QUERY], keys[w], vals[w]]))
        items.append(pos + 5 + np.arange(8))
        pos += 1 + per
    return Sample(np.concatenate(parts), items, C)


def copy_task(
    N: int, rng: np.random.Generator, span: int | None = None, min_back: int | None = None
) -> Sample:
    """Reproduce a span of random ids first seen far back, given its first 8 ids."""
    L = span if span is not None else min(1000, N // 8)
    back = min_back if min_back is not None else min(100_000, N // 2)
    prompt = 8
    C = N - 1 - L
    ctx = rng.integers(CONTENT0, VOCAB, size=C)
    latest = C - back
    if latest < 0:
        raise ValueError(f"context {N} too short for a copy from {back} back")
    s = int(rng.integers(0, latest + 1))
    src = ctx[s : s + L].copy()
    ids = np.concatenate([ctx, [COPY], src])
    return Sample(ids, [C + 1 + np.arange(prompt, L)], C)


def position(
    N: int, rng: np.random.Generator, asked: int = 1, offset: int = 0, items: int | None = None
) -> Sample:
    """4-id items in filler; each asked item gets 6 queries "P_j k1 k2 k3 k4 d_j"."""
    per_q = 6
    C = N - asked * POS_DIGITS * per_q
    n_items = items if items is not None else max(asked, C // 64)
    keys = KEY0 + rng.integers(0, N_KEY, size=(n_items, 4))
    ctx = _filler(rng, C)
    starts = _place_fast(rng, ctx, keys)
    which = rng.choice(n_items, size=asked, replace=False)
    parts, out = [ctx], []
    pos = C
    for w in which:
        where = offset + int(starts[w]) + 3
        digits = [(where // POS_BASE**j) % POS_BASE for j in range(POS_DIGITS)]
        idx = []
        for j in rng.permutation(POS_DIGITS):
            parts.append(np.concatenate([[PLACE0 + j], keys[w], [DIGIT0 + digits[j]]]))
            idx.append(pos + 5)
            pos += per_q
        out.append(np.array(idx))
    return Sample(np.concatenate(parts), out, C, offset)


def make_task(
    task: str, N: int, rng: np.random.Generator, offset: int = 0, asked: int = 1
) -> Sample:
    """The evaluation form of each task at context length N."""
    if task == "mqar":
        return mqar(N, rng)
    if task == "passkey":
        return passkey(N, rng)
    if task == "niah":
        return niah(N, rng, asked=asked)
    if task == "copy":
        return copy_task(N, rng)
    if task == "position":
        return position(N, rng, asked=asked, offset=offset)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def training_sample(T: int, rng: np.random.Generator) -> Sample:
    """One short training sequence: a task drawn from a fixed mixture, sizes drawn at random.

    Keys sharing ids (mqar `key_pool`) teach the read to trust the longest match, and random
    absolute offsets teach every digit of the position features, so 1M-token positions are not
    new to the model.
    """
    offset = int(rng.integers(0, POS_BASE**POS_DIGITS - T))
    u = rng.random()
    if u < 0.3:
        kl = int(rng.integers(1, 3))
        P = int(rng.integers(8, 49))
        pool = int(rng.integers(math.isqrt(P) + 2, 16)) if kl == 2 else None
        s = mqar(T, rng, pairs=P, queries=min(P, 32), key_len=kl, key_pool=pool)
    elif u < 0.35:
        s = passkey(T, rng)
    elif u < 0.5:
        s = niah(T, rng, asked=2)
    elif u < 0.7:
        s = copy_task(T, rng, span=48, min_back=T // 4)
    else:
        s = position(T, rng, asked=2, offset=offset, items=int(rng.integers(4, 24)))
    s.offset = offset
    return s


# ---------------------------------------------------------------------------------------------
# Models


def model_config(name: str) -> BackboneConfig:
    """The recall models: same width and depth, different mixers."""
    read = GWAReadConfig(orders=(4, 2, 1), per_order=2, max_walk=32, win_before=4, win_after=4)
    layers = {
        "recall-gwa": ("gdn", "mlp", "gwa", "mlp"),
        "recall-gdr": ("gdn", "mlp", "gdn", "mlp"),
        "recall-swa": ("swa", "mlp", "swa", "mlp"),
        "recall-attn": ("attn", "mlp", "attn", "mlp"),
    }
    if name not in layers:
        raise ValueError(f"unknown recall model {name!r}; choose from {sorted(layers)}")
    return BackboneConfig(
        vocab_size=VOCAB,
        d_model=64,
        layers=layers[name],
        gdn_heads=2,
        gdn_head_dim=32,
        gwa_heads=2,
        gwa_head_dim=32,
        attn_heads=2,
        attn_head_dim=32,
        swa_window=64,
        read=read,
    )


MODELS = ("recall-gwa", "recall-gdr", "recall-swa", "recall-attn")


def _config_to_json(cfg: BackboneConfig) -> str:
    return json.dumps(asdict(cfg))


def _config_from_json(text: str) -> BackboneConfig:
    d = json.loads(text)
    d["layers"] = tuple(d["layers"])
    d["read"] = GWAReadConfig(**{**d["read"], "orders": tuple(d["read"]["orders"])})
    return BackboneConfig(**d)


def save_model(model: Backbone, path: str | Path, name: str) -> None:
    """Weights as safetensors, config and name in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": _config_to_json(model.cfg), "name": name}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_recall(name_or_path: str) -> Backbone:
    """A shipped recall model by name (duplex/model/weights/NAME.safetensors) or a file path."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(name_or_path)
    if not path.is_file():
        path = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no recall model {name_or_path!r}: not a file and not shipped in {WEIGHTS_DIR} "
            f"(train one: duplex train recall --model {name_or_path})"
        )
    with safe_open(str(path), "pt") as f:
        cfg = _config_from_json(f.metadata()["config"])
    model = Backbone(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class RecallBatch:
    """ids [B, T]; targets [B, A] answer ids and where [B, A] their positions (-1: padding);
    offsets [B] absolute position of each row's first id."""

    ids: torch.Tensor
    where: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor

    def to(self, device: torch.device) -> RecallBatch:
        return RecallBatch(
            *(t.to(device) for t in (self.ids, self.where, self.targets, self.offsets))
        )


def make_batch_fn(T: int, global_batch: int, seed: int):
    """make_batch(step, rows) for the shared loop: row r of step s is a pure function of (s, r)."""

    def make_batch(step: int, rows: slice) -> RecallBatch:
        samples = []
        for r in range(*rows.indices(global_batch)):
            rng = np.random.default_rng([seed, step, r])
            samples.append(training_sample(T, rng))
        return collate(samples)

    return make_batch


def collate(samples: list[Sample]) -> RecallBatch:
    """Samples of one length as a batch; answer positions padded with -1 to the longest."""
    A = max(sum(i.size for i in s.items) for s in samples)
    where = np.full((len(samples), A), -1, dtype=np.int64)
    tg = np.zeros((len(samples), A), dtype=np.int64)
    for b, s in enumerate(samples):
        idx = np.concatenate(s.items)
        where[b, : idx.size] = idx
        tg[b, : idx.size] = s.ids[idx]
    return RecallBatch(
        torch.from_numpy(np.stack([s.ids for s in samples])),
        torch.from_numpy(where),
        torch.from_numpy(tg),
        torch.tensor([s.offset for s in samples]),
    )


def recall_loss(model: torch.nn.Module, batch: RecallBatch) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the answer ids only (the rest of the sequence is unpredictable filler)."""
    net = model.module if hasattr(model, "module") else model
    hidden = model(batch.ids, batch.offsets)
    valid = batch.where >= 0
    b_idx = torch.arange(batch.ids.shape[0])[:, None].expand_as(batch.where)[valid]
    # h: [n_answers, d] the outputs one position before each answer
    h = hidden[b_idx, batch.where[valid] - 1]
    logits = net.logits(h)
    tgt = batch.targets[valid]
    loss = F.cross_entropy(logits, tgt)
    acc = (logits.argmax(-1) == tgt).float().mean()
    return loss, {"acc": float(acc), "tokens": float(batch.ids.numel())}


# ---------------------------------------------------------------------------------------------
# Evaluation


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


# ---------------------------------------------------------------------------------------------
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
and N/2 when N is short), position (hex digits of an item's absolute index; --asked per trial).

Models: the shipped ones in duplex/model/weights (recall-gwa, recall-gdr, ...) by name, or a
.safetensors path (`duplex train recall` writes one).

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
