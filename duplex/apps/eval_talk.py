"""`duplex eval talk`: judge a talking model the way a listener would, through the real loop.

Held-out conversations (voices, numbers and arithmetic problems training never sees) are spoken
into the same path `duplex talk --input` uses: the user's audio is cut into frames, encoded by
the codec, stepped through the model, and its sampled tokens are decoded to audio. Nothing is
teacher-forced. From what comes out:

- listening: word error rate of the model's transcript of the user;
- answers: the model's text (inner monologue) after each request against the canonical answer,
  per intent, and fact questions by how long ago the fact was told (1, 10, 60 minutes);
- speaking: a closed-vocabulary pocketsphinx (`duplex.data.asr.Judge`) on the model's audio
  against the answer, beside the same judge on the answer spoken by the model voice through the
  codec (the ceiling);
- timing, from the audio: reply latency (end of user speech -> start of model speech), pause
  takeovers, barge-in stop latency, talk-through of acknowledgements, speech when nobody asked;
- state as a system prompt: facts told, the state saved, a new session from the file asked.

Two scripted models validate the evaluator: `oracle` emits the reference answers (the model
voice's codes and text of the script) and must score near the ceiling; `silent` emits silence
and must score near zero, as must an untrained model.

The parts live beside this module, one noun each: `eval_talk_suite` (the held-out dialogues),
`eval_talk_script` (the scripted models), `eval_talk_loop` (the conversation driver),
`eval_talk_score` (the listener and the judge) and `eval_talk_report` (pooled report, table,
chart). This module holds the run (`EvalConfig`, `evaluate`) and the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from duplex.apps.eval_talk_loop import Heard, decode_ids, run_dialogues
from duplex.apps.eval_talk_report import plot, summarise, table
from duplex.apps.eval_talk_score import ceiling, judge_speaking, score_dialogue
from duplex.apps.eval_talk_script import SCRIPTED, ScriptedLM, script_for
from duplex.apps.eval_talk_suite import state_prompt_dialogues, suite
from duplex.data import dialogue as G
from duplex.data import domain as D

# The names tests and training import from here, whichever part now holds them.
__all__ = [
    "SCRIPTED",
    "EvalConfig",
    "Heard",
    "ScriptedLM",
    "ceiling",
    "decode_ids",
    "evaluate",
    "judge_speaking",
    "plot",
    "run_dialogues",
    "score_dialogue",
    "script_for",
    "state_prompt_dialogues",
    "suite",
    "summarise",
    "table",
]


@dataclass
class EvalConfig:
    """What `eval talk` runs."""

    model: str = "default"
    codec: str = "default"
    conversations: int = 4
    turns: int = 16
    minutes: tuple[float, ...] = (1.0, 10.0, 60.0)
    seed: int = 0
    judge_max: int = 48
    state_prompt: bool = True
    temperature: float | None = None
    transcript_temperature: float = 0.0
    speak_temperature: float | None = 0.7


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run the whole evaluation; returns the report (also what --json writes)."""
    from tqdm import tqdm

    from duplex import codecs
    from duplex.data.asr import Judge
    from duplex.model import duplex_lm
    from duplex.streamer.engine import Engine, SamplingConfig

    t_start = time.perf_counter()
    codec = codecs.load(cfg.codec)
    scripted = cfg.model in SCRIPTED
    model = ScriptedLM() if scripted else duplex_lm.load(cfg.model)
    # The engine streams its codec; scripts and the ceiling need one of their own.
    offline = codecs.load(cfg.codec)
    sampling = SamplingConfig(
        seed=cfg.seed,
        transcript_temperature=cfg.transcript_temperature,
        speak_temperature=cfg.speak_temperature,
    )
    if cfg.temperature is not None:
        sampling.temperature = sampling.text_temperature = cfg.temperature
    bank = G.WordBank(codec.sample_rate)
    dialogues = suite(cfg, bank)
    if cfg.state_prompt:
        first, second = state_prompt_dialogues(bank, cfg.seed)
    audio_s = sum(d.duration for _, d in dialogues)
    longest = max((d.duration for _, d in dialogues), default=0.0)
    bar = tqdm(
        total=round(longest),
        bar_format="{l_bar}{bar}| {n:.0f}/{total} s of audio",
        unit="s",
        disable=not progress,
        desc=f"eval talk {cfg.model}",
    )
    script = {"scripted": model if scripted else None, "script_codec": offline, "kind": cfg.model}
    with Engine(model, codec, slots=len(dialogues)) as engine:
        heard = run_dialogues(
            engine, [d for _, d in dialogues], sampling, on_progress=bar.update, **script
        )
        heard_by = {name: h for (name, _), h in zip(dialogues, heard, strict=True)}
        results = [
            score_dialogue(d, h, "facts" if name == "facts" else "chat")
            for (name, d), h in zip(dialogues, heard, strict=True)
        ]
        for (name, _), r in zip(dialogues, results, strict=True):
            for a in r["answers"]:
                a["dialogue"] = name
        timing = {name: {"audio_s": d.duration} for name, d in dialogues}
        loop_s = heard[0].seconds if heard else 0.0
        state_answers = []
        if cfg.state_prompt:
            with tempfile.TemporaryDirectory(prefix="duplex-eval-") as tmp:
                path = str(Path(tmp) / "prompt.dstate")
                run_dialogues(engine, [first], sampling, saves=[path], **script)
                (h2,) = run_dialogues(engine, [second], sampling, states=[path], **script)
            loop_s += h2.seconds
            state_answers = score_dialogue(second, h2, "state")["answers"]
    bar.close()
    judge = Judge(D.vocabulary())
    items = [(n, a, s0, s1) for (n, _), r in zip(dialogues, results) for a, s0, s1 in r["speaking"]]
    if len(items) > cfg.judge_max:
        # An even spread over the conversations; the ceiling hears the very same answers.
        idx = np.linspace(0, len(items) - 1, cfg.judge_max).round().astype(int)
        items = [items[i] for i in idx]
    spoken = judge_speaking(items, heard_by, judge)
    answers = [a for r in results for a in r["answers"]]
    ceil = ceiling([it[1] for it in items], offline, judge)
    report = summarise(cfg, results, answers, state_answers, spoken, ceil)
    report["runs"] = timing
    report["seconds"] = {
        "audio": audio_s,
        "wall": time.perf_counter() - t_start,
        "loop": loop_s,
        "longest_dialogue_audio": longest,
    }
    report["config"] = asdict(cfg)
    return report


HELP = "score a talking model on held-out spoken conversations through the real loop"
DESCRIPTION = """Score a model the way a listener would, on held-out conversations.

Held-out voices (an accent and variants training never uses), numbers and arithmetic problems are
spoken into the real loop (codec in, model step, codec out, as `duplex talk --input`). Reported:
user transcript WER; answers correct in the model's text, per intent and for facts asked 1, 10
and 60 minutes after being told; a closed-vocabulary recogniser on the model's speech against the
same recogniser on the model voice through the codec (the ceiling); reply latency p50/p90, pause
takeovers, barge-in stops within 200 ms, talk-through of acknowledgements, speech when nobody
asked; and a state saved after facts were told, reloaded in a new session and asked.

--model oracle (the reference answers, scripted) and --model silent validate the evaluator:
the oracle scores near the ceiling, silence near zero. The 60-minute fact question runs an hour
of audio through the loop (minutes on this CPU); --minutes 1,10 is quicker.

Examples:
  duplex eval talk                                 the shipped model (default, trained)
  duplex eval talk --model oracle --minutes 1,10
  duplex eval talk --model runs/m1/model.safetensors --json out.json --png out.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="model name, .safetensors, oracle or silent (default)"
    )
    p.add_argument("--codec", default="default", help="codec name or .safetensors")
    p.add_argument("--conversations", type=int, default=4, help="held-out conversations (4)")
    p.add_argument("--turns", type=int, default=16, help="most turns per conversation (16)")
    p.add_argument(
        "--minutes",
        default="1,10,60",
        help="fact distances in minutes (default 1,10,60; empty for none)",
    )
    p.add_argument("--seed", type=int, default=0, help="which held-out conversations (0)")
    p.add_argument("--judge-max", type=int, default=48, help="spoken answers judged (48)")
    p.add_argument("--no-state", action="store_true", help="skip the saved-state check")
    p.add_argument("--temperature", type=float, help="sampling temperature (text and audio)")
    p.add_argument(
        "--transcript-temperature",
        type=float,
        default=0.0,
        help="temperature of the model's transcript of the user (0: greedy, as talk and serve)",
    )
    p.add_argument(
        "--speak-temperature",
        type=speak_temperature,
        default=0.7,
        help="temperature of the choice whether to write a text byte at all (0.7, as talk and "
        "serve; 1: the model's own odds); 'joint' draws PAD among the bytes at the text "
        "temperature, as sessions did before",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--json", type=Path, help="write the report here (default under benchmarks/)")
    p.add_argument("--png", type=Path, help="write the bar chart here")


def speak_temperature(value: str) -> float | None:
    """--speak-temperature: a temperature >= 0, or 'joint' (None: the draw before the split)."""
    if value.strip().lower() == "joint":
        return None
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a temperature >= 0 or 'joint', not {value!r}") from None
    if t < 0:
        raise argparse.ArgumentTypeError(f"a temperature >= 0 or 'joint', not {value!r}")
    return t


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    try:
        minutes = tuple(float(x) for x in args.minutes.split(",") if x.strip())
    except ValueError:
        print(f"duplex eval talk: --minutes must be numbers, got {args.minutes!r}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        args.model,
        args.codec,
        args.conversations,
        args.turns,
        minutes,
        args.seed,
        args.judge_max,
        not args.no_state,
        args.temperature,
        args.transcript_temperature,
        args.speak_temperature,
    )
    try:
        report = evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"duplex eval talk: {e}", file=sys.stderr)
        return 2
    print(table(report))
    stem = Path(str(args.model)).stem.replace("/", "_")
    out = args.json or Path("benchmarks/results") / f"eval_talk_{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    png = args.png or out.with_suffix(".png")
    plot(report, png)
    print(f"[eval] {out} {png}")
    return 0
