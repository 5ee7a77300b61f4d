"""`duplex train codec`: train the small codec on synthetic espeak-ng speech.

Why these losses: with no adversarial loss (too slow on one CPU core), multi-resolution STFT
log-magnitude and mel L1 give the spectral envelope and harmonics that carry intelligibility, and
several STFT resolutions together constrain the phase of the overlap-added output; a small
time-domain L1 term anchors phase further. EMA codebooks need no codebook loss; a commitment loss
keeps the encoder's output near its codes.

The run stops by step count or wall time, whichever comes first; the learning-rate schedule
follows progress = max(step / steps, elapsed / budget), so a slow machine still ends with a fully
decayed rate. Checkpoints are written as it goes and `--resume` continues from the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio

from duplex.codecs.small import SmallCodec, SmallCodecConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
# the first codec (encoder, quantiser and spectral decoder); its tokens are the project's tokens
DEFAULT_WEIGHTS = WEIGHTS_DIR / "default-v1.safetensors"
# the voiced decoder on the same frozen encoder and quantiser (`--decoder voice`)
VOICE_WEIGHTS = WEIGHTS_DIR / "default.safetensors"


@dataclass
class TrainConfig:
    """Hyper-parameters of a codec training run."""

    seed: int = 0
    steps: int = 20000
    budget_minutes: float = 72.0
    batch_size: int = 12
    segment_s: float = 1.0
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup: int = 200
    commit_weight: float = 1.0
    wav_weight: float = 1.0
    grad_clip: float = 1.0
    corpus_utterances: int = 2400
    augment_prob: float = 0.8
    threads: int = 1


class SpectralLoss(torch.nn.Module):
    """Multi-resolution STFT (log and linear magnitude) plus log-mel L1 between two signals."""

    def __init__(self, sample_rate: int, ffts: tuple[int, ...] = (128, 256, 512, 1024, 2048)):
        super().__init__()
        self.ffts = ffts
        for n in ffts:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=1024, hop_length=256, n_mels=80, power=1.0
        )

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # y, x [B, 1, T] (reconstruction, target)
        yf, xf = y[:, 0], x[:, 0]
        logl = torch.zeros((), device=y.device)
        linl = torch.zeros((), device=y.device)
        for n in self.ffts:
            w = getattr(self, f"win{n}")
            Y = torch.stft(yf, n, n // 4, window=w, return_complex=True).abs()
            X = torch.stft(xf, n, n // 4, window=w, return_complex=True).abs()
            logl = logl + F.l1_loss(torch.log(Y + 1e-5), torch.log(X + 1e-5))
            linl = linl + (Y - X).abs().mean() / X.abs().mean().clamp_min(1e-5)
        mel = F.l1_loss(torch.log(self.mel(yf) + 1e-5), torch.log(self.mel(xf) + 1e-5))
        return {
            "stft_log": logl / len(self.ffts),
            "stft_lin": linl / len(self.ffts),
            "mel": mel,
        }


def lr_at(cfg, step: int, progress: float) -> float:
    """Warm-up then cosine from cfg.lr to cfg.min_lr (any config with lr, min_lr, warmup)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def ensure_corpus(data_dir: Path, n: int) -> Path:
    """The training corpus (made with a fixed seed when missing, so runs are reproducible)."""
    from duplex.data.speech import build_corpus

    path = data_dir / f"speech_train_{n}.npz"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        print(f"synthesising {n} training utterances -> {path}", flush=True)
        build_corpus("train", n, seed=0).save(path)
    return path


def save_weights(model: SmallCodec, path: Path, info: dict) -> None:
    """Write the codec's weights and config as safetensors (config JSON in the metadata)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Shipped as float16 (half the size; the loader casts back to float32). EMA statistics are
    # only needed to keep training, so they stay in the checkpoint, not in the shipped file.
    sd = {
        k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.endswith(("embed_sum", "cluster_size", "initialized"))
    }
    meta = {"config": json.dumps(model.cfg.to_dict()), "info": json.dumps(info)}
    save_file(sd, str(path), metadata=meta)


def train(cfg: TrainConfig, data_dir: Path, out_dir: Path, weights: Path, resume: bool) -> dict:
    """Run (or resume) training; returns a summary and writes the final weights."""
    from duplex.data.speech import Corpus, augment

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus = Corpus.load(ensure_corpus(data_dir, cfg.corpus_utterances))
    model = SmallCodec(SmallCodecConfig())
    loss_fn = SpectralLoss(model.sample_rate)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt"
    log_path = out_dir / "train_log.jsonl"
    if resume and ckpt.exists():
        step, elapsed = resume_checkpoint(ckpt, model, opt, gen)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"small codec: {n_params / 1e6:.2f} M parameters; config {cfg}", flush=True)
    seg = round(cfg.segment_s * model.sample_rate)
    seg -= seg % model.frame_size
    budget = cfg.budget_minutes * 60
    t_start = time.time() - elapsed
    last: dict = {}
    avg: dict[str, float] = {}
    model.train()
    while True:
        elapsed = time.time() - t_start
        progress = max(step / cfg.steps, elapsed / budget)
        if progress >= 1.0:
            break
        lr = lr_at(cfg, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # [B, 1, seg]
        clean = corpus.random_crops(cfg.batch_size, seg, gen)
        noisy = augment(clean, gen)
        use = (torch.rand(cfg.batch_size, 1, 1, generator=gen) < cfg.augment_prob).float()
        peak = clean.abs().amax(-1, keepdim=True).clamp_min(1e-4)
        x = use * noisy + (1 - use) * clean / peak * 0.7
        y, _, commit = model.forward_train(x, gen)
        parts = loss_fn(y, x)
        parts["wav"] = F.l1_loss(y, x) / x.abs().mean().clamp_min(1e-4)
        parts["commit"] = commit
        loss = (
            parts["stft_log"]
            + parts["stft_lin"]
            + parts["mel"]
            + cfg.wav_weight * 0.1 * parts["wav"]
            + cfg.commit_weight * commit
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        for k, v in parts.items():
            fv = float(v.detach())
            avg[k] = 0.98 * avg.get(k, fv) + 0.02 * fv
        if step % 50 == 0 or step == 1:
            last = {
                "step": step,
                "minutes": round((time.time() - t_start) / 60, 2),
                "lr": lr,
                "loss": float(loss),
                **{k: round(v, 4) for k, v in avg.items()},
            }
            print(json.dumps(last), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        if step % 500 == 0:
            save_checkpoint(ckpt, model, opt, gen, step, time.time() - t_start)
    elapsed = time.time() - t_start
    save_checkpoint(ckpt, model, opt, gen, step, elapsed)
    info = {"steps": step, "minutes": round(elapsed / 60, 1), "train_config": cfg.__dict__, **avg}
    save_weights(model, weights, info)
    print(f"done: {step} steps in {elapsed / 60:.1f} min -> {weights}", flush=True)
    return info


def resume_checkpoint(path: Path, module, opt, gen, key: str = "model") -> tuple[int, float]:
    """Restore what `save_checkpoint` wrote (weights under `key`, optimiser, both RNGs);
    returns (step, elapsed seconds)."""
    s = torch.load(path, weights_only=False)
    module.load_state_dict(s[key])
    opt.load_state_dict(s["opt"])
    gen.set_state(s["gen"])
    torch.set_rng_state(s["rng"])
    print(f"resumed at step {s['step']} ({s['elapsed'] / 60:.1f} min)", flush=True)
    return s["step"], s["elapsed"]


def save_checkpoint(
    path: Path, module, opt, gen, step: int, elapsed: float, key: str = "model"
) -> None:
    """Atomically write weights (under `key`), optimiser and RNG states for an exact resume."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            key: module.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "rng": torch.get_rng_state(),
            "step": step,
            "elapsed": elapsed,
        },
        tmp,
    )
    tmp.replace(path)


HELP = "train the small shipped codec, or its voiced decoder, on synthetic espeak-ng speech"
DESCRIPTION = """Train the small streaming speech codec on synthetic speech.

--decoder spectral (the default) trains the whole first codec ("default-v1": encoder, quantiser
and a spectral decoder) from scratch; its tokens are the ones every corpus and model uses.
--decoder voice trains the voiced decoder ("default": harmonic-plus-noise synthesis with predicted
F0) on the frozen encoder and quantiser of --init, so the codes stay bit-identical.

The corpus is synthesised with espeak-ng (fixed seed) into --data-dir when missing. Training runs
on --threads CPU threads and stops after --steps or --budget-minutes, whichever comes first;
checkpoints go to --out-dir and --resume continues from the last one. The final weights
(safetensors, config in the metadata) go to --weights, by default the package's shipped file for
that decoder.

Reproduce the first codec (the defaults are its run's settings):
  duplex train codec --data-dir data --out-dir runs/codec --seed 0
Reproduce the voiced decoder (the shipped run's settings; see docs/codec.md):
  duplex train codec --decoder voice --data-dir data --out-dir runs/voice --budget-minutes 100
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="corpus folder (made if missing)"
    )
    p.add_argument(
        "--out-dir", type=Path, default=Path("runs/codec"), help="checkpoint and log folder"
    )
    p.add_argument(
        "--decoder",
        choices=["spectral", "voice"],
        default="spectral",
        help="spectral: the whole first codec; voice: the voiced decoder on frozen tokens",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=DEFAULT_WEIGHTS,
        help="--decoder voice: codec file whose encoder and quantiser are kept",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="final weights (.safetensors); default: the shipped file of that decoder",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="model init and data order")
    p.add_argument("--steps", type=int, default=d.steps, help="maximum optimiser steps")
    p.add_argument("--budget-minutes", type=float, default=d.budget_minutes, help="wall-time limit")
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"clips per step ({d.batch_size}; voice: 8)"
    )
    p.add_argument(
        "--segment-s", type=float, default=None, help=f"clip length, s ({d.segment_s}; voice: 1.6)"
    )
    p.add_argument(
        "--lr", type=float, default=None, help=f"peak learning rate, AdamW ({d.lr}; voice: 1.5e-3)"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--corpus-utterances",
        type=int,
        default=d.corpus_utterances,
        help="utterances in the synthetic training corpus",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt")


def _config_from_args(cls, args: argparse.Namespace):
    """A codec or voice training config from the shared flags (0/None keeps its default)."""
    d = cls()
    return cls(
        seed=args.seed,
        steps=args.steps,
        budget_minutes=args.budget_minutes,
        batch_size=args.batch_size or d.batch_size,
        segment_s=args.segment_s or d.segment_s,
        lr=args.lr or d.lr,
        threads=args.threads,
        corpus_utterances=args.corpus_utterances,
    )


def run(args: argparse.Namespace) -> int:
    if args.decoder == "voice":
        from duplex.codecs.voice_train import VoiceTrainConfig
        from duplex.codecs.voice_train import train as train_voice

        vcfg = _config_from_args(VoiceTrainConfig, args)
        weights = args.weights or VOICE_WEIGHTS
        train_voice(vcfg, args.data_dir, args.out_dir, weights, args.init, args.resume)
        return 0
    cfg = _config_from_args(TrainConfig, args)
    train(cfg, args.data_dir, args.out_dir, args.weights or DEFAULT_WEIGHTS, args.resume)
    return 0
