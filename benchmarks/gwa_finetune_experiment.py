"""Experiment (not shipped): fine-tune recall-gwa on short sequences with misleading short matches.

Diagnosis being tested: the shipped recall-gwa fails niah and copy at 16K+ because in its 256-id
training sequences the newest 1- and 2-id suffix matches are nearly always the right place, so it
never learned to prefer the longest match. Here half of each batch is the usual mixture and half
is niah with values drawn from a 12-id pool, or copy over a 48-id alphabet: short matches are
everywhere and only the long one is right. 400 steps (about 7 minutes) from the shipped weights,
with the shared training loop, then `duplex eval recall` on the result.

    .venv/bin/python benchmarks/gwa_finetune_experiment.py
    duplex eval recall --model runs/gwa-ft-exp/ft.safetensors --task niah --context 16384 \\
        --trials 4 --asked 8
"""

from __future__ import annotations

import numpy as np
import torch

from duplex.model import recall as R
from duplex.model import recall_models as M
from duplex.model import recall_tasks as K
from duplex.model import recall_train as RT
from duplex.train.loop import TrainConfig, train

BATCH, T = 16, 256


def hard_niah(rng: np.random.Generator) -> K.Sample:
    """niah whose value ids all come from a 12-id pool (same id -> same pool id)."""
    s = K.niah(T, rng, asked=2)
    pool = K.VAL0 + rng.choice(K.N_VAL, size=12, replace=False)
    ids = s.ids.copy()
    vals = (ids >= K.VAL0) & (ids < K.FILL0)
    ids[vals] = pool[(ids[vals] - K.VAL0) % 12]
    s.ids = ids
    return s


def hard_copy(rng: np.random.Generator) -> K.Sample:
    """copy over a 48-id alphabet (same id -> same pool id)."""
    s = K.copy_task(T, rng, span=48, min_back=T // 4)
    pool = K.CONTENT0 + rng.choice(K.VOCAB - K.CONTENT0, size=48, replace=False)
    ids = s.ids.copy()
    content = ids >= K.CONTENT0
    ids[content] = pool[ids[content] % 48]
    s.ids = ids
    return s


def make_batch(step: int, rows: slice) -> RT.RecallBatch:
    samples = []
    for r in range(*rows.indices(BATCH)):
        rng = np.random.default_rng([99, step, r])
        u = rng.random()
        if u < 0.5:
            samples.append(K.training_sample(T, rng))
        elif u < 0.75:
            samples.append(hard_niah(rng))
        else:
            samples.append(hard_copy(rng))
    return RT.collate(samples)


def main() -> None:
    torch.set_num_threads(1)
    model = M.load_recall("recall-gwa").train()
    cfg = TrainConfig(
        out_dir="runs/gwa-ft-exp",
        steps=400,
        batch_size=BATCH,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=20,
        seed=1,
        log_every=20,
        ckpt_every=100,
        max_minutes=10,
        progress=False,
        device="cpu",
    )
    res = train(model, make_batch, RT.recall_loss, cfg)
    print(res.steps_done, res.final_loss)
    model.eval()
    M.save_model(model, "runs/gwa-ft-exp/ft.safetensors", "recall-gwa-ft")
    for task, asked in (("niah", 8), ("copy", 1), ("mqar", 1)):
        r = R.evaluate("runs/gwa-ft-exp/ft.safetensors", task, 16384, 4, asked=asked)
        print(task, r.accuracy, r.correct, r.items, round(r.token_accuracy, 4))


if __name__ == "__main__":
    main()
