"""`duplex bench codec`: the shipped codec's decoders against each other and the original.

Quality is measured on held-out synthetic speech (voices and sentences never used in training),
for the new decoder ("default"), the first one ("default-v1", same tokens) and, where it makes
sense, a 5 dB white-noise anchor (the original plus noise, to show each judge does notice a
degraded signal):
- pitch, judged by WORLD's DIO + StoneMask (`pyworld`), a tracker independent of the YIN that
  trained the decoder: the share of the original's voiced frames that stay voiced, and the F0
  error in cents on frames voiced in both (median, p90);
- log-mel distance; STOI and wide-band PESQ (`pystoi`, `pesq`);
- intelligibility: pocketsphinx word accuracy on the round trip / on the original
  (closed-vocabulary judge, `duplex.data.asr`).
Speed is the per-frame cost of encode_step + decode_step at batch 1 (p50, p99, against the frame
duration) and frames per second at batch 16, for both decoders (and EnCodec 24 kHz with random
weights: speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from duplex.codecs.base import StreamingCodec

RESULTS = Path("benchmarks/results")

HELP = "codec quality (pitch, mel, STOI, PESQ, ASR ratio) of both decoders, and streaming speed"
DESCRIPTION = """Benchmark the shipped codec's decoders; print a table, write JSON, PNG and a WAV.

Quality on held-out voices and sentences, for --codec (default: the voiced decoder), --baseline
(default-v1: the first decoder of the same tokens) and the original: voiced frames kept and F0
error (cents; judged by pyworld's DIO + StoneMask), log-mel distance, STOI, wide-band PESQ, and
the ratio of pocketsphinx word accuracy on the round trip to that on the original. A 5 dB
white-noise anchor is scored too. Speed: per-frame cost of encode_step + decode_step at batch 1
(p50 and p99 as a share of the frame; targets 25% and 60%) and frames per second at batch 16, on
--threads torch threads (default 1).

Writes benchmarks/results/codec.json, codec_spectrogram.png (original / baseline / new, with F0
tracks) and codec_sample.wav (original, baseline, new, for listening).

Example:
  duplex bench codec
"""

# the targets for the new decoder
TARGETS = {
    "voiced_kept": 0.90,
    "f0_cents_median": 30.0,
    "f0_cents_p90": 100.0,
    "asr_accuracy_ratio": 0.95,
    "p50_share": 0.25,
    "p99_share": 0.60,
    "decoder_mb": 10.0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", default="default", help="codec whose decoder is measured")
    p.add_argument("--baseline", default="default-v1", help="decoder to compare against")
    p.add_argument("--utterances", type=int, default=96, help="held-out utterances for quality")
    p.add_argument("--frames", type=int, default=400, help="timed frames at batch 1")
    p.add_argument("--batch-frames", type=int, default=60, help="timed frames at batch 16")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--no-encodec", action="store_true", help="skip EnCodec speed figures")


def si_snr(est: np.ndarray, ref: np.ndarray) -> float:
    """Scale-invariant signal-to-noise ratio in dB (both signals made zero-mean)."""
    est = est - est.mean()
    ref = ref - ref.mean()
    s = (est @ ref) / max(float(ref @ ref), 1e-12) * ref
    n = est - s
    return float(10 * np.log10(max(float(s @ s), 1e-12) / max(float(n @ n), 1e-12)))


class MelDistance:
    """Mean |log mel(a) - log mel(b)| (80 bands, 64 ms window, 16 ms hop at the codec's rate)."""

    def __init__(self, sample_rate: int) -> None:
        import torchaudio

        n_fft = 1 << int(np.ceil(np.log2(0.064 * sample_rate)))
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=80, power=1.0
        )

    def logmel(self, x: np.ndarray) -> torch.Tensor:
        return torch.log(self.mel(torch.from_numpy(x).float()) + 1e-5)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        return float((self.logmel(a) - self.logmel(b)).abs().mean())


def world_f0(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """F0 in Hz every 5 ms (0 where unvoiced) by WORLD's DIO refined by StoneMask."""
    import pyworld

    xd = x.astype(np.float64)
    f0, t = pyworld.dio(xd, sample_rate, f0_floor=55.0, f0_ceil=500.0, frame_period=5.0)
    return pyworld.stonemask(xd, f0, t, sample_rate)


def yin_f0(x: np.ndarray) -> np.ndarray:
    """F0 every 5 ms by the YIN tracker that made the training targets (strict voicing)."""
    from duplex.codecs.pitch import track

    return track(torch.from_numpy(x)).f0.numpy()


def pitch_agreement(ref: np.ndarray, deg: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(voiced frames of ref, those voiced in deg too, |cents| error on frames voiced in both)."""
    n = min(len(ref), len(deg))
    a, b = ref[:n], deg[:n]
    va, both = a > 0, (a > 0) & (b > 0)
    return int(va.sum()), int(both.sum()), np.abs(1200 * np.log2(b[both] / a[both]))


def stoi(ref: np.ndarray, deg: np.ndarray, sample_rate: int) -> float:
    from pystoi import stoi as _stoi

    return float(_stoi(ref, deg, sample_rate, extended=False))


def pesq_wb(ref: np.ndarray, deg: np.ndarray, sample_rate: int) -> float:
    """Wide-band PESQ (MOS-LQO); NaN when PESQ finds no speech to compare."""
    from pesq import pesq

    try:
        return float(pesq(sample_rate, ref, deg, "wb"))
    except Exception:
        return float("nan")


def round_trip(codec: StreamingCodec, x: np.ndarray) -> np.ndarray:
    """Offline encode + decode of mono x [T] -> [T]."""
    with torch.no_grad():
        t = torch.from_numpy(x).float()[None, None]
        y = codec.decode(codec.encode(t))
    return y[0, 0, : len(x)].numpy()


def quality(decoders: dict[str, StreamingCodec], n: int) -> tuple[dict, list[dict]]:
    """Quality of each decoder (and the noise anchor) on `n` held-out utterances.

    Returns the summary per signal and, for the first three utterances, the audio and F0 tracks
    for the plot and the listening sample.
    """
    from duplex.data.asr import Judge, word_accuracy
    from duplex.data.speech import build_corpus

    sr = next(iter(decoders.values())).sample_rate
    corpus = build_corpus("eval", n, seed=1, sample_rate=sr)
    judge = Judge()
    mel = MelDistance(sr)
    rng = np.random.default_rng(0)
    names = [*decoders, "noisy_5db"]
    rows: dict[str, dict[str, list]] = {k: {} for k in [*names, "original"]}
    keep: list[dict] = []

    def add(name: str, key: str, value) -> None:
        rows[name].setdefault(key, []).append(value)

    for i in range(len(corpus)):
        x = corpus.utterance(i)
        text = corpus.meta[i]["text"]
        noise = rng.normal(0, 1, len(x)).astype(np.float32)
        noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (5 / 10))
        signals = {name: round_trip(c, x) for name, c in decoders.items()}
        signals["noisy_5db"] = x + noise
        f0_ref = world_f0(x, sr)
        yin_ref = yin_f0(x)
        add("original", "asr", word_accuracy(text, judge.transcribe(x, sr)))
        tracks = {"original": f0_ref}
        for name, y in signals.items():
            f0 = world_f0(y, sr)
            tracks[name] = f0
            for judge_name, ref, got in (("", f0_ref, f0), ("_yin", yin_ref, yin_f0(y))):
                voiced, kept, err = pitch_agreement(ref, got)
                add(name, "voiced" + judge_name, voiced)
                add(name, "kept" + judge_name, kept)
                add(name, "cents" + judge_name, err)
            add(name, "mel", mel(x, y))
            add(name, "stoi", stoi(x, y, sr))
            add(name, "pesq", pesq_wb(x, y, sr))
            add(name, "asr", word_accuracy(text, judge.transcribe(y, sr)))
        if i < 3:
            keep.append(
                {"x": x, "signals": signals, "tracks": tracks, "text": text, **corpus.meta[i]}
            )
    asr_orig = float(np.mean(rows["original"]["asr"]))
    out: dict = {
        "utterances": len(corpus),
        "audio_seconds": round(len(corpus.audio) / sr, 1),
        "eval_voices": "held out: accent en-us-nyc, variants unused in training",
        "pitch_judge": "pyworld DIO + StoneMask, 5 ms frames, 55-500 Hz",
        "pitch_judge_yin": "duplex.codecs.pitch (YIN, the training tracker; stricter voicing)",
        "asr_word_accuracy_original": round(asr_orig, 4),
    }
    for name in names:
        r = rows[name]
        out[name] = {}
        for j in ("", "_yin"):
            cents = np.concatenate(r["cents" + j])
            out[name] |= {
                "voiced_kept" + j: round(sum(r["kept" + j]) / max(sum(r["voiced" + j]), 1), 4),
                "f0_cents_median" + j: round(float(np.median(cents)), 1) if len(cents) else None,
                "f0_cents_p90" + j: round(float(np.percentile(cents, 90)), 1)
                if len(cents)
                else None,
            }
        out[name] |= {
            "mel_distance": round(float(np.mean(r["mel"])), 4),
            "stoi": round(float(np.mean(r["stoi"])), 4),
            "pesq_wb": round(float(np.nanmean(r["pesq"])), 3),
            "asr_word_accuracy": round(float(np.mean(r["asr"])), 4),
            "asr_accuracy_ratio": round(float(np.mean(r["asr"])) / max(asr_orig, 1e-9), 4),
        }
    return out, keep


def speed(codec: StreamingCodec, frames: int, batch_frames: int) -> dict:
    """Per-frame streaming cost at batch 1 and throughput at batch 16."""
    F = codec.frame_size
    frame_ms = 1000 * F / codec.sample_rate
    g = torch.Generator().manual_seed(0)
    times, cpu = [], []
    with torch.no_grad(), codec.streaming(1):
        for i in range(frames + 20):
            pcm = 0.1 * torch.randn(1, 1, F, generator=g)
            t0, c0 = time.perf_counter(), time.thread_time()
            codes = codec.encode_step(pcm)
            codec.decode_step(codes)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if i >= 20:
                times.append(dt * 1000)
                cpu.append(dc * 1000)
    p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    # CPU time of this thread: what the work costs when the machine is shared (wall time
    # includes waiting for a core).
    c50, c99 = float(np.percentile(cpu, 50)), float(np.percentile(cpu, 99))
    B = 16
    with torch.no_grad(), codec.streaming(B):
        pcm = 0.1 * torch.randn(B, 1, F, generator=g)
        for _ in range(5):
            codec.decode_step(codec.encode_step(pcm))
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(batch_frames):
            codec.decode_step(codec.encode_step(pcm))
        el, cel = time.perf_counter() - t0, time.thread_time() - c0
    fps = B * batch_frames / el
    return {
        "frame_ms": round(frame_ms, 3),
        "batch1_p50_ms": round(p50, 3),
        "batch1_p99_ms": round(p99, 3),
        "batch1_p50_share_of_frame": round(p50 / frame_ms, 4),
        "batch1_p99_share_of_frame": round(p99 / frame_ms, 4),
        "batch1_cpu_p50_ms": round(c50, 3),
        "batch1_cpu_p99_ms": round(c99, 3),
        "batch16_frames_per_s": round(fps, 1),
        "batch16_realtime_streams": round(fps / codec.frame_rate, 2),
        "batch16_cpu_frames_per_s": round(B * batch_frames / max(cel, 1e-9), 1),
    }


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _plot(path: Path, item: dict, names: list[str], sr: int) -> None:
    """Linear-frequency spectrograms up to 4 kHz (harmonics visible) with DIO's F0 on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("original", item["x"]), *[(n, item["signals"][n]) for n in names]]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(11, 2.5 * (len(panels) + 1)), sharex=True)
    n_fft, hop = 1024, 80
    win = torch.hann_window(n_fft)
    for ax, (name, sig) in zip(axes, panels):
        spec = torch.stft(
            torch.from_numpy(sig).float(), n_fft, hop, window=win, return_complex=True
        )
        db = 20 * torch.log10(spec.abs() + 1e-5).numpy()
        top = int(4000 / (sr / n_fft))
        t_end = len(sig) / sr
        ax.imshow(
            db[:top],
            origin="lower",
            aspect="auto",
            cmap="magma",
            vmin=db.max() - 70,
            extent=(0, t_end, 0, 4000),
        )
        ax.set_ylabel("Hz")
        ax.set_title(f"{name}: spectrogram (1024-point STFT, 0-4 kHz)", fontsize=9)
    ax = axes[-1]
    for (name, _), color in zip(panels, ("black", "tab:orange", "tab:blue")):
        f0 = item["tracks"][name]
        t = np.arange(len(f0)) * 0.005
        ax.plot(t, np.where(f0 > 0, f0, np.nan), color=color, lw=1.2, label=name)
    ax.set_ylabel("F0 (Hz, DIO)")
    ax.set_title("F0 where voiced (pyworld DIO + StoneMask)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("seconds")
    voice = item["voice"]
    fig.suptitle(f"'{item['text']}' ({voice['accent']}+{voice['variant']}, held out)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _size_mb(name: str) -> float | None:
    """Size of the codec's weights file: a shipped name or a .safetensors path."""
    from duplex import codecs

    path = codecs.SHIPPED.get(name, Path(name))
    return round(path.stat().st_size / 2**20, 2) if path.is_file() else None


def _check_targets(q: dict, sp: dict, size_mb: float | None, base: dict, base_name: str) -> dict:
    """The issue's targets for the new decoder: each measured value, its bar, and met or not."""
    new = q["new"]
    checks = {
        "voiced_kept>=0.90": (new["voiced_kept"], new["voiced_kept"] >= TARGETS["voiced_kept"]),
        "f0_cents_median<=30": (
            new["f0_cents_median"],
            new["f0_cents_median"] is not None
            and new["f0_cents_median"] <= TARGETS["f0_cents_median"],
        ),
        "f0_cents_p90<=100": (
            new["f0_cents_p90"],
            new["f0_cents_p90"] is not None and new["f0_cents_p90"] <= TARGETS["f0_cents_p90"],
        ),
        f"mel_distance<{base_name}": (
            new["mel_distance"],
            new["mel_distance"] < base["mel_distance"],
        ),
        "asr_accuracy_ratio>=0.95": (
            new["asr_accuracy_ratio"],
            new["asr_accuracy_ratio"] >= TARGETS["asr_accuracy_ratio"],
        ),
        f"stoi>{base_name}": (new["stoi"], new["stoi"] > base["stoi"]),
        f"pesq_wb>{base_name}": (new["pesq_wb"], new["pesq_wb"] > base["pesq_wb"]),
        "batch1_p50<=25%_of_frame": (
            sp["batch1_p50_share_of_frame"],
            sp["batch1_p50_share_of_frame"] <= TARGETS["p50_share"],
        ),
        "batch1_p99<=60%_of_frame": (
            sp["batch1_p99_share_of_frame"],
            sp["batch1_p99_share_of_frame"] <= TARGETS["p99_share"],
        ),
        "shipped_file<=10MB": (size_mb, size_mb is not None and size_mb <= TARGETS["decoder_mb"]),
    }
    return {k: {"value": v, "met": bool(ok)} for k, (v, ok) in checks.items()}


def run(args: argparse.Namespace) -> int:
    import soundfile as sf

    from duplex import codecs

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    new = codecs.load(args.codec)
    base = codecs.load(args.baseline)
    t0 = time.time()
    q, keep = quality({args.baseline: base, args.codec: new}, args.utterances)
    print(
        f"quality: {q['utterances']} held-out utterances ({q['audio_seconds']} s), "
        f"{time.time() - t0:.0f} s; pitch judged by {q['pitch_judge']}"
    )
    cols = [
        ("voiced_kept", "voiced kept", "{:.3f}"),
        ("f0_cents_median", "F0 med c", "{:.0f}"),
        ("f0_cents_p90", "F0 p90 c", "{:.0f}"),
        ("voiced_kept_yin", "YIN kept", "{:.3f}"),
        ("f0_cents_median_yin", "YIN med c", "{:.0f}"),
        ("mel_distance", "mel dist", "{:.3f}"),
        ("stoi", "STOI", "{:.3f}"),
        ("pesq_wb", "PESQ-WB", "{:.2f}"),
        ("asr_accuracy_ratio", "ASR ratio", "{:.3f}"),
    ]
    print(f"  {'signal':12s}" + "".join(f"{h:>12s}" for _, h, _ in cols))
    for name in (args.baseline, args.codec, "noisy_5db"):
        label = name if len(name) <= 12 else "..." + name[-9:]
        cells = "".join(
            f"{(fmt.format(q[name][k]) if q[name][k] is not None else '-'):>12s}"
            for k, _, fmt in cols
        )
        print(f"  {label:12s}{cells}")
    print(f"  original ASR word accuracy {q['asr_word_accuracy_original']}")
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "load_average_at_start": _load(),
        },
        "quality": q,
        "codecs": {},
    }
    to_time = [(args.baseline, base), (args.codec, new)]
    for name, c in to_time:
        results["codecs"][name] = {
            "sample_rate": c.sample_rate,
            "frame_size": c.frame_size,
            "frame_rate": c.frame_rate,
            "num_codebooks": c.num_codebooks,
            "cardinality": c.cardinality,
            "kbps": round(c.num_codebooks * np.log2(c.cardinality) * c.frame_rate / 1000, 2),
            "parameters": sum(p.numel() for p in c.parameters()),
            "decoder_parameters": sum(p.numel() for p in c.decoder.parameters()),
            "shipped_file_mb": _size_mb(name),
        }
    if not args.no_encodec:
        enc = codecs.load("encodec_24khz", pretrained=False, bandwidth=6.0)
        results["codecs"]["encodec_24khz"] = {
            "sample_rate": enc.sample_rate,
            "frame_size": enc.frame_size,
            "kbps": 6.0,
            "parameters": sum(p.numel() for p in enc.parameters()),
            "weights": "random (speed only)",
        }
        to_time.append(("encodec_24khz", enc))
    print(f"speed (torch threads: {args.threads}; machine load average {_load()})")
    print(
        f"  {'codec':14s} {'frame ms':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 %':>6s} "
        f"{'p99 %':>6s} {'cpu p50':>8s} {'cpu p99':>8s} {'B16 fps':>9s} {'streams':>8s}"
    )
    for name, c in to_time:
        s = speed(c, args.frames, args.batch_frames)
        results["codecs"][name]["speed"] = s
        label = name if len(name) <= 14 else "..." + name[-11:]
        print(
            f"  {label:14s} {s['frame_ms']:8.2f} {s['batch1_p50_ms']:8.2f} "
            f"{s['batch1_p99_ms']:8.2f} {100 * s['batch1_p50_share_of_frame']:6.1f} "
            f"{100 * s['batch1_p99_share_of_frame']:6.1f} "
            f"{s['batch1_cpu_p50_ms']:8.2f} {s['batch1_cpu_p99_ms']:8.2f} "
            f"{s['batch16_frames_per_s']:9.0f} {s['batch16_realtime_streams']:8.1f}"
        )
    targets = _check_targets(
        {"new": q[args.codec]},
        results["codecs"][args.codec]["speed"],
        results["codecs"][args.codec]["shipped_file_mb"],
        q[args.baseline],
        args.baseline,
    )
    results["targets"] = targets
    print(f"targets for {args.codec}:")
    for k, v in targets.items():
        print(f"  {k:30s} {v['value']!s:>10s}  {'met' if v['met'] else 'MISSED'}")
    (args.out / "codec.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(args.out / "codec_spectrogram.png", keep[0], [args.baseline, args.codec], new.sample_rate)
    gap = np.zeros(int(0.4 * new.sample_rate), np.float32)
    parts = []
    for item in keep[:2]:
        for sig in (item["x"], item["signals"][args.baseline], item["signals"][args.codec]):
            parts += [sig, gap]
        parts.append(gap)
    sf.write(args.out / "codec_sample.wav", np.concatenate(parts), new.sample_rate, "PCM_16")
    print(f"wrote {args.out}/codec.json, codec_spectrogram.png, codec_sample.wav")
    return 0
