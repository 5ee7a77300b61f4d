"""The small speech codec duplex trains and ships ("default").

Why this shape: it must train to intelligible speech in about an hour on one CPU core and run far
faster than real time frame by frame, and a small language model must be able to predict its
tokens. So almost all compute runs at a low rate on wide matrices (fast on a CPU):

- 16 kHz audio, 320-sample frames (50 Hz), 8 codebooks of 256 entries (3.2 kbps). 50 Hz keeps
  the model's step count low; few small codebooks keep each step's prediction easy.
- Encoder: a causal STFT-like analysis at a 200 Hz sub-frame rate (window 320, hop 80) giving
  log magnitudes (fixed basis) plus learned filters on the raw waveform (so phase is visible),
  residual causal conv blocks at 200 Hz, a 4x downsample to 50 Hz, dilated causal conv blocks.
- Residual vector quantiser with EMA codebooks and dead-code restarts.
- Decoder: dilated causal conv blocks at 50 Hz, a 4x upsample (pixel shuffle, stateless), blocks at
  200 Hz, then a head that predicts log magnitude and phase per sub-frame; an inverse FFT and a
  streaming overlap-add give the waveform (as in Vocos), which is far cheaper and quicker to train
  than upsampling convolutions all the way to 16 kHz.

Everything is causal: the decoded sample n depends only on frames <= n // 320, and the codes of
frame f only on samples < (f + 1) * 320. Streaming equals offline exactly (zero initial history).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from duplex.codecs.base import StreamingCodec
from duplex.codecs.conv import (
    FastConv1d,
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingSequential,
    conv1d_gemm,
)


@dataclass
class SmallCodecConfig:
    """Architecture of the small codec (stored with the weights)."""

    sample_rate: int = 16000
    frame_size: int = 320
    n_fft: int = 320
    hop: int = 80
    learned_filters: int = 64
    hi_channels: int = 160
    lo_channels: int = 256
    enc_hi_dilations: tuple[int, ...] = (1, 2)
    enc_lo_dilations: tuple[int, ...] = (1, 2, 4)
    dec_lo_dilations: tuple[int, ...] = (1, 2, 4, 1)
    dec_hi_dilations: tuple[int, ...] = (1, 2)
    latent_dim: int = 64
    num_codebooks: int = 8
    codebook_size: int = 256
    ema_decay: float = 0.99
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> SmallCodecConfig:
        d = dict(d)
        for k, v in d.items():
            if isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each time step: per-step, so it streams without state."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, T] -> [B, T, C] -> norm -> [B, C, T]
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ResBlock(StreamingSequential):
    """x + W2 gelu(causal_conv_k3_dilated(norm(x))): a residual block that streams."""

    def __init__(self, channels: int, dilation: int) -> None:
        conv = FastConv1d(channels, channels, 3, dilation=dilation)
        super().__init__(
            ChannelNorm(channels),
            StreamingConv1d.from_conv1d(conv),
            nn.GELU(),
            FastConv1d(channels, channels, 1),
        )
        out = self.layers[-1]
        assert isinstance(out, nn.Conv1d)
        nn.init.normal_(out.weight, std=0.1 / math.sqrt(channels))
        nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class _Analysis(nn.Module):
    """Unpadded strided conv with fixed windowed-DFT filters plus learned filters.

    x [B, 1, T'] -> [B, 2 * bins + learned, (T' - n_fft) // hop + 1].
    """

    def __init__(self, n_fft: int, hop: int, learned: int) -> None:
        super().__init__()
        self.hop = hop
        bins = n_fft // 2 + 1
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64)
        win = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        ang = 2 * math.pi * k[:, None] * n[None, :] / n_fft
        # [2 * bins, 1, n_fft]: real then imaginary parts of the windowed DFT
        basis = torch.cat([torch.cos(ang) * win, -torch.sin(ang) * win], dim=0)[:, None, :]
        self.register_buffer("basis", basis.float(), persistent=False)
        self.learned = nn.Parameter(torch.randn(learned, 1, n_fft) / math.sqrt(n_fft))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.basis, self.learned], dim=0)
        if self.training:
            return F.conv1d(x, w, stride=self.hop)
        return conv1d_gemm(x, w, None, stride=self.hop)


class _OverlapAdd(nn.Module):
    """Frames [B, N, J] -> overlap-added signal [B, 1, (J - 1) * hop + N] (no bias)."""

    def __init__(self, frame_len: int, hop: int) -> None:
        super().__init__()
        self.n = frame_len
        self.hop = hop

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        _, N, J = frames.shape
        T = (J - 1) * self.hop + N
        out = F.fold(frames, output_size=(1, T), kernel_size=(1, N), stride=(1, self.hop))
        # [B, 1, 1, T] -> [B, 1, T]
        return out[:, :, 0]


class SmallEncoder(StreamingSequential):
    """wav [B, 1, T] -> latent [B, D, T / frame_size]."""

    def __init__(self, cfg: SmallCodecConfig) -> None:
        bins = cfg.n_fft // 2 + 1
        self.bins = bins
        analysis = StreamingConv1d(
            _Analysis(cfg.n_fft, cfg.hop, cfg.learned_filters), 1, cfg.n_fft, cfg.hop
        )
        down = cfg.frame_size // cfg.hop
        super().__init__(
            analysis,
            _Features(bins, cfg.learned_filters, cfg.hi_channels),
            *[ResBlock(cfg.hi_channels, d) for d in cfg.enc_hi_dilations],
            ChannelNorm(cfg.hi_channels),
            StreamingConv1d.from_conv1d(
                FastConv1d(cfg.hi_channels, cfg.lo_channels, down, stride=down)
            ),
            *[ResBlock(cfg.lo_channels, d) for d in cfg.enc_lo_dilations],
            ChannelNorm(cfg.lo_channels),
            FastConv1d(cfg.lo_channels, cfg.latent_dim, 1),
        )


class _Features(nn.Module):
    """Analysis output -> [log magnitude, learned features] -> hi_channels (1x1 conv)."""

    def __init__(self, bins: int, learned: int, channels: int) -> None:
        super().__init__()
        self.bins = bins
        self.proj = FastConv1d(bins + learned, channels, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # a [B, 2*bins + L, J]
        re, im, lf = a[:, : self.bins], a[:, self.bins : 2 * self.bins], a[:, 2 * self.bins :]
        logmag = 0.5 * torch.log(re * re + im * im + 1e-7)
        return self.proj(torch.cat([logmag, torch.tanh(lf)], dim=1))


class _PixelShuffle1d(nn.Module):
    """[B, C * r, F] -> [B, C, F * r]: an upsample with kernel == stride (no overlap, no state)."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, Cr, Fr = x.shape
        # [B, C, r, F] -> [B, C, F, r] -> [B, C, F * r]
        return (
            x.view(B, Cr // self.r, self.r, Fr)
            .transpose(2, 3)
            .reshape(B, Cr // self.r, Fr * self.r)
        )


class _SpectralHead(nn.Module):
    """Hidden [B, C, J] -> windowed inverse-FFT frames [B, n_fft, J]."""

    def __init__(self, channels: int, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        self.bins = bins
        self.norm = ChannelNorm(channels)
        self.proj = FastConv1d(channels, 2 * bins, 1)
        win = torch.hann_window(n_fft, periodic=True)
        # hann windows at hop n_fft/4 sum to 2: scale so overlap-add of unit frames is unit gain
        self.register_buffer("window", win * (hop * 2 / n_fft), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm(h))
        logmag, phase = y[:, : self.bins], y[:, self.bins :]
        mag = torch.exp(logmag.clamp(max=6.0))
        spec = torch.polar(mag, phase)
        # [B, bins, J] complex -> [B, n_fft, J]
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1)
        return frames * self.window.view(1, -1, 1)


class SmallDecoder(StreamingSequential):
    """latent [B, D, F] -> wav [B, 1, F * frame_size]."""

    def __init__(self, cfg: SmallCodecConfig) -> None:
        up = cfg.frame_size // cfg.hop
        super().__init__(
            StreamingConv1d.from_conv1d(FastConv1d(cfg.latent_dim, cfg.lo_channels, 3)),
            *[ResBlock(cfg.lo_channels, d) for d in cfg.dec_lo_dilations],
            ChannelNorm(cfg.lo_channels),
            FastConv1d(cfg.lo_channels, cfg.hi_channels * up, 1),
            _PixelShuffle1d(up),
            *[ResBlock(cfg.hi_channels, d) for d in cfg.dec_hi_dilations],
            _SpectralHead(cfg.hi_channels, cfg.n_fft, cfg.hop),
            StreamingConvTranspose1d(_OverlapAdd(cfg.n_fft, cfg.hop), 1, cfg.n_fft, cfg.hop),
        )


class EMACodebook(nn.Module):
    """One codebook, updated by exponential moving averages of its assigned vectors.

    Why EMA: it moves codes straight to the mean of their vectors, which converges much faster than
    gradient updates; dead codes (used too rarely) restart on random current vectors so the whole
    codebook stays in use.
    """

    def __init__(self, dim: int, size: int, decay: float, dead_threshold: float = 0.05) -> None:
        super().__init__()
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.register_buffer("embed", torch.randn(size, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, D] -> idx [N]
        e = self.embed
        d = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(dim=1)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        # idx [...] -> [..., D]
        return F.embedding(idx, self.embed)

    @torch.no_grad()
    def update(self, x: torch.Tensor, idx: torch.Tensor, generator: torch.Generator | None) -> None:
        """EMA step with the batch's vectors x [N, D] and their codes idx [N] (training only)."""
        size = self.embed.shape[0]
        if not bool(self.initialized):
            pick = torch.randint(0, x.shape[0], (size,), generator=generator)
            self.embed.copy_(x[pick])
            self.embed_sum.copy_(x[pick])
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
            return
        onehot = F.one_hot(idx, size).to(x.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ x
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + size * 1e-5) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < self.dead_threshold
        nd = int(dead.sum())
        if nd:
            pick = torch.randint(0, x.shape[0], (nd,), generator=generator)
            self.embed[dead] = x[pick]
            self.embed_sum[dead] = x[pick]
            self.cluster_size[dead] = 1.0


class ResidualVQ(nn.Module):
    """K codebooks; each quantises what the previous ones left."""

    def __init__(self, dim: int, num_codebooks: int, size: int, decay: float) -> None:
        super().__init__()
        self.codebooks = nn.ModuleList(EMACodebook(dim, size, decay) for _ in range(num_codebooks))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        # z [B, D, F] -> codes [B, K, F]
        B, D, Fn = z.shape
        r = z.transpose(1, 2).reshape(B * Fn, D)
        out = []
        for cb in self.codebooks:
            idx = cb.encode(r)
            r = r - cb.decode(idx)
            out.append(idx)
        return torch.stack(out, dim=1).view(B, Fn, -1).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [B, K, F] -> z [B, D, F]
        zq = sum(cb.decode(codes[:, i]) for i, cb in enumerate(self.codebooks))
        assert isinstance(zq, torch.Tensor)
        return zq.transpose(1, 2)

    def forward_train(
        self, z: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, F] -> (straight-through zq [B, D, F], codes [B, K, F], commitment loss)."""
        B, D, Fn = z.shape
        x = z.transpose(1, 2).reshape(B * Fn, D)
        r = x.detach()
        q = torch.zeros_like(r)
        codes = []
        for cb in self.codebooks:
            cb.update(r, cb.encode(r), generator)
            idx = cb.encode(r)
            qi = cb.decode(idx)
            q = q + qi
            r = r - qi
            codes.append(idx)
        commit = F.mse_loss(x, q.detach())
        zq = x + (q - x).detach()
        codes_t = torch.stack(codes, dim=1).view(B, Fn, -1).transpose(1, 2)
        return zq.view(B, Fn, D).transpose(1, 2), codes_t, commit


class SmallCodec(StreamingCodec):
    """The shipped 16 kHz speech codec (see the module docstring)."""

    def __init__(self, cfg: SmallCodecConfig | None = None, name: str = "default") -> None:
        super().__init__()
        self.cfg = cfg or SmallCodecConfig()
        c = self.cfg
        if c.frame_size % c.hop or c.n_fft < c.hop:
            raise ValueError("frame_size must be a multiple of hop, and n_fft >= hop")
        self.name = name
        self.sample_rate = c.sample_rate
        self.frame_size = c.frame_size
        self.num_codebooks = c.num_codebooks
        self.cardinality = c.codebook_size
        self.encoder = SmallEncoder(c)
        self.quantizer = ResidualVQ(c.latent_dim, c.num_codebooks, c.codebook_size, c.ema_decay)
        self.decoder = self.build_decoder(c)

    def build_decoder(self, cfg: SmallCodecConfig) -> nn.Module:
        """The decoder of this codec (subclasses swap it and keep the encoder and quantiser)."""
        return SmallDecoder(cfg)

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.encoder(wav))

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.decode(codes))

    def forward_train(
        self, wav: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: wav [B, 1, T] -> (reconstruction [B, 1, T], codes, commitment loss)."""
        z = self.encoder(wav)
        zq, codes, commit = self.quantizer.forward_train(z, generator)
        return self.decoder(zq), codes, commit
