"""The shared training loop: schedule, determinism, exact resume, curves, and DDP equivalence."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duplex.train import TrainConfig, lr_at, train
from tests.train import toy

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path),
        steps=6,
        batch_size=8,
        lr=1e-2,
        warmup_steps=2,
        log_every=1,
        ckpt_every=3,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_loss_goes_down_and_curves_are_written(tmp_path) -> None:
    model = toy.make_model()
    held_out = toy.make_batch(10_000, slice(None))

    def eval_loss() -> float:
        with torch.no_grad():
            return float(toy.loss_fn(model, held_out)[0])

    before = eval_loss()
    res = train(model, toy.make_batch, toy.loss_fn, _cfg(tmp_path, steps=200, ckpt_every=1000))
    assert res.steps_done == 200 and res.stopped_by == "steps"
    assert eval_loss() < 0.5 * before
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist) == 200 and hist[-1]["step"] == 200
    assert hist[0]["tokens_per_s"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint.pt").is_file()


def test_same_seed_same_result(tmp_path) -> None:
    a, b = toy.make_model(), toy.make_model()
    train(a, toy.make_batch, toy.loss_fn, _cfg(tmp_path / "a"))
    train(b, toy.make_batch, toy.loss_fn, _cfg(tmp_path / "b"))
    assert torch.equal(_params(a), _params(b))


def test_resume_after_crash_matches_uninterrupted_run(tmp_path) -> None:
    ref = toy.make_model()
    train(ref, toy.make_batch, toy.loss_fn, _cfg(tmp_path / "ref"))

    def crashing(step: int, rows: slice):
        if step == 4:
            raise RuntimeError("simulated crash")
        return toy.make_batch(step, rows)

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(toy.make_model(), crashing, toy.loss_fn, _cfg(run))
    resumed = toy.make_model(seed=123)
    res = train(resumed, toy.make_batch, toy.loss_fn, _cfg(run))
    assert res.steps_done == 6
    assert torch.equal(_params(resumed), _params(ref))
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_with_a_clear_error(tmp_path) -> None:
    def bad(step: int, rows: slice):
        b = toy.make_batch(step, rows)
        b["y"][:] = float("nan")
        return b

    with pytest.raises(FloatingPointError, match="step 0"):
        train(toy.make_model(), bad, toy.loss_fn, _cfg(tmp_path))


def test_torchrun_two_processes_match_one(tmp_path) -> None:
    single = toy.make_model()
    cfg = TrainConfig(
        out_dir=str(tmp_path / "single"),
        steps=5,
        batch_size=8,
        lr=1e-2,
        warmup_steps=2,
        progress=False,
    )
    train(single, toy.make_batch, toy.loss_fn, cfg)

    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tests" / "train" / "ddp_worker.py"),
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = toy.make_model()
    ddp.load_state_dict(torch.load(out / "params.pt"))
    torch.testing.assert_close(_params(ddp), _params(single), rtol=1e-10, atol=1e-12)
    assert not torch.equal(_params(ddp), _params(toy.make_model()))


def test_bf16_autocast_trains_and_differs_from_fp32(tmp_path) -> None:
    """bf16 reaches the forward (results differ from fp32) and still learns; weights stay fp32."""
    runs = {}

    def batch32(step: int, rows: slice) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in toy.make_batch(step, rows).items()}

    for precision in ("fp32", "bf16"):
        model = toy.make_model().float()
        res = train(
            model,
            batch32,
            toy.loss_fn,
            _cfg(tmp_path / precision, steps=60, ckpt_every=1000, precision=precision),
        )
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs[precision] = (res.history[0]["loss"], res.final_loss, _params(model))
    first, last, params = runs["bf16"]
    assert last < 0.7 * first
    assert not torch.equal(params, runs["fp32"][2])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_on_checkpoint_sees_each_checkpoint_in_eval_mode(tmp_path) -> None:
    seen = []

    def hook(model: torch.nn.Module, step: int) -> None:
        saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
        seen.append((step, model.training, saved["step"]))

    model = toy.make_model()
    train(model, toy.make_batch, toy.loss_fn, _cfg(tmp_path, steps=7, ckpt_every=3), hook)
    assert seen == [(3, False, 3), (6, False, 6), (7, False, 7)]
    assert model.training


def test_batches_of_dataclasses_reach_the_device():
    """A batch held in a dataclass (the recall trainer's) moves field by field, as dicts do."""
    from dataclasses import dataclass

    from duplex.train.loop import _to_device

    @dataclass
    class Pair:
        ids: torch.Tensor
        extra: dict

    b = Pair(torch.zeros(2, 3, dtype=torch.long), {"mask": torch.ones(2)})
    moved = _to_device(b, torch.device("meta"))
    assert isinstance(moved, Pair)
    assert moved.ids.device.type == "meta" and moved.extra["mask"].device.type == "meta"
    assert b.ids.device.type == "cpu"
