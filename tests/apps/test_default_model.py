"""The shipped `default` model: the trained talking model, heard through the real loop.

Figures are what this model measured on held-out conversations (voices, numbers and problems
training never used), with margins; an untrained model fails every one of them (WER above 100%,
no correct answer, speech over the user). What it does not yet do (most answers, facts across
minutes, the state prompt) is in the README's table, not asserted here.
"""

from __future__ import annotations

import pytest

from duplex.apps.eval_talk import EvalConfig, evaluate
from duplex.model import duplex_lm


def test_default_is_the_trained_talking_model():
    path = duplex_lm.WEIGHTS_DIR / "duplex_default.safetensors"
    assert path.is_file() and path.stat().st_size <= 40 * 2**20
    model = duplex_lm.load("default")
    cfg = model.cfg
    assert cfg.depth_hidden > 0 and cfg.text_lead > 0 and cfg.log_text_only and cfg.window_speaker
    # Trained, not the seed-0 initialisation of its config.
    fresh = duplex_lm.DuplexLM(duplex_lm.DuplexConfig.from_dict(cfg.to_dict()))
    assert not model.text_head.weight.equal(fresh.text_head.weight)


@pytest.fixture(scope="module")
def report() -> dict:
    # Three 12-turn conversations: 41 requests, 9 barge-ins, 11 pauses. One 8-turn
    # conversation held a single barge-in, so its verdict on stopping was a coin's.
    cfg = EvalConfig(
        model="default",
        conversations=3,
        turns=12,
        minutes=(),
        state_prompt=False,
        judge_max=4,
        seed=0,
    )
    return evaluate(cfg, progress=False)


def test_default_transcribes_held_out_voices(report):
    # Untrained: WER above 2000%; this model measured 47-56% on two held-out suites.
    assert report["listening"]["words"] > 20
    assert report["listening"]["wer"] < 0.7


def test_default_answers_in_time_and_stops_when_interrupted(report):
    t = report["timing"]
    assert t["replied"] >= 0.4
    assert t["reply_latency_p50"] is not None and 0.0 < t["reply_latency_p50"] <= 0.2
    assert t["speech_when_silent"] == 0.0
    assert t["barge_ins"] >= 8
    assert t["barge_in_stopped_200ms"] >= 0.5


def test_default_answers_some_held_out_requests(report):
    answers = report["answers"]
    assert answers["n"] >= 3
    assert answers["correct"] > 0.0
