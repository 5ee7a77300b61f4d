"""Does the model copy what it heard? The first byte of a value, teacher-forced.

An answer such as "okay, seven hundred ninety six." or "nice to meet you, grace." must take its
value from the user's words; nothing before the value's first byte says which it is except what
was heard. Measured through `duplex eval talk`, the shipped models wrote the template and then a
wrong first word ("okay, three hundred eighty five." for "eight hundred eighty five"), the rest
continued by the read from the matched user words. This script isolates that step: on crops of a
held-out corpus, teacher-forced, the probability the model gives the right first byte of the
value after each cue, given that a byte is written (PAD left out: when to write is timing), and
how often it is the argmax. Only values the user said earlier in the same crop count (a crop may
start after the question, and the text-to-speech stage says answers to no one): those are the
ones a model can copy. Guessing from the prior gives about 0.03 for a name and 0.15-0.2 for a
number's first letter; copying gives near 1.

    PYTHONPATH=. .venv/bin/python benchmarks/value_copy.py MODEL [MODEL ...] [--corpus DIR]

Values asked back ("your name is ", "the number was ", "your favorite color is ") were told
about a minute earlier; to count them, crops must be that long and begin with the conversation:
`--seq-len 3000 --from-start 1 --crops 96`.

With a copy head the pointer's own probability of the byte, how often it is the pointer's
first choice, and the gate are reported too (does it find the value, does the gate let it in),
and the same figures over every other byte the model writes (what copying costs elsewhere: a
gate taught to open half way on template bytes gained at values teacher-forced and lost the
conversation through the loop, talk19g in docs/training.md).

Without --corpus a small held-out corpus (split eval, seed 0) is made in a temporary folder
(about a minute). Writes benchmarks/results/value_copy.json.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import torch
from held_out import model_and_crops

OUT = Path(__file__).resolve().parent / "results"

# The byte after each cue in the model's own text, and what it is.
CUES = {
    "okay, ": "number told (first byte)",
    "meet you, ": "name told (first byte)",
    "number was ": "number asked back",
    "name is ": "name asked back",
    "color is ": "colour asked back",
    "food is ": "food asked back",
    "hundred ": "after 'hundred' (continuation)",
}
# Every other byte the model writes (templates, words it answers with): copying must not cost
# these what it gains at values.
OTHER = "every other byte"


def probe(path: str, corpus: Path, crops: int, seq_len: int, from_start: float = 0.0) -> dict:
    """Teacher-forced first-byte statistics of one model on `crops` crops of `corpus`."""
    from duplex.model.tokenizer import PAD

    model, data = model_and_crops(path, corpus, seq_len, seed=123, from_start=from_start)
    stats = {c: {"n": 0, "argmax": 0, "p": 0.0} for c in [*CUES, OTHER]}
    # With a copy head: its pointer and gate at the same bytes, recorded from inside the
    # forward pass (whether the pointer finds the value, and whether the gate lets it through).
    seen: dict[str, torch.Tensor] = {}
    if model.copy is not None:
        head, mix = model.copy, model.copy.mix

        def recording_mix(h, logits, ptr):
            seen["p_copy"], seen["gate"] = ptr.p, torch.sigmoid(head.gate_logit(h, ptr))
            return mix(h, logits, ptr)

        head.mix = recording_mix
        for st in stats.values():
            st.update(pointer_p=0.0, pointer_top=0, gate=0.0)

    def tally(st: dict, prob: torch.Tensor, r: int, t: int, byte: int) -> None:
        st["n"] += 1
        st["argmax"] += int(prob[r, t].argmax() == byte)
        st["p"] += float(prob[r, t, byte])
        if seen:
            pc = seen["p_copy"][r, t]
            st["pointer_p"] += float(pc[byte])
            st["pointer_top"] += int(pc.argmax() == byte)
            st["gate"] += float(seen["gate"][r, t])

    with torch.no_grad():
        for s in range(0, crops, 4):
            batch = {k: v for k, v in data.batch(2000 + s, slice(0, 4)).items() if k != "stage"}
            logits, _ = model(batch)
            # prob: [B, T, Vt]; logits at frame t predict model_text[t]
            # The byte written, given that one is written now: when to write is timing, which
            # this does not measure (a model unsure of the frame still writes the right byte).
            prob = logits.text.float().softmax(-1)
            prob[..., PAD] = 0
            prob = prob / prob.sum(-1, keepdim=True)
            for r, row in enumerate(batch["model_text"].tolist()):
                frames = [t for t, x in enumerate(row) if x != PAD and x < 256]
                text = bytes(row[t] for t in frames).decode("latin-1")
                urow = batch["user_text"][r].tolist()
                values: set[int] = set()
                for cue in CUES:
                    at = text.find(cue)
                    while at >= 0 and at + len(cue) < len(frames):
                        t = frames[at + len(cue)]
                        word = re.split(r"[ .,?]", text[at + len(cue) :])[0]
                        heard = bytes(x for x in urow[:t] if x != PAD and x < 256)
                        # Only values the user said earlier in the crop can be copied.
                        if not word or word.encode() not in heard:
                            at = text.find(cue, at + len(cue))
                            continue
                        values.add(t)
                        tally(stats[cue], prob, r, t, row[t])
                        at = text.find(cue, at + len(cue))
                for t in frames:
                    if t not in values:
                        tally(stats[OTHER], prob, r, t, row[t])
    return {
        CUES.get(c, c): {k: x / max(v["n"], 1) if k != "n" else x for k, x in v.items()}
        for c, v in stats.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model names or .safetensors files")
    ap.add_argument("--corpus", type=Path, help="held-out corpus (split eval)")
    ap.add_argument("--crops", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--from-start",
        type=float,
        default=0.0,
        help="share of crops that begin a conversation (with --seq-len 3000: values asked "
        "back a minute after they were told, in the crop)",
    )
    ap.add_argument("--json", type=Path, default=OUT / "value_copy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="duplex-value-copy-") as tmp:
        corpus = args.corpus
        if corpus is None:
            from duplex.data import conversations as C

            corpus = Path(tmp) / "eval"
            C.build(corpus, {"conversations": 0.3, "duplex": 0.3}, split="eval", workers=2)
        results = {
            m: probe(m, corpus, args.crops, args.seq_len, args.from_start) for m in args.models
        }
    names = [*CUES.values(), OTHER]
    print(f"{'model':40s} " + " ".join(f"{n[:24]:>26s}" for n in names))
    for m, res in results.items():
        cells = " ".join(
            f"{res[n]['p']:>9.2f} p {res[n]['argmax']:4.2f} top (n {res[n]['n']:5d})" for n in names
        )
        print(f"{Path(m).parent.name + '/' + Path(m).name if '/' in m else m:40.40s} {cells}")
        if "gate" in res[names[0]]:
            cells = " ".join(
                f"{r['pointer_p']:>5.2f} ptr {r['pointer_top']:4.2f} gate {r['gate']:.3f}"
                for r in (res[n] for n in names)
            )
            print(f"{'  its copy head: pointer p, top, gate':40.40s} {cells}")
    out = args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"corpus": str(args.corpus), "crops": args.crops, "seq_len": args.seq_len}
    cfg["from_start"] = args.from_start
    out.write_text(json.dumps({**cfg, "models": results}, indent=1))
    print(f"[value_copy] {out}")


if __name__ == "__main__":
    main()
