"""`duplex eval compare`: two models' `eval talk` reports on the same suites, pooled and paired.

One suite of 50-73 requests moves by several answers between close models for reasons that
have little to do with them (the model's written text is fed back, so one misheard word sends
the rest of a dialogue elsewhere), so choosing between two models needs several suites and a
test of whether the difference exceeds that noise. Reports are paired in the order given
(suite i of one model with suite i of the other: the same seed and options); within a pair,
requests are matched by dialogue, request text and occurrence (the timing of a request may
move with the model's replies, its place in the script does not).

Printed and written: pooled counts with 95% Wilson intervals (answers, barge-ins stopped within
200 ms, pause takeovers), WER pooled over words, the mean spoken/ceiling ratio, and for answers
an exact sign test (McNemar) over the matched requests that one model answered right and the
other wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(b: int, c: int) -> float:
    """Two-sided exact p of b against c discordant pairs under "either is as likely" (McNemar):
    twice the binomial tail of the smaller count, at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _count(share: float | None, n: int) -> int:
    return 0 if share is None else round(share * n)


def _counts(report: dict) -> dict[str, tuple[int, int]]:
    """(successes, trials) of one report: answers, barge-ins stopped, pauses taken over."""
    a, t = report["answers"], report["timing"]
    return {
        "answers": (_count(a["correct"], a["n"]), a["n"]),
        "barge_ins_stopped": (_count(t["barge_in_stopped_200ms"], t["barge_ins"]), t["barge_ins"]),
        "pause_takeovers": (_count(t["pause_takeovers"], t["pauses"]), t["pauses"]),
    }


def pool(reports: list[dict]) -> dict:
    """Counts summed over suites: answers, barge-ins, pauses; WER over all words; the mean of
    the suites' spoken/ceiling ratios."""
    out: dict = {}
    counts = [_counts(r) for r in reports]
    for key in counts[0]:
        k, n = sum(c[key][0] for c in counts), sum(c[key][1] for c in counts)
        out[key] = {"k": k, "n": n, "share": k / n if n else None, "ci95": wilson(k, n)}
    words = sum(r["listening"]["words"] for r in reports)
    errors = sum(r["listening"]["wer"] * r["listening"]["words"] for r in reports)
    out["wer"] = errors / words if words else None
    ratios = [r["speaking"]["ratio"] for r in reports if r["speaking"]["n"]]
    out["spoken_ratio"] = sum(ratios) / len(ratios) if ratios else None
    return out


def _keyed(report: dict) -> dict[tuple, bool]:
    seen: Counter = Counter()
    out = {}
    for q in report["answers"]["requests"]:
        base = (q.get("dialogue"), q["request"])
        out[(*base, seen[base])] = bool(q["ok"])
        seen[base] += 1
    return out


def paired(reports_a: list[dict], reports_b: list[dict]) -> dict:
    """Matched requests of suite pairs: how many both, only A, only B, neither answered right;
    requests found in one report only; the sign test's p over the discordant ones."""
    both = only_a = only_b = neither = unmatched = 0
    for ra, rb in zip(reports_a, reports_b, strict=True):
        ka, kb = _keyed(ra), _keyed(rb)
        unmatched += len(ka.keys() ^ kb.keys())
        for key in ka.keys() & kb.keys():
            a, b = ka[key], kb[key]
            both += a and b
            only_a += a and not b
            only_b += b and not a
            neither += not a and not b
    return {
        "both": both,
        "only_a": only_a,
        "only_b": only_b,
        "neither": neither,
        "unmatched": unmatched,
        "p": sign_test(only_a, only_b),
    }


def compare(reports_a: list[dict], reports_b: list[dict]) -> dict:
    """The comparison `duplex eval compare` prints and writes."""
    if len(reports_a) != len(reports_b) or not reports_a:
        raise ValueError(
            f"give as many reports for each model, at least one ({len(reports_a)} against "
            f"{len(reports_b)})"
        )
    for i, (ra, rb) in enumerate(zip(reports_a, reports_b, strict=True)):
        ca, cb = ra.get("config", {}), rb.get("config", {})
        for key in ("seed", "conversations", "turns", "minutes"):
            if ca.get(key) != cb.get(key):
                raise ValueError(
                    f"suite {i + 1}: {key} differs ({ca.get(key)!r} against {cb.get(key)!r}); "
                    "pair reports of the same suite"
                )
    return {
        "a": {"model": reports_a[0].get("model"), **pool(reports_a)},
        "b": {"model": reports_b[0].get("model"), **pool(reports_b)},
        "answers_paired": paired(reports_a, reports_b),
        "suites": len(reports_a),
    }


def _cell(x: dict) -> str:
    if not x["n"]:
        return "-"
    lo, hi = x["ci95"]
    return f"{x['k']} of {x['n']} ({100 * x['share']:.1f}%, {100 * lo:.0f}-{100 * hi:.0f}%)"


def table(result: dict) -> str:
    """The comparison as a plain-text table."""
    a, b, p = result["a"], result["b"], result["answers_paired"]

    def num(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "-"
        return f"{100 * x:.1f}%" if pct else f"{x:.2f}"

    rows = [
        ("", "A", "B"),
        ("model", str(a["model"]), str(b["model"])),
        ("answers correct", _cell(a["answers"]), _cell(b["answers"])),
        (
            "barge-ins stopped within 200 ms",
            _cell(a["barge_ins_stopped"]),
            _cell(b["barge_ins_stopped"]),
        ),
        ("pause takeovers", _cell(a["pause_takeovers"]), _cell(b["pause_takeovers"])),
        ("user transcript WER", num(a["wer"], True), num(b["wer"], True)),
        ("spoken / ceiling (mean of suites)", num(a["spoken_ratio"]), num(b["spoken_ratio"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"duplex eval compare: {result['suites']} suite pair(s)"]
    lines += [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows]
    lines.append(
        f"answers, matched requests: {p['only_a']} right only for A, {p['only_b']} only for B, "
        f"{p['both']} both, {p['neither']} neither ({p['unmatched']} unmatched); sign test "
        f"p = {p['p']:.3g}" + (" (not a difference these suites can show)" if p["p"] > 0.05 else "")
    )
    return "\n".join(lines)


HELP = "compare two models' `eval talk` reports over the same suites (pooled, paired, tested)"
DESCRIPTION = """Compare two models' `duplex eval talk` reports on the same suites.

Pass each model's reports (JSON written by `duplex eval talk --json`) in the same order of
suites: suite i of A is paired with suite i of B, and they must share seed, conversations,
turns and minutes. Printed: pooled counts with 95% Wilson intervals (answers, barge-ins stopped
within 200 ms, pause takeovers), WER over all words, the mean spoken/ceiling ratio, and an
exact sign test (McNemar) on the requests one model answered right and the other wrong: a
p above 0.05 says these suites cannot tell the two apart on answers.

Example:
  duplex eval compare runs/new/s0.json runs/new/s1.json --against runs/old/s0.json \\
      runs/old/s1.json --json compare.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", type=Path, help="model A's reports, one per suite")
    p.add_argument(
        "--against", nargs="+", type=Path, required=True, help="model B's reports, same order"
    )
    p.add_argument("--json", type=Path, help="also write the comparison here")


def _load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON report ({e})") from None
    if not isinstance(report, dict) or not {"answers", "timing", "listening"} <= report.keys():
        raise ValueError(f"{path}: not a `duplex eval talk` report")
    return report


def run(args: argparse.Namespace) -> int:
    try:
        result = compare([_load(p) for p in args.reports], [_load(p) for p in args.against])
    except (ValueError, KeyError, TypeError) as e:
        print(f"duplex eval compare: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0
