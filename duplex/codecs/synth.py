"""A streaming harmonic-plus-noise synthesiser: F0, voicing and two filters -> waveform.

Why this shape (a neural source-filter / homomorphic vocoder): pitch is carried by construction.
An oscillator turns the predicted F0 into a band-limited pulse train whose harmonics sit exactly
at multiples of F0, so the network never has to learn phase (the old decoder predicted STFT phase
and produced only noise-like, whispered output). The network only shapes spectra: two slowly
varying minimum-phase filters, one for the pulse train and one for white noise, each given as a
short causal cepstrum (a smooth log-spectrum plus its minimum phase in one FFT).

Timing: controls come at `hop` samples (200 Hz). Control j holds the values at the end of
sub-frame j; inside sub-frame j, F0 and the voicing gate move linearly from control j - 1 to j,
so sample n uses only controls <= n // hop (causal). Each sub-frame's excitation block is
filtered with its own filter by FFT convolution and overlap-added; the filter's ringing into later
samples waits in a tail (StreamingConvTranspose1d), again causal.

Streaming equals offline: the state holds the oscillator phase (float64, in cycles), the last
control, and a sample counter for the noise, which is a hash of the absolute sample index (no
random generator, so any chunking draws the same noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duplex.codecs.conv import StreamingConvTranspose1d
from duplex.streaming import StreamingModule, StreamState, keep_masked


@dataclass
class SynthConfig:
    """Settings of the synthesiser (stored with the decoder's weights)."""

    sample_rate: int = 16000
    hop: int = 80
    n_fft: int = 512
    harmonic_ceps: int = 64
    noise_ceps: int = 32
    f0_min: float = 50.0
    f0_max: float = 600.0
    # harmonics stop below this fraction of the Nyquist frequency (the last one fades in)
    bandwidth: float = 0.95
    # the real part of a log spectrum is clamped here (e^8 ~ 3000x gain) so exp cannot overflow
    max_log_gain: float = 8.0

    def to_dict(self) -> dict:
        return asdict(self)


def noise(index: torch.Tensor) -> torch.Tensor:
    """Unit-variance white noise as a pure function of the sample index (int64) -> float32.

    A 32-bit integer hash (two multiply-xorshift rounds) mapped to a uniform in [-sqrt 3, sqrt 3).
    Multipliers stay below 2^31, so every product fits in int64 without overflow.
    """
    h = index & 0xFFFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    h = (h >> 16) ^ h
    return ((h.double() / 4294967296.0) * 2 - 1).float() * math.sqrt(3)


def pulse_train(phase: torch.Tensor, harmonics: torch.Tensor) -> torch.Tensor:
    """sum_{k <= K} cos(2 pi k phase) with a fractional last harmonic, scaled to unit power.

    phase (cycles) and harmonics K (real, >= 1) are float64 tensors of one shape. The sum uses the
    closed form of the Dirichlet kernel, so its cost does not grow with the number of harmonics;
    the fractional part of K fades the top harmonic in and out as F0 moves (no clicks).
    """
    n = torch.floor(harmonics)
    frac = harmonics - n
    theta = 2 * math.pi * phase
    half = torch.sin(theta / 2)
    small = half.abs() < 1e-9
    safe = torch.where(small, torch.ones_like(half), half)
    full = torch.where(small, n, torch.sin(n * theta / 2) * torch.cos((n + 1) * theta / 2) / safe)
    s = full + frac * torch.cos((n + 1) * theta)
    # each harmonic of amplitude a has power a^2 / 2: K harmonics at a = sqrt(2 / K) make power 1
    return s * torch.sqrt(2 / harmonics)


@dataclass
class ExcitationState(StreamState):
    """Oscillator phase (cycles, float64), last control F0 and gate, and the sample counter."""

    phase: torch.Tensor
    f0: torch.Tensor
    gate: torch.Tensor
    count: torch.Tensor


class Excitation(StreamingModule):
    """Controls (F0 [B, J] in Hz, gate [B, J] in 0..1) -> pulse train and noise [B, T = J * hop].

    `offset` [B] (int64, optional) shifts the noise index per row; training uses random offsets so
    the decoder never sees the same noise twice.
    """

    def __init__(self, cfg: SynthConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # [hop]: interpolation weights of the new control at samples 1..hop of a sub-frame
        w = torch.arange(1, cfg.hop + 1, dtype=torch.float64) / cfg.hop
        self.register_buffer("ramp", w, persistent=False)
        self.register_buffer("table", noise(torch.arange(1 << 16)), persistent=False)

    def init_state(self, batch_size: int) -> ExcitationState:
        z = torch.zeros(batch_size, dtype=torch.float64)
        return ExcitationState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            phase=z.clone(),
            f0=z.clone(),
            gate=z.clone(),
            count=torch.zeros(batch_size, dtype=torch.int64),
        )

    def forward(
        self, f0: torch.Tensor, gate: torch.Tensor, offset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        B = f0.shape[0]
        f0 = f0.double().clamp(cfg.f0_min, cfg.f0_max)
        gate = gate.double()
        st = self.stream_state
        if st is None:
            prev_f0, prev_gate = f0[:, :1], torch.zeros_like(gate[:, :1])
            phase0 = torch.zeros(B, 1, dtype=torch.float64, device=f0.device)
            count = torch.zeros(B, 1, dtype=torch.int64, device=f0.device)
        else:
            assert isinstance(st, ExcitationState)
            # a fresh stream has no previous F0: start flat at the first control
            prev_f0 = torch.where(st.f0 > 0, st.f0, f0[:, 0])[:, None]
            prev_gate = st.gate[:, None]
            phase0 = st.phase[:, None]
            count = st.count[:, None]
        # [B, J] start values of each sub-frame: the previous control
        f_start = torch.cat([prev_f0, f0[:, :-1]], dim=1)
        g_start = torch.cat([prev_gate, gate[:, :-1]], dim=1)
        w = self.ramp.to(f0.device)
        # [B, J, hop] -> [B, T] per-sample F0 and gate
        f_s = (f_start[..., None] + (f0 - f_start)[..., None] * w).reshape(B, -1)
        g_s = (g_start[..., None] + (gate - g_start)[..., None] * w).reshape(B, -1)
        phase = phase0 + torch.cumsum(f_s / cfg.sample_rate, dim=1)
        phase = phase - torch.floor(phase)
        nyquist = cfg.bandwidth * cfg.sample_rate / 2
        harmonics = (nyquist / f_s).clamp_min(1.0)
        harm = (g_s * pulse_train(phase, harmonics)).float()
        T = f_s.shape[1]
        idx = count + torch.arange(T, device=f0.device)
        if offset is not None:
            idx = idx + offset.to(f0.device)[:, None]
        # the table repeats every 2^16 samples (4 s): inaudible in filtered noise, one gather
        nz = self.table[idx % self.table.numel()]
        if st is not None:
            m = st.exec_mask
            st.phase = keep_masked(phase[:, -1], st.phase, m)
            st.f0 = keep_masked(f0[:, -1], st.f0, m)
            st.gate = keep_masked(gate[:, -1], st.gate, m)
            st.count = keep_masked(count[:, 0] + T, st.count, m)
        return harm, nz


def min_phase_spectrum(ceps: torch.Tensor, n_fft: int, max_log_gain: float) -> torch.Tensor:
    """Causal cepstra [..., Q] -> minimum-phase frequency responses [..., n_fft // 2 + 1].

    The FFT of a causal cepstrum is a log spectrum whose imaginary part is the minimum phase of its
    real part; its exponential is the filter's response.
    """
    logspec = torch.fft.rfft(ceps, n=n_fft)
    return torch.exp(torch.complex(logspec.real.clamp(max=max_log_gain), logspec.imag))


class _FilteredBlocks(nn.Module):
    """Packed sub-frames [B, 2 * hop + Qh + Qn, J] -> overlap-added output [B, 1, (J-1)*hop + N].

    Channels: the harmonic excitation block, the noise block, the harmonic filter's cepstrum and
    the noise filter's cepstrum. Each block is convolved with its filter (FFT size N) and the
    results overlap-add at hop.
    """

    def __init__(self, cfg: SynthConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        h, n, qh = c.hop, c.n_fft, c.harmonic_ceps
        # [B, C, J] -> [B, J, C]
        x = x.transpose(1, 2)
        qn = x.shape[-1] - 2 * h - qh
        q = max(qh, qn)
        # [B, J, 2, hop] excitations and [B, J, 2, max(Qh, Qn)] cepstra: one FFT call each
        exc = x[..., : 2 * h].unflatten(-1, (2, h))
        ceps_h = F.pad(x[..., 2 * h : 2 * h + qh], (0, q - qh))
        ceps_n = F.pad(x[..., 2 * h + qh :], (0, q - qn))
        ceps = torch.stack([ceps_h, ceps_n], dim=-2)
        resp = min_phase_spectrum(ceps, n, c.max_log_gain)
        spec = (torch.fft.rfft(exc, n=n) * resp).sum(-2)
        # [B, J, N] -> [B, N, J] -> overlap-add -> [B, 1, (J - 1) * hop + N]
        frames = torch.fft.irfft(spec, n=n).transpose(1, 2)
        J = frames.shape[-1]
        out = F.fold(frames, output_size=(1, (J - 1) * h + n), kernel_size=(1, n), stride=(1, h))
        return out[:, :, 0]


class HarmonicNoiseSynth(StreamingModule):
    """(F0, gate, harmonic cepstra, noise cepstra) at the control rate -> waveform [B, 1, T]."""

    def __init__(self, cfg: SynthConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SynthConfig()
        c = self.cfg
        if c.n_fft < 2 * c.hop:
            raise ValueError("n_fft must leave room for the filter's ringing (>= 2 * hop)")
        self.excitation = Excitation(c)
        self.ola = StreamingConvTranspose1d(_FilteredBlocks(c), 1, c.n_fft, c.hop)

    def forward(
        self,
        f0: torch.Tensor,
        gate: torch.Tensor,
        ceps_h: torch.Tensor,
        ceps_n: torch.Tensor,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # f0, gate [B, J]; ceps_h [B, Qh, J]; ceps_n [B, Qn, J] -> [B, 1, J * hop]
        B, J = f0.shape
        harm, nz = self.excitation(f0, gate, offset)
        hop = self.cfg.hop
        # [B, T] -> [B, J, hop] -> [B, hop, J]
        blocks_h = harm.float().view(B, J, hop).transpose(1, 2)
        # the noise table follows the module's dtype (float64 at inference): the filters and
        # their tail always run in float32, so cast here
        blocks_n = nz.float().view(B, J, hop).transpose(1, 2)
        # the filters need no float64 (no state integrates them): float32 is faster
        packed = torch.cat([blocks_h, blocks_n, ceps_h.float(), ceps_n.float()], dim=1)
        return self.ola(packed)
