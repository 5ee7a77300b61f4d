"""`duplex train duplex`: a few steps on a small corpus give loadable weights that learn."""

from __future__ import annotations

import json

import torch

from duplex.data import conversations as C
from duplex.model import duplex_lm


def test_train_command_learns_and_resumes(tmp_path):
    from duplex.apps.cli import main

    corpus = tmp_path / "corpus"
    C.build(corpus, {"tts": 0.004, "pairs": 0.004}, seed=2, shard_minutes=0.25, progress=False)
    run = tmp_path / "run"
    common = [
        "train",
        "duplex",
        "--corpus",
        str(corpus),
        "--out",
        str(run),
        "--config",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--threads",
        "1",
        "--warmup",
        "2",
        "--lr",
        "3e-3",
        "--ckpt-every",
        "10",
        "--from-start",
        "0.5",
        "--transcript-noise",
        "0.1",
        "--transcript-sampling",
        "0.2",
        "--transcript-sampling-passes",
        "2",
        "--barge-weight",
        "3",
        "--synthetic-barge",
        "0.5",
        "--no-progress",
    ]
    assert main([*common, "--steps", "40"]) == 0
    hist = json.loads((run / "history.json").read_text())
    assert hist[-1]["step"] == 40 and hist[-1]["loss"] < hist[0]["loss"]
    model = duplex_lm.load(run / "model.safetensors")
    saved = json.loads((run / "model_config.json").read_text())
    assert json.loads(json.dumps(model.cfg.to_dict())) == saved
    assert saved["transcript_input_noise"] == 0.1 and saved["transcript_sampling"] == 0.2
    assert saved["transcript_sampling_passes"] == 2
    # The same command with more steps continues from the checkpoint (history grows, no restart).
    assert main([*common, "--steps", "60"]) == 0
    hist2 = json.loads((run / "history.json").read_text())
    assert hist2[: len(hist)] == hist and hist2[-1]["step"] == 60
    assert main([*common, "--steps", "60", "--from-start", "1.5"]) == 2
    assert main([*common, "--steps", "60", "--transcript-noise", "1"]) == 2
    assert main([*common, "--steps", "60", "--transcript-sampling", "1"]) == 2
    assert main([*common, "--steps", "60", "--transcript-sampling-passes", "0"]) == 2
    assert main([*common, "--steps", "60", "--barge-weight", "-1"]) == 2
    assert main([*common, "--steps", "60", "--synthetic-barge", "1.5"]) == 2
    assert (
        main(
            [
                "train",
                "duplex",
                "--corpus",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "r2"),
                "--no-progress",
            ]
        )
        == 2
    )


def warm_args(tmp_path, base: duplex_lm.DuplexLM, steps: int) -> list[str]:
    """Arguments of a few `train duplex` steps of config tiny on a tiny corpus, from `base`."""
    corpus = tmp_path / "corpus"
    C.build(corpus, {"pairs": 0.004}, seed=3, shard_minutes=0.25, progress=False)
    duplex_lm.save(base, tmp_path / "base.safetensors")
    common = ["train", "duplex", "--corpus", str(corpus), "--config", "tiny"]
    common += ["--init", str(tmp_path / "base.safetensors"), "--batch-size", "2"]
    common += ["--seq-len", "48", "--threads", "1", "--steps", str(steps), "--warmup", "1"]
    return [*common, "--no-progress"]


def test_swa_window_override_warm_starts_every_weight(tmp_path):
    """--swa-window widens the attention span of a warm-started model: the weights carry over
    (nothing is re-initialised), the saved config keeps the new span, and the span streams."""
    from duplex.apps.cli import main

    base = duplex_lm.load("tiny")
    with torch.no_grad():
        # A mark no fresh initialisation has: the trained model must start from it.
        base.backbone.embed.weight.add_(5.0)
    assert base.cfg.backbone.swa_window == 32
    common = warm_args(tmp_path, base, steps=3)
    run = tmp_path / "run"
    assert main([*common, "--out", str(run), "--swa-window", "96"]) == 0
    model = duplex_lm.load(run / "model.safetensors")
    assert model.cfg.backbone.swa_window == 96
    spans = [b.window for b in model.backbone.blocks if getattr(b, "window", None)]
    assert spans == [96]
    emb, start = model.backbone.embed.weight, base.backbone.embed.weight
    # Three small steps moved the marked table a little from where it was loaded.
    assert not emb.equal(start) and (emb - start).abs().max() < 0.5
    assert main([*common, "--out", str(tmp_path / "bad"), "--swa-window", "0"]) == 2


def test_copy_window_override_keeps_the_copy_heads_weights(tmp_path):
    """--copy-window changes how many text frames the copy head points over; its weights
    (which do not depend on the span) carry over from --init."""
    from duplex.apps.cli import main

    cfg = duplex_lm.DuplexConfig.from_dict(duplex_lm.CONFIGS["tiny"].to_dict())
    cfg.copy_window = 8
    base = duplex_lm.DuplexLM(cfg)
    with torch.no_grad():
        base.copy.q.weight.add_(5.0)
    common = warm_args(tmp_path, base, steps=2)
    run = tmp_path / "run"
    assert main([*common, "--out", str(run), "--copy-window", "40"]) == 0
    model = duplex_lm.load(run / "model.safetensors")
    assert model.cfg.copy_window == 40 and model.copy.window == 40
    assert (model.copy.q.weight - base.copy.q.weight).abs().max() < 0.5
    assert main([*common, "--out", str(tmp_path / "bad"), "--copy-window", "-1"]) == 2
    gated = tmp_path / "gated"
    gate_args = ["--copy-window", "8", "--copy-gate-loss", "0.7", "--copy-gate-pointer"]
    gate_args.append("--copy-user-only")
    assert main([*common, "--out", str(gated), *gate_args]) == 0
    trained = duplex_lm.load(gated / "model.safetensors")
    assert trained.cfg.copy_gate_loss == 0.7 and trained.cfg.copy_gate_pointer
    assert trained.copy.gate_in is not None and trained.copy.user_only
    hist = json.loads((gated / "history.json").read_text())
    assert all(h["loss_gate"] >= 0 for h in hist)
    bad = [*common, "--out", str(tmp_path / "bad2")]
    assert main([*bad, "--copy-window", "8", "--copy-gate-loss", "-1"]) == 2
    assert main([*bad, "--copy-gate-loss", "1"]) == 2
    assert main([*bad, "--copy-gate-pointer"]) == 2
    assert main([*bad, "--copy-user-only"]) == 2


def test_train_only_changes_just_the_named_parameters(tmp_path):
    """--train-only copy.: a copy head learns on top of a trained model and nothing else of it
    moves; a prefix matching nothing is an error."""
    from duplex.apps.cli import main

    cfg = duplex_lm.DuplexConfig.from_dict(duplex_lm.CONFIGS["tiny"].to_dict())
    cfg.copy_window, cfg.copy_loss = 8, 0.5
    base = duplex_lm.DuplexLM(cfg)
    common = [*warm_args(tmp_path, base, steps=3), "--copy-window", "8"]
    run = tmp_path / "run"
    assert main([*common, "--out", str(run), "--train-only", "copy."]) == 0
    after = duplex_lm.load(run / "model.safetensors").state_dict()
    moved = {k for k, v in base.state_dict().items() if not torch.equal(v, after[k])}
    assert moved and all(k.startswith("copy.") for k in moved)
    assert main([*common, "--out", str(tmp_path / "bad"), "--train-only", "nothing."]) == 2
