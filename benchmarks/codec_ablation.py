"""Ablation of the voiced decoder: its own F0 and voicing versus the original's (an oracle).

Why: the decoder's pitch can only be as good as what the frozen tokens say about pitch. Driving
the same trained filters with F0 and voicing tracked on the original audio (which a real decoder
never has) separates the synthesiser's quality from what is lost predicting F0 from the codes.
Rows: the first decoder (default-v1), the voiced decoder as shipped, the voiced decoder with
oracle F0 and voicing, and the voiced decoder with its F0 but the harmonic source off (noise only).

Run from the repository root:
  python benchmarks/codec_ablation.py --utterances 24
Writes benchmarks/results/codec_ablation.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from duplex import codecs
from duplex.codecs.bench import MelDistance, pesq_wb, pitch_agreement, round_trip, stoi, yin_f0
from duplex.codecs.voice_train import fill_unvoiced, pitch_targets
from duplex.codecs.voiced import VoicedCodec


def decode_with(codec: VoicedCodec, x: np.ndarray, mode: str) -> np.ndarray:
    """Round trip of x [T] with the decoder's own controls ("own"), the original's F0 and
    voicing ("oracle"), or no harmonic source ("noise_only")."""
    T = len(x) - len(x) % codec.frame_size
    wav = torch.from_numpy(x[:T]).float()[None, None]
    with torch.no_grad():
        latent = codec.quantizer.decode(codec.encode(wav))
        dec = codec.decoder
        ctl = dec.controls(latent)
        f0 = torch.exp(ctl.log_f0)
        gate = (torch.sigmoid(ctl.voicing) > dec.cfg.voicing_threshold).to(f0.dtype)
        if mode == "oracle":
            f0_t, v_t = pitch_targets(wav, dec.cfg.synth.hop)
            f0, gate = fill_unvoiced(f0_t, v_t).to(f0.dtype), v_t.to(f0.dtype)
        elif mode == "noise_only":
            gate = torch.zeros_like(gate)
        y = dec.synth(f0, gate, ctl.ceps_h, ctl.ceps_n).float()
    out = np.zeros_like(x)
    out[:T] = y[0, 0].numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", default="default", help="voiced codec (name or .safetensors path)")
    p.add_argument("--utterances", type=int, default=24, help="held-out utterances")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    args = p.parse_args(argv)
    from duplex.data.speech import build_corpus

    torch.set_num_threads(1)
    new = codecs.load(args.codec)
    old = codecs.load("default-v1")
    if not isinstance(new, VoicedCodec):
        raise SystemExit(f"{args.codec} is not a voiced codec")
    corpus = build_corpus("eval", args.utterances, seed=1, sample_rate=new.sample_rate)
    sr = new.sample_rate
    mel = MelDistance(sr)
    rows = ["default-v1", "voiced", "voiced_oracle_f0", "voiced_noise_only"]
    acc: dict[str, dict[str, list]] = {r: {} for r in rows}
    for i in range(len(corpus)):
        x = corpus.utterance(i)
        ref = yin_f0(x)
        outs = {
            "default-v1": round_trip(old, x),
            "voiced": decode_with(new, x, "own"),
            "voiced_oracle_f0": decode_with(new, x, "oracle"),
            "voiced_noise_only": decode_with(new, x, "noise_only"),
        }
        for name, y in outs.items():
            voiced, kept, err = pitch_agreement(ref, yin_f0(y))
            a = acc[name]
            for k, v in (
                ("voiced", voiced),
                ("kept", kept),
                ("cents", err),
                ("mel", mel(x, y)),
                ("stoi", stoi(x, y, sr)),
                ("pesq", pesq_wb(x, y, sr)),
            ):
                a.setdefault(k, []).append(v)
    result: dict = {"utterances": len(corpus), "pitch_judge": "YIN (duplex.codecs.pitch)"}
    print(f"{len(corpus)} held-out utterances; pitch judged by YIN")
    print(
        f"  {'decoder':20s} {'voiced kept':>11s} {'F0 med c':>9s} {'F0 p90 c':>9s} "
        f"{'mel':>7s} {'STOI':>6s} {'PESQ':>6s}"
    )
    for name in rows:
        a = acc[name]
        cents = np.concatenate(a["cents"])
        r = {
            "voiced_kept": round(sum(a["kept"]) / max(sum(a["voiced"]), 1), 4),
            "f0_cents_median": round(float(np.median(cents)), 1) if len(cents) else None,
            "f0_cents_p90": round(float(np.percentile(cents, 90)), 1) if len(cents) else None,
            "mel_distance": round(float(np.mean(a["mel"])), 4),
            "stoi": round(float(np.mean(a["stoi"])), 4),
            "pesq_wb": round(float(np.nanmean(a["pesq"])), 3),
        }
        result[name] = r
        med = "-" if r["f0_cents_median"] is None else f"{r['f0_cents_median']:.0f}"
        p90 = "-" if r["f0_cents_p90"] is None else f"{r['f0_cents_p90']:.0f}"
        print(
            f"  {name:20s} {r['voiced_kept']:11.3f} {med:>9s} {p90:>9s} "
            f"{r['mel_distance']:7.3f} {r['stoi']:6.3f} {r['pesq_wb']:6.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}/codec_ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
