"""One training loop for every model: AdamW, warm-up + cosine decay, clipping, checkpoints,
progress, loss curves, and DistributedDataParallel under torchrun with no code change.

The caller supplies two functions:

- `make_batch(step, rows) -> batch`: rows `rows` (a slice) of the *global* batch of that step.
  It must be a pure function of (step, rows) (seed a generator from the step), so that a run is
  deterministic, resumes exactly, and gives the same global batch on any number of processes.
- `loss_fn(model, batch) -> (loss, metrics)`: the mean loss over the batch rows, and a dict of
  floats for logging; a "tokens" entry, when present, feeds the tokens/s figure.

Each process of a torchrun job takes an equal share of the rows, so averaging gradients across
processes equals the single-process gradient of the global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

Batch = Any
MakeBatch = Callable[[int, slice], Batch]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one run. `batch_size` is global (all processes)."""

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    max_minutes: float | None = None
    resume: bool = True
    progress: bool = True
    device: str = "auto"
    # "bf16": forward and loss under bfloat16 autocast (weights, gradients and the optimiser
    # stay float32). Worth it on GPUs with bf16 units; on CPUs it is usually slower.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float
    stopped_by: str
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed every generator a model might draw from at construction."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (dim >= 2); never biases, norm gains or other vectors."""
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {
            f.name: _to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)
        }
        return dataclasses.replace(batch, **moved)
    return batch


class _Dist:
    """Process-group facts; a single process is world size 1 with no group."""

    def __init__(self, device_pref: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if use_cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu" if device_pref == "auto" else device_pref)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def _save_atomic(obj: Any, path: Path) -> None:
    """Write then rename, so a killed run never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_curves(history: list[dict[str, float]], out_dir: Path) -> None:
    """Loss curves as JSON (every logged step) and PNG (one panel per metric)."""
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("step", "lr", "tokens_per_s", "tokens")]
    fig, axes = plt.subplots(
        1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False
    )
    steps = [h["step"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [h.get(k, float("nan")) for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
        if k.startswith("loss") and all(h.get(k, 1.0) > 0 for h in history):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=90)
    plt.close(fig)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train(
    model: nn.Module,
    make_batch: MakeBatch,
    loss_fn: LossFn,
    cfg: TrainConfig,
    on_checkpoint: Callable[[nn.Module, int], None] | None = None,
) -> TrainResult:
    """Train `model` in place for cfg.steps steps (or until cfg.max_minutes) and return a summary.

    Writes to cfg.out_dir (main process only): `checkpoint.pt` (model, optimiser, step, history),
    `history.json`, `loss.png` and `config.json`. `on_checkpoint(model, step)` runs on the main
    process after each checkpoint (an evaluation of the weights just saved); the model is back
    in training mode after it. With cfg.resume and a checkpoint present, the
    run continues from it and ends exactly where an uninterrupted run would.
    """
    ctx = _Dist(cfg.device)
    if cfg.batch_size % ctx.world != 0:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by the {ctx.world} processes"
        )
    per_rank = cfg.batch_size // ctx.world
    rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    out_dir = Path(cfg.out_dir)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    model.to(ctx.device)
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        # The fused/foreach kernels reorder sums differently on some devices; keep one path.
        foreach=False,
    )
    start, history = 0, []
    ckpt_path = out_dir / CHECKPOINT
    if cfg.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=ctx.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, history = int(ckpt["step"]), list(ckpt["history"])
    net: nn.Module = model
    if ctx.world > 1:
        ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def checkpoint(step: int) -> None:
        if ctx.main:
            state = {
                "model": _unwrap(net).state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "history": history,
                "config": asdict(cfg),
            }
            _save_atomic(state, ckpt_path)
            save_curves(history, out_dir)
            if on_checkpoint is not None:
                inner = _unwrap(net)
                inner.eval()
                on_checkpoint(inner, step)
                inner.train()

    bar = None
    if ctx.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.monotonic()
    t_log, tokens_since, loss_sum, n_since = time.monotonic(), 0.0, 0.0, 0
    stopped_by = "steps"
    step = start
    last_loss = float("nan")
    net.train()
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            # Per-step seed: dropout and other in-model randomness replay exactly on resume.
            torch.manual_seed(cfg.seed * 1_000_003 + step * 7919 + ctx.rank)
            batch = _to_device(make_batch(step, rows), ctx.device)
            with torch.autocast(
                ctx.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
            ):
                loss, metrics = loss_fn(net, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                gnorm = float(nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
            else:
                gnorm = float("nan")
            opt.step()
            step += 1
            loss_sum += float(loss.detach())
            n_since += 1
            tokens_since += float(metrics.get("tokens", 0.0)) * ctx.world
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.monotonic()
                record = {"step": step, "lr": lr, "loss": ctx.mean(loss_sum / n_since)}
                for k, v in metrics.items():
                    if k != "tokens":
                        record[k] = ctx.mean(float(v))
                record["grad_norm"] = gnorm
                record["tokens_per_s"] = tokens_since / max(1e-9, now - t_log)
                history.append(record)
                last_loss = record["loss"]
                t_log, tokens_since, loss_sum, n_since = now, 0.0, 0.0, 0
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        lr=f"{lr:.2e}",
                    )
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0:
                checkpoint(step)
            over = cfg.max_minutes is not None and (time.monotonic() - t0) > 60 * cfg.max_minutes
            if ctx.any(over):
                stopped_by = "time"
                break
        checkpoint(step)
        ctx.barrier()
    finally:
        if bar is not None:
            bar.close()
        ctx.close()
    if math.isnan(last_loss) and history:
        last_loss = history[-1]["loss"]
    return TrainResult(step, last_loss, stopped_by, out_dir, history)
