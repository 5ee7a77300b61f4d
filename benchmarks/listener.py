"""Is the listener limited by what it hears or by its own fed-back transcript (exposure bias)?

The model writes its transcript of the user one byte per frame and reads each byte back at the
next frame. In training the byte read back is always the corpus's (teacher forcing); in a
session it is the model's own, and one misheard byte may derail the rest of a word. This script
runs the same held-out crops both ways and compares the word error rates of the transcript:

- teacher-forced: every frame reads the true previous byte (the parallel training form), and
  the byte scored is its best guess at each frame where the corpus writes one;
- free-running: every frame reads the byte the model itself wrote at the frame before (argmax),
  through the streaming form, while the model's own text and audio stay the corpus's, so only
  the transcript's feedback differs;
- own bytes, corpus timing: free-running, but a byte is written exactly where the corpus writes
  one (the model's best non-PAD byte there, PAD elsewhere) and read back;
- free-running, PAD apart: a byte is written where writing one is more likely than not (the
  bytes' summed probability against PAD), then the best byte; plain argmax writes only where
  the single best byte beats PAD, so an uncertain letter is written late or not at all;
- doubled first letters: words of the free-running transcript that begin with the same letter
  twice ("nnick"), per 100 reference words (the references' own count beside it): a letter
  written early, read back, and written again at the corpus's frame.

A free-running WER far above the teacher-forced one says the errors feed themselves (what
`--transcript-noise` trains against); two close ones say the listener mishears the audio itself.
The third figure splits the gap: near teacher-forced, the free-running errors are timing (when
to write, how many bytes); near free-running, they are its own misheard bytes read back.

    PYTHONPATH=. .venv/bin/python benchmarks/listener.py MODEL [MODEL ...] --corpus DIR

Writes benchmarks/results/listener.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from held_out import model_and_crops

OUT = Path(__file__).resolve().parent / "results"


def words(ids: list[int]) -> list[str]:
    from duplex.apps.eval_talk_loop import decode_ids
    from duplex.data import domain as D

    return D.normalize(decode_ids(ids)).split()


def probe(path: str, corpus: Path, crops: int, seq_len: int, rows: int = 8) -> dict:
    """Word errors of the transcript of `crops` held-out crops, teacher-forced and free-running."""
    from duplex.data.asr import word_errors
    from duplex.model.tokenizer import PAD

    model, data = model_and_crops(path, corpus, seq_len, seed=321)
    n = {k: 0 for k in ("words", "teacher_forced", "free_running", "own_bytes_corpus_timing")}
    n["pad_apart"] = n["doubled"] = n["doubled_ref"] = 0
    with torch.no_grad():
        for s in range(0, crops, rows):
            batch = {k: v for k, v in data.batch(s, slice(0, rows)).items() if k != "stage"}
            logits, _ = model(batch)
            # Teacher-forced, the byte it writes where the corpus writes one (its best non-PAD
            # byte): what it recognises given the true past, timing set aside (an argmax of
            # every frame would count a byte written a frame early twice).
            scores = logits.user_text.clone()
            scores[..., PAD] = float("-inf")
            truth = batch["user_text"]
            forced = torch.where(truth != PAD, scores.argmax(-1), truth)
            inputs = model.shift_inputs(batch)
            B, T = batch["user_text"].shape
            # Rows 0..B-1 run free, B..2B-1 write their own bytes at the corpus's frames,
            # 2B..3B-1 run free deciding PAD apart.
            two = {k: torch.cat([v, v, v]) for k, v in inputs.items()}
            audio = torch.cat([batch["user_audio"]] * 3)
            own = torch.empty(3 * B, T, dtype=torch.long)
            prev = torch.full((3 * B,), PAD, dtype=torch.long)
            with model.streaming(3 * B):
                for t in range(T):
                    out = model.step(
                        audio[:, t], two["prev_audio"][:, t], two["prev_text"][:, t], prev
                    )
                    best = out.user_text.clone()
                    best[:, PAD] = float("-inf")
                    timed = torch.where(truth[:, t] != PAD, best[B : 2 * B].argmax(-1), PAD)
                    lg = out.user_text[2 * B :]
                    write = best[2 * B :].logsumexp(-1) > lg[:, PAD]
                    apart = torch.where(write, best[2 * B :].argmax(-1), PAD)
                    prev = torch.cat([out.user_text[:B].argmax(-1), timed, apart])
                    own[:, t] = prev
            for r in range(B):
                ref = words(batch["user_text"][r].tolist())
                n["words"] += len(ref)
                n["teacher_forced"] += word_errors(ref, words(forced[r].tolist()))
                free = words(own[r].tolist())
                n["free_running"] += word_errors(ref, free)
                n["doubled"] += sum(len(x) > 1 and x[0] == x[1] for x in free)
                n["doubled_ref"] += sum(len(x) > 1 and x[0] == x[1] for x in ref)
                n["own_bytes_corpus_timing"] += word_errors(ref, words(own[B + r].tolist()))
                n["pad_apart"] += word_errors(ref, words(own[2 * B + r].tolist()))
    w = max(n["words"], 1)
    return {
        "words": n["words"],
        "wer_teacher_forced": n["teacher_forced"] / w,
        "wer_free_running": n["free_running"] / w,
        "wer_own_bytes_corpus_timing": n["own_bytes_corpus_timing"] / w,
        "wer_free_running_pad_apart": n["pad_apart"] / w,
        "doubled_first_letters_per_100_words": 100 * n["doubled"] / w,
        "doubled_first_letters_in_references": n["doubled_ref"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model names or .safetensors files")
    ap.add_argument("--corpus", type=Path, required=True, help="held-out corpus (split eval)")
    ap.add_argument("--crops", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=OUT / "listener.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {m: probe(m, args.corpus, args.crops, args.seq_len) for m in args.models}
    head = f"{'model':44s} {'words':>6s} {'WER teacher-forced':>19s} {'WER free-running':>17s}"
    print(
        f"{head} {'own bytes, corpus timing':>25s} {'free-running, PAD apart':>24s}"
        f" {'doubled first letters':>22s}"
    )
    for m, r in results.items():
        name = f"{Path(m).parent.name}/{Path(m).name}" if "/" in m else m
        doubled_ref = r["doubled_first_letters_in_references"]
        print(
            f"{name:44.44s} {r['words']:6d} {100 * r['wer_teacher_forced']:18.1f}% "
            f"{100 * r['wer_free_running']:16.1f}% {100 * r['wer_own_bytes_corpus_timing']:24.1f}%"
            f" {100 * r['wer_free_running_pad_apart']:23.1f}%"
            f" {r['doubled_first_letters_per_100_words']:11.1f} / 100 ({doubled_ref} ref)"
        )
    cfg = {"corpus": str(args.corpus), "crops": args.crops, "seq_len": args.seq_len}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**cfg, "models": results}, indent=1))
    print(f"[listener] {args.json}")


if __name__ == "__main__":
    main()
