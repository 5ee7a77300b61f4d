"""The report of `duplex eval talk`: per-dialogue scores pooled, then printed and plotted.

`summarise` makes the one report dict (what `--json` writes and what tests read); `table` and
`plot` only render it, so the printed table, the JSON and the chart can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from duplex.data import domain as D

if TYPE_CHECKING:
    from duplex.apps.eval_talk import EvalConfig


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


# A request is "overlapped" when the model's voice sounded during this share of it or more.
OVERLAPPED = 0.2


def _heard(answers: list[dict]) -> dict:
    """Word error rate of the transcripts of these requests alone."""
    errors = sum(a["heard_errors"][0] for a in answers)
    words = sum(a["heard_errors"][1] for a in answers)
    return {"n": len(answers), "words": words, "wer": errors / words if words else None}


def summarise(
    cfg: EvalConfig,
    results: list[dict],
    answers: list[dict],
    state_answers: list[dict],
    spoken: list[float],
    ceil: list[float],
) -> dict:
    """Pool the per-dialogue scores (`score_dialogue`'s dicts) into the report."""
    wer_e = sum(r["wer"][0] for r in results)
    wer_n = sum(r["wer"][1] for r in results)
    per_intent = {}
    for it in D.INTENTS:
        xs = [a["ok"] for a in answers if a["intent"] == it]
        if xs:
            per_intent[it] = {"n": len(xs), "correct": _mean(xs)}
    facts = {f"{m:g}min": [] for m in cfg.minutes}
    for a in answers:
        if a["part"] == "facts" and a["ago"] is not None and cfg.minutes:
            # Each question counts at the planned distance nearest to how long ago it was told.
            m = min(cfg.minutes, key=lambda m: abs(a["ago"] - 60 * m))
            facts[f"{m:g}min"].append(a["ok"])
    facts = {k: {"n": len(v), "correct": _mean(v)} for k, v in facts.items()}
    latency = [x for r in results for x in r["latency"]]
    barge = [x for r in results for x in r["barge"]]
    pauses = [x for r in results for x in r["pauses"]]
    acks = [x for r in results for x in r["acks"]]
    silence = [x for r in results for x in r["silence"]]
    return {
        "model": cfg.model,
        "codec": cfg.codec,
        "listening": {
            "wer": wer_e / max(1, wer_n),
            "words": wer_n,
            "requests": {
                "clear": _heard([a for a in answers if a["overlap"] < OVERLAPPED]),
                "overlapped": _heard([a for a in answers if a["overlap"] >= OVERLAPPED]),
            },
        },
        "answers": {
            "n": len(answers),
            "correct": _mean(a["ok"] for a in answers),
            "per_intent": per_intent,
            "facts_by_distance": facts,
            "requests": [
                {k: a[k] for k in ("intent", "request", "heard", "said", "answer", "ok", "spoke")}
                | {
                    "dialogue": a.get("dialogue"),
                    "start": round(a["start"], 2),
                    "overlap": round(a["overlap"], 3),
                }
                for a in answers
            ],
        },
        "speaking": {
            "n": len(spoken),
            "word_accuracy": _mean(spoken),
            "ceiling": _mean(ceil),
            "ratio": (_mean(spoken) or 0.0) / max(_mean(ceil) or 0.0, 1e-9),
        },
        "timing": {
            "reply_latency_p50": _pct(latency, 50),
            "reply_latency_p90": _pct(latency, 90),
            "replied": len(latency) / max(1, len(latency) + sum(r["no_reply"] for r in results)),
            "pause_takeovers": _mean(pauses),
            "pauses": len(pauses),
            "barge_ins": len(barge),
            "barge_in_stopped_200ms": _mean((x is not None and x <= 0.2) for x in barge),
            "barge_in_stop_p50": _pct([x for x in barge if x is not None], 50),
            # Seconds from each barge-in to the model's stop (None: not within 3 s), to read
            # whether a miss is a late stop or none.
            "barge_in_stops": [None if x is None else round(x, 2) for x in barge],
            "talk_through": _mean(acks),
            "acks": len(acks),
            "speech_when_silent": _mean(silence),
        },
        "state_prompt": {
            "n": len(state_answers),
            "correct": _mean(a["ok"] for a in state_answers),
        },
    }


def _fmt(x: float | None, pct: bool = False, ms: bool = False) -> str:
    if x is None:
        return "-"
    if ms:
        return f"{1000 * x:.0f} ms"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def table(report: dict) -> str:
    """The report as a plain-text table."""
    a, t, s = report["answers"], report["timing"], report["speaking"]
    rows = [
        ("user transcript WER", _fmt(report["listening"]["wer"], pct=True)),
    ]
    for k, v in report["listening"]["requests"].items():
        rows.append((f"  requests, {k}", f"{_fmt(v['wer'], pct=True)} of {v['n']}"))
    rows += [
        ("answers correct (text)", f"{_fmt(a['correct'], pct=True)} of {a['n']}"),
    ]
    for k, v in a["facts_by_distance"].items():
        rows.append((f"  fact asked {k} later", f"{_fmt(v['correct'], pct=True)} of {v['n']}"))
    for k, v in a["per_intent"].items():
        rows.append((f"  {k}", f"{_fmt(v['correct'], pct=True)} of {v['n']}"))
    rows += [
        ("spoken answers: judge word accuracy", _fmt(s["word_accuracy"])),
        ("  ceiling (model voice via codec)", _fmt(s["ceiling"])),
        ("  ratio", _fmt(s["ratio"])),
        (
            "reply latency p50 / p90",
            f"{_fmt(t['reply_latency_p50'], ms=True)} / {_fmt(t['reply_latency_p90'], ms=True)}",
        ),
        ("requests with a spoken reply", _fmt(t["replied"], pct=True)),
        ("pause takeovers", f"{_fmt(t['pause_takeovers'], pct=True)} of {t['pauses']}"),
        (
            "barge-ins stopped within 200 ms",
            f"{_fmt(t['barge_in_stopped_200ms'], pct=True)} of {t['barge_ins']}",
        ),
        ("talk-through of acknowledgements", f"{_fmt(t['talk_through'], pct=True)} of {t['acks']}"),
        ("speech when nobody asked (frames)", _fmt(t["speech_when_silent"], pct=True)),
        (
            "state as system prompt: answers",
            f"{_fmt(report['state_prompt']['correct'], pct=True)} of {report['state_prompt']['n']}",
        ),
        (
            "audio / wall time",
            f"{report['seconds']['audio']:.0f} s / {report['seconds']['wall']:.0f} s",
        ),
    ]
    w = max(len(k) for k, _ in rows)
    head = f"duplex eval talk: model {report['model']}, codec {report['codec']}"
    return "\n".join([head, *(f"{k:<{w}}  {v}" for k, v in rows)])


def plot(report: dict, path: Path) -> None:
    """The report as a bar chart, every bar a score where higher is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, a = report["timing"], report["answers"]
    names = [
        "1-WER",
        "answers",
        "speaking/ceil",
        "replied",
        "no takeover",
        "barge stop",
        "talk-through",
        "quiet when silent",
        "state prompt",
    ]
    vals = [
        max(0.0, 1 - report["listening"]["wer"]),
        a["correct"] or 0,
        min(1.0, report["speaking"]["ratio"] or 0),
        t["replied"] or 0,
        1 - (t["pause_takeovers"] or 0) if t["pause_takeovers"] is not None else 0,
        t["barge_in_stopped_200ms"] or 0,
        t["talk_through"] or 0,
        1 - (t["speech_when_silent"] or 0) if t["speech_when_silent"] is not None else 0,
        report["state_prompt"]["correct"] or 0,
    ]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(range(len(vals)), vals, color="#3b7dd8")
    ax.set_xticks(range(len(vals)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"duplex eval talk: {report['model']} (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
