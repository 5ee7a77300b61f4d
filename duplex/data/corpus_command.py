"""`duplex data conversations`: the command that makes (or describes) a conversation corpus.

The corpus itself, its shards and how they are made, is `duplex.data.conversations`; this module
is its command line and its table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from duplex.data import dialogue as G
from duplex.data.conversations import DEFAULT_HOURS, build, read_manifest


def stats(manifest: dict) -> str:
    """A table of the corpus: per stage and split, shards, conversations, hours, size."""
    rows: dict[tuple[str, str], list[float]] = {}
    voices: dict[str, set] = {}
    for e in manifest["shards"]:
        r = rows.setdefault((e["stage"], e["split"]), [0, 0, 0.0, 0, 0])
        r[0] += 1
        r[1] += e["conversations"]
        r[2] += e["hours"]
        r[3] += e["frames"]
        r[4] += e["bytes"]
        voices.setdefault(e["split"], set()).update(e["voices"])
    lines = [
        f"{'stage':<14}{'split':<7}{'shards':>7}{'convs':>7}{'hours':>8}{'frames':>11}"
        f"{'MB':>8}{'MB/h':>7}"
    ]
    tot = [0, 0, 0.0, 0, 0]
    for (stage, split), r in sorted(rows.items()):
        lines.append(
            f"{stage:<14}{split:<7}{r[0]:>7}{r[1]:>7}{r[2]:>8.2f}{r[3]:>11}"
            f"{r[4] / 1e6:>8.2f}{r[4] / 1e6 / max(r[2], 1e-9):>7.2f}"
        )
        tot = [a + b for a, b in zip(tot, r)]
    lines.append(
        f"{'total':<21}{tot[0]:>7}{tot[1]:>7}{tot[2]:>8.2f}{tot[3]:>11}"
        f"{tot[4] / 1e6:>8.2f}{tot[4] / 1e6 / max(tot[2], 1e-9):>7.2f}"
    )
    for split, v in sorted(voices.items()):
        lines.append(f"{split} voices: {len(v)} (accent+variant)")
    run = manifest.get("last_run")
    if run:
        lines.append(
            f"last run: {run['hours']:.2f} h in {run['seconds']:.0f} s on {run['workers']} "
            f"worker(s) = {run['hours_per_cpu_hour']:.1f} h of conversation per CPU-hour"
        )
    return "\n".join(lines)


HELP = "make the spoken conversation corpus (codec tokens + aligned text) for training"
DESCRIPTION = """Synthesise spoken conversations in the talk domain and store them as codec tokens.

Stages (a curriculum; --hours sets how much of each):
  tts            the model voice reads answers aloud (text -> speech); the user is silent
  asr            users speak requests and other sentences (speech -> text); the model is silent
  pairs          one or two requests with their answers
  conversations  2-200 turns: facts told, updated and asked much later, pauses inside requests,
                 silences, out-of-domain requests
  duplex         conversations with barge-ins, acknowledgements and minutes of silence

Users: espeak-ng voices (accents x variants), 120-260 wpm, pitch 15-85 with per-utterance changes,
level changes, white/pink/brown noise (10-40 dB SNR) and synthetic reverberation. The model: one
fixed voice. The eval split uses held-out voices (another accent and variants), held-out numbers
and arithmetic problems; training never sees them.

Output: DIR/STAGE-SPLIT-NNNNN.npz shards and DIR/manifest.json (seed, stage, voices, hours,
frames and bytes of each shard). Re-running the same command resumes: finished shards are kept.
The same --seed gives the same bytes.

Examples:
  duplex data conversations --out ~/corpus --workers 2
  duplex data conversations --out ~/corpus --hours tts=1,duplex=5
  duplex data conversations --out ~/corpus-eval --split eval --hours pairs=0.2,duplex=0.5
  duplex data conversations --stats ~/corpus
"""


def parse_hours(text: str) -> dict[str, float]:
    """ "tts=1,duplex=2.5" -> {"tts": 1.0, "duplex": 2.5}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected STAGE=HOURS, got {part!r}")
        k, v = part.split("=", 1)
        if k not in G.STAGES:
            raise argparse.ArgumentTypeError(f"unknown stage {k!r}: one of {', '.join(G.STAGES)}")
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"hours must be a number, got {v!r}") from None
        if out[k] < 0:
            raise argparse.ArgumentTypeError("hours must be >= 0")
    return out


def _seconds_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give MIN,MAX in seconds, e.g. 0.04,0.12"
        ) from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= MIN <= MAX")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="corpus directory (created; resumed if it exists)")
    p.add_argument(
        "--hours",
        type=parse_hours,
        default=None,
        help="hours per stage, e.g. tts=2,asr=2,pairs=1,conversations=3,duplex=4 (the default; "
        "stages not named are not made)",
    )
    p.add_argument("--split", choices=["train", "eval"], default="train", help="voices and values")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--codec", default="default", help="codec name or .safetensors (default)")
    p.add_argument("--workers", type=int, default=1, help="processes (one core each)")
    p.add_argument("--shard-minutes", type=float, default=20.0, help="audio per shard (20)")
    p.add_argument("--max-turns", type=int, default=200, help="longest conversation (200)")
    p.add_argument("--channel", type=float, default=0.0, help="share through a random mic (0)")
    p.add_argument(
        "--warp",
        type=float,
        default=0.0,
        help="each conversation's user voice plays at a speed in [1 - W, 1 + W] (0: off; e.g. "
        "0.12): pitch and formants move with it, new speakers from the same voices",
    )
    p.add_argument(
        "--barge-stop",
        type=_seconds_range,
        default=G.BARGE_STOP,
        metavar="MIN,MAX",
        help="seconds from a barge-in to the model's silence (0.04,0.12; before 2026-11-30 "
        "0.08,0.18)",
    )
    p.add_argument("--stats", type=Path, metavar="DIR", help="print a corpus's table and exit")


def run(args: argparse.Namespace) -> int:
    if args.stats is not None:
        if not (args.stats / "manifest.json").exists():
            print(f"duplex data conversations: no manifest.json in {args.stats}", file=sys.stderr)
            return 2
        print(stats(read_manifest(args.stats)))
        return 0
    if not 0 <= args.warp < 0.5:
        print(
            f"duplex data conversations: --warp must be in [0, 0.5), not {args.warp}",
            file=sys.stderr,
        )
        return 2
    if args.out is None:
        print("duplex data conversations: --out DIR is required (or --stats DIR)", file=sys.stderr)
        return 2
    try:
        manifest = build(
            args.out,
            args.hours or DEFAULT_HOURS,
            args.split,
            args.seed,
            args.codec,
            args.workers,
            args.shard_minutes,
            args.max_turns,
            channel=args.channel,
            barge_stop=args.barge_stop,
            warp=args.warp,
        )
    except (ValueError, RuntimeError) as e:
        print(f"duplex data conversations: {e}", file=sys.stderr)
        return 2
    print(stats(manifest))
    return 0
