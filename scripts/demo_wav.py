"""Make duplex/assets/hello.wav, the demo's spoken requests: a held-out voice (one training never
used) asks the shipped model a few things from TALK-DOMAIN.md, with room for each answer.

    .venv/bin/python scripts/demo_wav.py [--out duplex/assets/hello.wav] [--seed 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import soundfile as sf

from duplex.data import dialogue as G

REQUESTS = ("hello", "my name is ada", "what is my name", "say banana")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="duplex/assets/hello.wav")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--rate", type=int, default=16000)
    args = ap.parse_args()
    voice = G.user_voice(np.random.default_rng(args.seed), "eval")
    bank = G.WordBank(args.rate)
    gap = np.zeros(int(0.08 * args.rate), np.float32)
    answer_room = np.zeros(int(3.0 * args.rate), np.float32)
    parts = [np.zeros(int(0.5 * args.rate), np.float32)]
    for request in REQUESTS:
        for w in request.split():
            parts += [bank.word(voice, w), gap]
        parts.append(answer_room)
    audio = np.concatenate(parts)
    sf.write(args.out, 0.7 * audio / max(1e-9, float(np.abs(audio).max())), args.rate)
    print(f"{args.out}: {len(audio) / args.rate:.1f} s, voice {voice}")


if __name__ == "__main__":
    main()
