"""`duplex eval compare`: pooled counts with intervals and a paired sign test over suites."""

from __future__ import annotations

import json

import pytest

from duplex.apps import eval_compare as C


def report(oks: list[bool], seed: int = 0, barge: tuple[int, int] = (3, 4), model: str = "m"):
    """A minimal `eval talk` report: requests answered right or wrong, in one dialogue."""
    n = len(oks)
    return {
        "model": model,
        "config": {"seed": seed, "conversations": 4, "turns": 16, "minutes": [1.0]},
        "listening": {"wer": 0.25, "words": 100},
        "speaking": {"n": 4, "ratio": 0.5},
        "answers": {
            "n": n,
            "correct": sum(oks) / n,
            "requests": [
                {"dialogue": "c0", "request": f"q{i % 3}", "ok": ok} for i, ok in enumerate(oks)
            ],
        },
        "timing": {
            "barge_in_stopped_200ms": barge[0] / barge[1],
            "barge_ins": barge[1],
            "pause_takeovers": 0.0,
            "pauses": 5,
        },
    }


def test_wilson_interval_matches_known_values():
    lo, hi = C.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert C.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert C.wilson(0, 0) == (0.0, 1.0)


def test_sign_test_is_the_exact_two_sided_binomial():
    assert C.sign_test(0, 6) == pytest.approx(2 / 64)
    assert C.sign_test(1, 6) == pytest.approx(2 * 8 / 128)
    assert C.sign_test(6, 1) == C.sign_test(1, 6)
    assert C.sign_test(3, 3) == 1.0 and C.sign_test(0, 0) == 1.0


def test_requests_are_paired_by_dialogue_text_and_occurrence():
    """The same request text asked twice is two requests; counts add over suite pairs."""
    a = [report([True, True, False, True, False, False]), report([True] * 3, seed=1)]
    b = [report([True, False, False, False, True, False]), report([False] * 3, seed=1)]
    p = C.paired(a, b)
    assert (p["both"], p["only_a"], p["only_b"], p["neither"]) == (1, 5, 1, 2)
    assert p["unmatched"] == 0 and p["p"] == pytest.approx(C.sign_test(5, 1))
    # A request missing from one report is counted apart, not paired with another.
    b[1]["answers"]["requests"].pop()
    assert C.paired(a, b)["unmatched"] == 1


def test_pool_sums_counts_and_words():
    rs = [report([True, False], barge=(1, 2)), report([True, True, True, False], barge=(4, 4))]
    rs[1]["listening"] = {"wer": 0.5, "words": 300}
    out = C.pool(rs)
    assert (out["answers"]["k"], out["answers"]["n"]) == (4, 6)
    assert out["answers"]["ci95"] == C.wilson(4, 6)
    assert (out["barge_ins_stopped"]["k"], out["barge_ins_stopped"]["n"]) == (5, 6)
    assert out["wer"] == pytest.approx((25 + 150) / 400)


def test_cli_prints_writes_and_refuses_what_it_cannot_pair(tmp_path, capsys):
    from duplex.apps.cli import main

    paths = {}
    for name, oks, seed in [("a", [True] * 8, 0), ("b", [False] * 8, 0), ("c", [True], 3)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(report(oks, seed=seed, model=name)))
    out = tmp_path / "cmp.json"
    assert (
        main(["eval", "compare", str(paths["a"]), "--against", str(paths["b"]), "--json", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "8 of 8" in text and "0 of 8" in text and "p = 0.00781" in text
    assert json.loads(out.read_text())["answers_paired"]["only_a"] == 8
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        [str(paths["a"]), "--against", str(paths["c"])],
        [str(paths["a"]), str(paths["a"]), "--against", str(paths["b"])],
        [str(paths["a"]), "--against", str(bad)],
        [str(paths["a"]), "--against", str(tmp_path / "missing.json")],
        [str(paths["a"]), "--against", str(tmp_path / "cmp.json")],
    ]
    for argv in cases:
        assert main(["eval", "compare", *argv]) == 2
    err = capsys.readouterr().err
    assert "seed differs" in err and "as many reports" in err and "not a readable" in err
    assert "not a `duplex eval talk` report" in err
