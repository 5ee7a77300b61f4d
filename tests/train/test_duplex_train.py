"""`duplex train duplex`: a few steps on a small corpus give loadable weights that learn."""

from __future__ import annotations

import json

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
        "--no-progress",
    ]
    assert main([*common, "--steps", "40"]) == 0
    hist = json.loads((run / "history.json").read_text())
    assert hist[-1]["step"] == 40 and hist[-1]["loss"] < hist[0]["loss"]
    model = duplex_lm.load(run / "model.safetensors")
    saved = json.loads((run / "model_config.json").read_text())
    assert json.loads(json.dumps(model.cfg.to_dict())) == saved
    # The same command with more steps continues from the checkpoint (history grows, no restart).
    assert main([*common, "--steps", "60"]) == 0
    hist2 = json.loads((run / "history.json").read_text())
    assert hist2[: len(hist)] == hist and hist2[-1]["step"] == 60
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
