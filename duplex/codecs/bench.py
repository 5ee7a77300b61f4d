"""`duplex bench codec`: quality of the shipped codec and streaming speed of both codecs.

Quality is measured on held-out synthetic speech (voices and sentences never used in training):
log-mel distance and SI-SNR between original and round trip, and intelligibility as the
pocketsphinx word accuracy on the round trip divided by that on the original (closed-vocabulary
judge, `duplex.data.asr`). Speed is the per-frame cost of encode_step + decode_step at batch 1
(p50, p99, against the frame duration) and frames per second at batch 16, for the shipped codec
and EnCodec 24 kHz (random weights: speed does not depend on the weights).
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

HELP = "codec quality (mel distance, SI-SNR, ASR word accuracy ratio) and streaming speed"
DESCRIPTION = """Benchmark the codecs; print a table and write JSON, PNG and a WAV sample.

Quality (shipped codec, held-out voices and sentences): log-mel L1 distance, SI-SNR (dB), and the
ratio of pocketsphinx word accuracy on the round trip to that on the original (target >= 0.9).
Speed (shipped codec and EnCodec 24 kHz at 6 kbps with random weights): per-frame cost of
encode_step + decode_step at batch 1 (p50 and p99 as a share of the frame duration; targets 25% and
60%) and frames per second at batch 16. Runs on --threads torch threads (default 1).

Writes benchmarks/results/codec.json, codec_spectrogram.png and codec_sample.wav (original then
round trip, for listening).

Example:
  duplex bench codec
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", default="default", help="codec to measure for quality")
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


def round_trip(codec: StreamingCodec, x: np.ndarray) -> np.ndarray:
    """Offline encode + decode of mono x [T] -> [T]."""
    with torch.no_grad():
        t = torch.from_numpy(x).float()[None, None]
        y = codec.decode(codec.encode(t))
    return y[0, 0, : len(x)].numpy()


def quality(codec: StreamingCodec, n: int) -> tuple[dict, dict]:
    """Quality metrics on `n` held-out utterances; also returns audio for the plot and sample."""
    from duplex.data.asr import Judge, word_accuracy
    from duplex.data.speech import build_corpus

    corpus = build_corpus("eval", n, seed=1, sample_rate=codec.sample_rate)
    judge = Judge()
    mel = MelDistance(codec.sample_rate)
    rows = []
    keep: dict = {}
    rng = np.random.default_rng(0)
    for i in range(len(corpus)):
        x = corpus.utterance(i)
        y = round_trip(codec, x)
        text = corpus.meta[i]["text"]
        acc_o = word_accuracy(text, judge.transcribe(x, codec.sample_rate))
        acc_c = word_accuracy(text, judge.transcribe(y, codec.sample_rate))
        # anchor: the original with white noise at 5 dB SNR, to show the judge does notice a
        # degraded signal (its accuracy ratio should fall well below 1)
        noise = rng.normal(0, 1, len(x)).astype(np.float32)
        noise *= np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (5 / 10))
        acc_n = word_accuracy(text, judge.transcribe(x + noise, codec.sample_rate))
        rows.append((mel(x, y), si_snr(y, x), acc_o, acc_c, acc_n))
        if i < 3:
            keep[i] = (x, y, text, corpus.meta[i]["voice"])
    a = np.array(rows)
    out = {
        "utterances": len(rows),
        "audio_seconds": round(len(corpus.audio) / codec.sample_rate, 1),
        "mel_distance": round(float(a[:, 0].mean()), 4),
        "si_snr_db": round(float(a[:, 1].mean()), 2),
        "si_snr_db_median": round(float(np.median(a[:, 1])), 2),
        "asr_word_accuracy_original": round(float(a[:, 2].mean()), 4),
        "asr_word_accuracy_round_trip": round(float(a[:, 3].mean()), 4),
        "asr_accuracy_ratio": round(float(a[:, 3].mean() / max(a[:, 2].mean(), 1e-9)), 4),
        "anchor_noisy_5db_accuracy_ratio": round(
            float(a[:, 4].mean() / max(a[:, 2].mean(), 1e-9)), 4
        ),
        "note": (
            "SI-SNR is strongly negative because the decoder generates its own phase (no "
            "waveform matching); mel distance and the ASR ratio measure what is kept"
        ),
        "eval_voices": "held out: accent en-us-nyc, variants unused in training",
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


def _plot(path: Path, x: np.ndarray, y: np.ndarray, sr: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel = MelDistance(sr)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, sig, name in ((axes[0], x, "original"), (axes[1], y, "decoded (round trip)")):
        m = mel.logmel(sig).numpy()
        ax.imshow(m, origin="lower", aspect="auto", cmap="magma", vmin=m.max() - 12)
        ax.set_ylabel("mel band")
        ax.set_title(name)
    axes[1].set_xlabel("frame (16 ms hop)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import soundfile as sf

    from duplex import codecs

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    codec = codecs.load(args.codec)
    t0 = time.time()
    q, keep = quality(codec, args.utterances)
    print(
        f"quality ({codec.name}, {q['utterances']} held-out utterances, {time.time() - t0:.0f} s)"
    )
    for k, v in q.items():
        print(f"  {k:32s} {v}")
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "load_average_at_start": _load(),
        },
        "codecs": {},
    }
    entry = {
        "sample_rate": codec.sample_rate,
        "frame_size": codec.frame_size,
        "frame_rate": codec.frame_rate,
        "num_codebooks": codec.num_codebooks,
        "cardinality": codec.cardinality,
        "kbps": round(
            codec.num_codebooks * np.log2(codec.cardinality) * codec.frame_rate / 1000, 2
        ),
        "parameters": sum(p.numel() for p in codec.parameters()),
        "quality": q,
    }
    results["codecs"][args.codec] = entry
    to_time = [(args.codec, codec)]
    if not args.no_encodec:
        enc = codecs.load("encodec_24khz", pretrained=False, bandwidth=6.0)
        results["codecs"]["encodec_24khz"] = {
            "sample_rate": enc.sample_rate,
            "frame_size": enc.frame_size,
            "frame_rate": enc.frame_rate,
            "num_codebooks": enc.num_codebooks,
            "cardinality": enc.cardinality,
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
        print(
            f"  {name:14s} {s['frame_ms']:8.2f} {s['batch1_p50_ms']:8.2f} "
            f"{s['batch1_p99_ms']:8.2f} {100 * s['batch1_p50_share_of_frame']:6.1f} "
            f"{100 * s['batch1_p99_share_of_frame']:6.1f} "
            f"{s['batch1_cpu_p50_ms']:8.2f} {s['batch1_cpu_p99_ms']:8.2f} "
            f"{s['batch16_frames_per_s']:9.0f} {s['batch16_realtime_streams']:8.1f}"
        )
    sp = results["codecs"][args.codec]["speed"]
    results["targets"] = {
        "asr_accuracy_ratio>=0.9": q["asr_accuracy_ratio"] >= 0.9,
        "batch1_p50<=25%_of_frame": sp["batch1_p50_share_of_frame"] <= 0.25,
        "batch1_p99<=60%_of_frame": sp["batch1_p99_share_of_frame"] <= 0.60,
    }
    print("targets:", json.dumps(results["targets"]))
    (args.out / "codec.json").write_text(json.dumps(results, indent=2) + "\n")
    x, y, text, voice = keep[0]
    _plot(
        args.out / "codec_spectrogram.png",
        x,
        y,
        codec.sample_rate,
        f"{args.codec}: '{text}' ({voice['accent']}+{voice['variant']}, held out)",
    )
    gap = np.zeros(int(0.4 * codec.sample_rate), np.float32)
    parts = []
    for x, y, _, _ in keep.values():
        parts += [x, gap, y, gap, gap]
    sf.write(args.out / "codec_sample.wav", np.concatenate(parts), codec.sample_rate)
    print(f"wrote {args.out}/codec.json, codec_spectrogram.png, codec_sample.wav")
    return 0
