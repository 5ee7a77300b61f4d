"""`duplex train recall`: train a recall model on short generated sequences with the shared loop.

Every model sees the same task mixture (`recall_tasks.training_sample`) at the same sequence length,
so the comparison between mixers is like for like. The result is written as safetensors (config
in its metadata); `--ship` writes it where `load_recall(NAME)` finds shipped models.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from duplex.model.backbone import Backbone
from duplex.model.recall_models import MODELS, WEIGHTS_DIR, load_recall, model_config, save_model
from duplex.model.recall_tasks import MIXES, Sample, training_sample


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


def make_batch_fn(T: int, global_batch: int, seed: int, mix: str = "v1", steps: int = 1):
    """make_batch(step, rows) for the shared loop: row r of step s is a pure function of (s, r)
    (and of `steps`, which sets how far a curriculum has come at step s)."""

    def make_batch(step: int, rows: slice) -> RecallBatch:
        samples = []
        for r in range(*rows.indices(global_batch)):
            rng = np.random.default_rng([seed, step, r])
            samples.append(training_sample(T, rng, mix, progress=step / max(1, steps)))
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
    b_idx = torch.arange(batch.ids.shape[0], device=batch.ids.device)[:, None].expand_as(
        batch.where
    )[valid]
    # h: [n_answers, d] the outputs one position before each answer
    h = hidden[b_idx, batch.where[valid] - 1]
    logits = net.logits(h)
    tgt = batch.targets[valid]
    loss = F.cross_entropy(logits, tgt)
    acc = (logits.argmax(-1) == tgt).float().mean()
    return loss, {"acc": float(acc), "tokens": float(batch.ids.numel())}


def warm_start(model: Backbone, source: Backbone) -> list[str]:
    """Copy into `model` every tensor of `source` with the same name and shape, then give every
    GWA block that got nothing a copy of `source`'s first GWA block; returns the names set.

    recall-gwa's blocks are the first four of recall-gwa-lookup's, so the deeper model starts
    with a working 1-hop read, and its next layer's lookup head (W_l = I: "the ids my state
    looks like") starts by proposing what that read found: the cold start of predicted lookups.
    The later reads start as copies of the trained one, so they already know how to copy the id
    after an anchor into the output; what they must learn is to trust the looked-up windows.
    """
    own = model.state_dict()
    theirs = source.state_dict()
    new = {n: t for n, t in theirs.items() if n in own and own[n].shape == t.shape}
    kinds = source.cfg.layers
    if "gwa" in kinds:
        first = f"blocks.{kinds.index('gwa')}."
        donor = {n[len(first) :]: t for n, t in theirs.items() if n.startswith(first)}
        for i, kind in enumerate(model.cfg.layers):
            prefix = f"blocks.{i}."
            if kind != "gwa" or any(n.startswith(prefix) for n in new):
                continue
            for local, t in donor.items():
                name = prefix + local
                if name in own and own[name].shape == t.shape:
                    new[name] = t
    model.load_state_dict({**own, **new})
    return sorted(new)


HELP = "train a recall model (recall-gwa, recall-gdr, recall-swa, recall-attn)"
DESCRIPTION = """Train a recall model on generated short sequences (mqar, passkey, niah, copy,
position mixed), loss on the answer ids only, with the shared training loop (AdamW, warm-up +
cosine, clipping, checkpoints in --out, resumable, loss curves JSON + PNG, torchrun-ready).

Mixtures (--mix): v1 (mqar, passkey, niah, copy, position), suite (every task, hop2, hop3, alias
and update included, with misleading short matches), mqar-curriculum (mqar alone, vocabulary and
pairs growing: how the fixed-state baselines get off the 7.09 plateau; continue on suite with
--init).

Example (what the shipped recall-gwa came from):
  duplex train recall --model recall-gwa --steps 2000 --seq-len 256 --batch-size 16 \\
      --max-minutes 25 --out runs/recall-gwa --ship"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="recall-gwa", choices=MODELS)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length (<= 2K)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default="v1", choices=MIXES, help="training task mixture")
    p.add_argument("--init", default=None, help="start from these weights (name or path)")
    p.add_argument(
        "--warm",
        default=None,
        help="copy the tensors of this model (name or path) whose names and shapes match",
    )
    p.add_argument(
        "--freeze-warm",
        action="store_true",
        help="with --warm: keep the tensors copied under their own names fixed (the blocks the "
        "source shares and the embedding), so the state the lookup heads read stays as trained",
    )
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda")
    p.add_argument("--out", default=None, help="run directory (default runs/NAME)")
    p.add_argument("--ship", action="store_true", help=f"write {WEIGHTS_DIR}/NAME.safetensors")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from duplex.train.loop import TrainConfig, seed_everything, train

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model = load_recall(args.init).train() if args.init else Backbone(model_config(args.model))
    if args.warm:
        source = load_recall(args.warm)
        copied = warm_start(model, source)
        print(f"warm start from {args.warm}: {len(copied)} tensors copied")
        if args.freeze_warm:
            same = set(source.state_dict())
            for name, p in model.named_parameters():
                if name in same:
                    p.requires_grad_(False)
    out = Path(args.out or f"runs/{args.model}")
    cfg = TrainConfig(
        out_dir=str(out),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.01,
        warmup_steps=args.warmup,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        seed=args.seed,
        log_every=20,
        ckpt_every=100,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        device=args.device,
    )
    batches = make_batch_fn(args.seq_len, args.batch_size, args.seed, args.mix, args.steps)
    res = train(model, batches, recall_loss, cfg)
    model.cpu().eval()
    save_model(model, out / f"{args.model}.safetensors", args.model)
    if args.ship:
        save_model(model, WEIGHTS_DIR / f"{args.model}.safetensors", args.model)
    last = res.history[-1] if res.history else {}
    print(
        f"{args.model}: {res.steps_done} steps ({res.stopped_by}), loss {res.final_loss:.4f}, "
        f"answer accuracy {last.get('acc', float('nan')):.3f}; weights in {out}"
    )
    return 0
