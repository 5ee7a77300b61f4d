"""`duplex train codec --decoder voice`: train the voiced decoder on the frozen codec's tokens.

Why these choices:
- The encoder and quantiser come from the shipped codec and never change (they run in eval mode,
  without gradients, exactly as at inference), so the codes the decoder learns from are the codes
  every corpus and model already uses.
- Teacher forcing: the synthesiser is driven by F0 and voicing that YIN measures on the clean
  training audio, not by the decoder's own guesses. The spectral loss then teaches the filters real
  spectra under correctly placed harmonics; were the synthesiser driven by a wrong F0, the
  cheapest way to lower a spectral loss would be to smear harmonics into noise, which is the
  whisper this decoder replaces. The F0 and voicing heads learn from the same targets directly.
- Losses: multi-resolution STFT (log and linear magnitude) plus log-mel L1 (as for the first
  decoder, `duplex.codecs.train.SpectralLoss`), L1 on log F0 over voiced sub-frames, binary
  cross-entropy on voicing. No waveform term: the decoder makes its own phase.

The run stops by step count or wall time, whichever comes first, checkpoints as it goes and
resumes with `--resume` (also with another thread count).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from duplex.codecs.pitch import YinConfig, track
from duplex.codecs.small import SmallCodec
from duplex.codecs.voiced import VoiceConfig, VoicedCodec, voiced_config

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class VoiceTrainConfig:
    """Hyper-parameters of a voiced-decoder training run."""

    seed: int = 0
    steps: int = 20000
    budget_minutes: float = 60.0
    batch_size: int = 8
    segment_s: float = 1.6
    lr: float = 1.5e-3
    min_lr: float = 3e-5
    warmup: int = 150
    f0_weight: float = 2.0
    voicing_weight: float = 0.5
    grad_clip: float = 1.0
    corpus_utterances: int = 2400
    augment_prob: float = 0.4
    threads: int = 1


def fill_unvoiced(f0: torch.Tensor, voiced: torch.Tensor, default: float = 120.0) -> torch.Tensor:
    """F0 [B, J] with unvoiced entries replaced by the nearest earlier voiced value (or the next
    one at the start; `default` for rows with none), so the oscillator glides through gaps."""
    B, J = f0.shape
    pos = torch.arange(J, device=f0.device).expand(B, J)
    last = torch.where(voiced, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    nxt = torch.where(voiced, pos, torch.full_like(pos, J)).flip(1).cummin(dim=1).values.flip(1)
    idx = torch.where(last >= 0, last, nxt).clamp(max=J - 1)
    out = f0.gather(1, idx)
    return torch.where(voiced.any(1, keepdim=True), out, torch.full_like(out, default))


def pitch_targets(clean: torch.Tensor, hop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean audio [B, 1, T] -> (F0 [B, J] in Hz, voiced [B, J]) for the J = T / hop controls.

    Control j holds the value at the end of sub-frame j, i.e. at sample (j + 1) * hop, which is the
    centre of YIN frame j + 1.
    """
    tr = track(clean[:, 0], YinConfig(sample_rate=16000, hop=hop))
    J = clean.shape[-1] // hop
    return tr.f0[:, 1 : J + 1], tr.voiced[:, 1 : J + 1]


def build(init: Path, voice: VoiceConfig | None = None) -> VoicedCodec:
    """A voiced codec whose encoder and quantiser are copied from the codec file `init`."""
    from duplex.codecs import load_small

    base = load_small(init)
    if not isinstance(base, SmallCodec):
        raise ValueError(f"{init} is not a small codec")
    codec = VoicedCodec(voiced_config(base.cfg, voice), name="default")
    codec.encoder.load_state_dict(base.encoder.state_dict())
    codec.quantizer.load_state_dict(base.quantizer.state_dict())
    for p in [*codec.encoder.parameters(), *codec.quantizer.parameters()]:
        p.requires_grad_(False)
    return codec


def train(
    cfg: VoiceTrainConfig,
    data_dir: Path,
    out_dir: Path,
    weights: Path,
    init: Path,
    resume: bool,
    voice: VoiceConfig | None = None,
) -> dict:
    """Run (or resume) training; writes checkpoints, a JSONL log and the final codec file."""
    from duplex.codecs.train import (
        SpectralLoss,
        ensure_corpus,
        lr_at,
        resume_checkpoint,
        save_checkpoint,
        save_weights,
    )
    from duplex.data.speech import Corpus, augment

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus = Corpus.load(ensure_corpus(data_dir, cfg.corpus_utterances))
    codec = build(init, voice)
    dec = codec.decoder
    hop = dec.cfg.synth.hop
    loss_fn = SpectralLoss(codec.sample_rate)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt"
    log_path = out_dir / "train_log.jsonl"
    if resume and ckpt.exists():
        step, elapsed = resume_checkpoint(ckpt, dec, opt, gen, key="decoder")
    n_params = sum(p.numel() for p in dec.parameters())
    print(f"voiced decoder: {n_params / 1e6:.2f} M parameters; {cfg}", flush=True)
    seg = round(cfg.segment_s * codec.sample_rate)
    seg -= seg % codec.frame_size
    budget = cfg.budget_minutes * 60
    t_start = time.time() - elapsed
    avg: dict[str, float] = {}
    codec.encoder.eval()
    codec.quantizer.eval()
    dec.train()
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
        gain = 10 ** (-20 * torch.rand(cfg.batch_size, 1, 1, generator=gen) / 20)
        x = use * noisy + (1 - use) * clean / peak * 0.9 * gain
        with torch.no_grad():
            latent = codec.quantizer.decode(codec.encode(x))
            f0_t, voiced_t = pitch_targets(clean, hop)
        f0_drive = fill_unvoiced(f0_t, voiced_t)
        offset = torch.randint(0, 1 << 16, (cfg.batch_size,), generator=gen)
        y, ctl = dec.forward_train(latent, f0_drive, voiced_t, offset)
        parts = loss_fn(y, x)
        v = voiced_t.float()
        parts["f0"] = ((ctl.log_f0 - torch.log(f0_drive)).abs() * v).sum() / v.sum().clamp_min(1)
        parts["voicing"] = F.binary_cross_entropy_with_logits(ctl.voicing, v)
        loss = (
            parts["stft_log"]
            + parts["stft_lin"]
            + parts["mel"]
            + cfg.f0_weight * parts["f0"]
            + cfg.voicing_weight * parts["voicing"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        for k, val in parts.items():
            fv = float(val.detach())
            avg[k] = 0.98 * avg.get(k, fv) + 0.02 * fv
        if step % 25 == 0 or step == 1:
            row = {
                "step": step,
                "minutes": round((time.time() - t_start) / 60, 2),
                "lr": lr,
                "loss": round(float(loss), 4),
                "f0_cents": round(1200 / math.log(2) * avg["f0"], 1),
                **{k: round(val, 4) for k, val in avg.items()},
            }
            print(json.dumps(row), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % 200 == 0:
            save_checkpoint(ckpt, dec, opt, gen, step, time.time() - t_start, key="decoder")
    elapsed = time.time() - t_start
    save_checkpoint(ckpt, dec, opt, gen, step, elapsed, key="decoder")
    info = {
        "steps": step,
        "minutes": round(elapsed / 60, 1),
        "decoder": "voice",
        "init": init.name,
        "train_config": asdict(cfg),
        **avg,
    }
    dec.train()
    save_weights(codec, weights, info)
    print(f"done: {step} steps in {elapsed / 60:.1f} min -> {weights}", flush=True)
    return info


def export(checkpoint: Path, init: Path, weights: Path, voice: VoiceConfig | None = None) -> None:
    """Write a codec file from a training checkpoint (e.g. to benchmark a run in progress)."""
    from duplex.codecs.train import save_weights

    codec = build(init, voice)
    s = torch.load(checkpoint, weights_only=False)
    codec.decoder.load_state_dict(s["decoder"])
    codec.decoder.train()
    save_weights(codec, weights, {"steps": s["step"], "minutes": round(s["elapsed"] / 60, 1)})
