"""A YIN pitch tracker in PyTorch: F0 and voicing targets for training the voiced decoder.

Why our own tracker: the decoder learns F0 and voicing from targets computed on every training
batch, on the fly, so the tracker must be fast on a whole batch at once; YIN (de Cheveigne and
Kawahara, 2002) is a few FFTs per frame and is reliable on clean, strongly periodic speech such as
espeak-ng's. The benchmark judges pitch with an independent tracker (WORLD's DIO + StoneMask,
`pyworld`), so the decoder is not graded by the same algorithm that taught it.

Frame j is centred on sample j * hop (the signal is zero padded at both ends), so a signal of T
samples gives ceil(T / hop) + 1 frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class YinConfig:
    """Settings of the tracker; the defaults suit 16 kHz speech at a 200 Hz frame rate."""

    sample_rate: int = 16000
    hop: int = 80
    window: int = 480
    f0_min: float = 55.0
    f0_max: float = 500.0
    # a dip of the normalised difference below this marks the period (YIN's absolute threshold)
    threshold: float = 0.15
    # frames whose best dip stays above this are unvoiced (aperiodic)
    voicing_threshold: float = 0.4
    # frames quieter than this (RMS relative to the signal's loudest frame) are unvoiced
    silence_rel_rms: float = 0.02


@dataclass
class PitchTrack:
    """F0 in Hz [B, J] (0 where unvoiced), voicing [B, J] (bool), aperiodicity [B, J] (0..1)."""

    f0: torch.Tensor
    voiced: torch.Tensor
    aperiodicity: torch.Tensor


def _frames(x: torch.Tensor, length: int, hop: int, centre: int) -> torch.Tensor:
    """x [B, T] -> frames [B, J, length] starting `centre` samples before j * hop."""
    T = x.shape[-1]
    J = (T + hop - 1) // hop + 1
    need = (J - 1) * hop + length
    padded = F.pad(x, (centre, max(0, need - centre - T)))
    return padded.unfold(-1, length, hop)[:, :J]


def cmnd(frames: torch.Tensor, window: int, max_lag: int) -> torch.Tensor:
    """YIN's cumulative mean normalised difference d'(tau) for tau in [0, max_lag].

    frames [B, J, window + max_lag] -> [B, J, max_lag + 1]. The difference function
    d(tau) = sum_n (x[n] - x[n + tau])^2 over n < window is computed from an FFT correlation and
    running energies, so a whole batch costs a few FFTs.
    """
    L = frames.shape[-1]
    # lags stop at max_lag and frames hold window + max_lag samples: a circular correlation of
    # size >= L never wraps for the products used
    n_fft = 1 << (L - 1).bit_length()
    head = frames[..., :window]
    spec = torch.fft.rfft(frames, n_fft) * torch.fft.rfft(head, n_fft).conj()
    # cross[tau] = sum_{n < window} x[n] x[n + tau]
    cross = torch.fft.irfft(spec, n_fft)[..., : max_lag + 1]
    sq = F.pad(frames.double() * frames.double(), (1, 0)).cumsum(-1)
    e0 = sq[..., window : window + 1]
    lags = torch.arange(max_lag + 1, device=frames.device)
    # energy of x[tau : tau + window]
    e_tau = sq[..., lags + window] - sq[..., lags]
    d = (e0 + e_tau - 2 * cross.double()).clamp_min(0)
    cum = d[..., 1:].cumsum(-1)
    tau = lags[1:].to(d.dtype)
    out = torch.ones_like(d)
    out[..., 1:] = d[..., 1:] * tau / cum.clamp_min(1e-12)
    return out


def track(x: torch.Tensor, cfg: YinConfig | None = None) -> PitchTrack:
    """Track F0 and voicing of x [B, T] (or [T]) -> PitchTrack of [B, J] tensors."""
    cfg = cfg or YinConfig()
    squeeze = x.dim() == 1
    if squeeze:
        x = x[None]
    if x.dim() != 2:
        raise ValueError(f"track takes audio [B, T] or [T], got {tuple(x.shape)}")
    # float32 is accurate enough here: the energies are computed from running sums of squares
    # in float64 below, and only the cross term comes from the float32 FFT
    x = x.float()
    min_lag = int(cfg.sample_rate // cfg.f0_max)
    max_lag = int(cfg.sample_rate // cfg.f0_min) + 1
    frames = _frames(x, cfg.window + max_lag, cfg.hop, cfg.window // 2)
    d = cmnd(frames, cfg.window, max_lag)
    lags = torch.arange(max_lag + 1, device=x.device)
    in_range = (lags >= min_lag) & (lags < max_lag)
    below = (d < cfg.threshold) & in_range
    # first lag below the threshold, then walk down to the bottom of that dip
    has_dip = below.any(-1)
    first = torch.where(has_dip, below.float().argmax(-1), 0)
    rising = torch.ones_like(below)
    rising[..., :-1] = d[..., 1:] >= d[..., :-1]
    after = rising & (lags >= first[..., None]) & in_range
    dip = after.float().argmax(-1)
    masked = torch.where(in_range, d, torch.full_like(d, 1e9))
    best = masked.argmin(-1)
    tau = torch.where(has_dip, dip, best).clamp(min_lag, max_lag - 1)
    # parabolic interpolation around the chosen lag for a sub-sample period
    dm = d.gather(-1, (tau - 1)[..., None])[..., 0]
    d0 = d.gather(-1, tau[..., None])[..., 0]
    dp = d.gather(-1, (tau + 1)[..., None])[..., 0]
    denom = dm - 2 * d0 + dp
    shift = torch.where(denom.abs() > 1e-12, 0.5 * (dm - dp) / denom, torch.zeros_like(denom))
    period = tau.double() + shift.clamp(-1, 1)
    aper = d0.clamp(0, 1)
    rms = frames[..., : cfg.window].pow(2).mean(-1).sqrt()
    loud = rms > cfg.silence_rel_rms * rms.amax(-1, keepdim=True).clamp_min(1e-8)
    voiced = (aper < cfg.voicing_threshold) & loud & (rms > 1e-5)
    f0 = torch.where(voiced, cfg.sample_rate / period, torch.zeros_like(period))
    out = PitchTrack(f0=f0.float(), voiced=voiced, aperiodicity=aper.float())
    if squeeze:
        out = PitchTrack(out.f0[0], out.voiced[0], out.aperiodicity[0])
    return out


def cents(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|1200 log2(a / b)| elementwise (both positive)."""
    return (1200 * torch.log2(a / b)).abs()
