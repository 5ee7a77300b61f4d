"""`duplex eval talk` judges itself first: the oracle scores near the ceiling, silence and an
untrained model near zero. A shared small suite keeps it quick: one held-out conversation, a
fact asked 20 s after it was told, and the saved-state check."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from duplex.apps import eval_talk as E

SMALL = {"conversations": 1, "turns": 8, "minutes": (0.35,), "judge_max": 6, "seed": 1}


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    return {
        m: E.evaluate(E.EvalConfig(model=m, **SMALL), progress=False)
        for m in ("oracle", "silent", "tiny")
    }


def test_the_suite_covers_every_event(reports):
    t = reports["oracle"]["timing"]
    assert reports["oracle"]["answers"]["n"] >= 8
    assert t["pauses"] >= 1 and t["barge_ins"] >= 1
    assert reports["oracle"]["state_prompt"]["n"] == 3
    assert reports["oracle"]["answers"]["facts_by_distance"]["0.35min"]["n"] == 5


def test_oracle_scores_near_the_ceiling(reports):
    r = reports["oracle"]
    assert r["listening"]["wer"] < 0.02
    assert r["answers"]["correct"] == 1.0
    assert r["answers"]["facts_by_distance"]["0.35min"]["correct"] == 1.0
    assert r["state_prompt"]["correct"] == 1.0
    # Its audio is the model voice through the codec: what the ceiling measures.
    assert r["speaking"]["ratio"] > 0.75
    t = r["timing"]
    assert t["replied"] == 1.0
    # Script: 80-200 ms after the user, plus one frame of acoustic delay.
    assert 0.08 <= t["reply_latency_p50"] <= 0.26
    assert t["pause_takeovers"] == 0.0
    assert t["barge_in_stopped_200ms"] == 1.0
    assert len(t["barge_in_stops"]) == t["barge_ins"]
    assert all(x is not None and x <= 0.2 for x in t["barge_in_stops"])
    assert t["talk_through"] in (None, 1.0)
    assert t["speech_when_silent"] in (None, 0.0)


@pytest.mark.parametrize("model", ["silent", "tiny"])
def test_silence_and_an_untrained_model_score_near_zero(reports, model):
    r = reports[model]
    assert r["listening"]["wer"] > 0.9
    assert r["answers"]["correct"] == 0.0
    assert r["state_prompt"]["correct"] == 0.0
    assert r["speaking"]["word_accuracy"] < 0.15


def test_every_request_is_listed_with_what_was_heard_and_said(reports):
    oracle = reports["oracle"]["answers"]
    assert len(oracle["requests"]) == oracle["n"]
    for q in oracle["requests"]:
        # The oracle's transcript of the request is the request, and it says the answer.
        assert q["request"].rstrip("?.") in q["heard"], q
        assert q["said"].strip() == q["answer"] and q["ok"] and q["spoke"]
    silent = reports["silent"]["answers"]["requests"]
    assert silent and all(q["heard"] == "" and q["said"] == "" for q in silent)
    assert not any(q["spoke"] or q["ok"] for q in silent)


def test_the_transcript_is_scored_apart_where_the_model_spoke_over_the_user(reports):
    """Requests are split by how much of them the model's own voice covered: the oracle answers
    after each one (all clear, heard exactly), silence covers none (heard as nothing), and the
    untrained model, sounding all the time, covers most."""
    for name in ("oracle", "silent", "tiny"):
        heard = reports[name]["listening"]["requests"]
        assert heard["clear"]["n"] + heard["overlapped"]["n"] == reports[name]["answers"]["n"]
    oracle = reports["oracle"]["listening"]["requests"]
    assert oracle["overlapped"]["n"] == 0 and oracle["clear"]["wer"] < 0.05
    silent = reports["silent"]["listening"]["requests"]
    assert silent["overlapped"]["n"] == 0 and silent["clear"]["wer"] == 1.0
    tiny = reports["tiny"]["listening"]["requests"]
    assert tiny["overlapped"]["n"] > tiny["clear"]["n"]
    assert all(0 <= q["overlap"] <= 1 for q in reports["tiny"]["answers"]["requests"])
    # Where each request sits: its dialogue and second, in order within a dialogue.
    requests = reports["oracle"]["answers"]["requests"]
    for a, b in itertools.pairwise(requests):
        assert a["dialogue"] != b["dialogue"] or a["start"] < b["start"]
    assert {q["dialogue"] for q in requests} == {"conversation0", "facts"}
    assert "requests, overlapped" in E.table(reports["tiny"])


def test_silent_model_never_replies(reports):
    t = reports["silent"]["timing"]
    assert t["replied"] == 0.0 and t["reply_latency_p50"] is None


def test_untrained_model_talks_over_everyone(reports):
    # It emits noise all the time: takeovers and speech in silences, not replies.
    t = reports["tiny"]["timing"]
    assert t["pause_takeovers"] == 1.0


def test_compare_pairs_the_real_reports_of_one_suite(reports):
    """The oracle against silence on the same suite: every request matched, every one the
    oracle got right is its alone, and the sign test says so."""
    from duplex.apps.eval_compare import compare

    oracle, silent = reports["oracle"], reports["silent"]
    got = compare([oracle], [silent])
    p = got["answers_paired"]
    right = round(oracle["answers"]["correct"] * oracle["answers"]["n"])
    assert p["unmatched"] == 0 and p["only_b"] == 0 and p["only_a"] == right >= 7
    assert p["both"] == 0 and p["p"] < 0.05
    assert got["a"]["answers"]["k"] == right and got["b"]["answers"]["k"] == 0
    assert got["a"]["barge_ins_stopped"]["n"] == oracle["timing"]["barge_ins"]
    assert compare([oracle], [oracle])["answers_paired"]["p"] == 1.0


def test_scores_move_with_the_answers():
    """The scorer reads the model's text: an oracle whose answers are wrong scores 0."""
    import math

    from duplex.data import dialogue as G

    bank = G.WordBank(16000)
    cfg = E.EvalConfig(model="oracle", **SMALL)
    _name, d = E.suite(cfg, bank)[0]
    heard = E.Heard(
        50.0,
        320,
        np.zeros(math.ceil(d.duration * 50) * 320, np.float32),
        np.full(math.ceil(d.duration * 50), 256),
        np.full(math.ceil(d.duration * 50), 256),
    )
    r = E.score_dialogue(d, heard, "chat")
    assert r["answers"] and not any(a["ok"] for a in r["answers"])
    assert r["wer"][0] == r["wer"][1]


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    from duplex.apps.cli import main

    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                "talk",
                "--model",
                "silent",
                "--conversations",
                "1",
                "--turns",
                "3",
                "--minutes",
                "",
                "--no-state",
                "--judge-max",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "answers correct (text)" in text and "reply latency" in text
    assert json.loads(out.read_text())["model"] == "silent"
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["eval", "talk", "--model", "nope"]) == 2


def test_speak_temperature_flag_takes_a_temperature_or_joint(capsys):
    """'joint' is the draw before the split (None in SamplingConfig); a negative number is an
    error, not a hidden switch."""
    from duplex.apps.cli import main

    assert E.speak_temperature("0.5") == 0.5 and E.speak_temperature("JOINT") is None
    with pytest.raises(SystemExit):
        main(["eval", "talk", "--speak-temperature", "-1", "--model", "silent"])
    assert "a temperature >= 0 or 'joint'" in capsys.readouterr().err
