"""The voiced decoder: the shipped codec's frozen tokens -> speech with pitch and harmonics.

Why a new decoder and not a new codec: every corpus and model is built on the existing tokens, so
the encoder and quantiser stay frozen (codes bit-identical) and only the decoder is replaced.

The network reads the quantiser's embeddings (64-d, 50 Hz) with causal dilated convolutions
(dilations 1, 3, 9, 27: 1.6 s of context, enough to infer a speaker's pitch range; an optional LSTM
carries more, at a cost in speed), upsamples to 200 Hz, and predicts per 5 ms sub-frame: log F0, a
voicing logit, and the cepstra of a harmonic and a noise filter. `HarmonicNoiseSynth` turns them
into a waveform (see duplex.codecs.synth for why this carries pitch by construction).

Training (duplex.codecs.voice_train) drives the synthesiser with F0 and voicing measured on the
training audio (teacher forcing): the filters learn real spectra under the right harmonics while
the F0 and voicing heads learn from the tracker's targets. At inference the heads drive it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from duplex.codecs.conv import FastConv1d, StreamingConv1d, StreamingLSTM, StreamingSequential
from duplex.codecs.small import ChannelNorm, ResBlock, SmallCodec, SmallCodecConfig, _PixelShuffle1d
from duplex.codecs.synth import HarmonicNoiseSynth, SynthConfig
from duplex.streaming import StreamingModule


@dataclass
class VoiceConfig:
    """Architecture of the voiced decoder (stored in the codec file's config under extra)."""

    latent_dim: int = 64
    frame_size: int = 320
    lo_channels: int = 256
    hi_channels: int = 128
    lo_dilations: tuple[int, ...] = (1, 3, 9, 27)
    hi_dilations: tuple[int, ...] = (1,)
    # an LSTM after the convolutions (slow context); off by default: see docs/codec.md
    lstm: bool = False
    # F0 is predicted as log(f0_ref) + head output (Hz)
    f0_ref: float = 120.0
    # voicing probability above which the harmonic source is switched on at inference
    voicing_threshold: float = 0.5
    synth: SynthConfig = field(default_factory=SynthConfig)

    @classmethod
    def from_dict(cls, d: dict) -> VoiceConfig:
        d = dict(d)
        synth = SynthConfig(**d.pop("synth", {}))
        for k, v in d.items():
            if isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d, synth=synth)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Controls:
    """Per sub-frame predictions: log F0 [B, J], voicing logit [B, J], cepstra [B, Q, J]."""

    log_f0: torch.Tensor
    voicing: torch.Tensor
    ceps_h: torch.Tensor
    ceps_n: torch.Tensor


class _ControlHead(nn.Module):
    """Hidden [B, C, J] -> packed controls [B, 2 + Qh + Qn, J], initialised near quiet speech."""

    def __init__(self, channels: int, synth: SynthConfig) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.proj = FastConv1d(channels, 2 + synth.harmonic_ceps + synth.noise_ceps, 1)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(channels))
        with torch.no_grad():
            self.proj.bias.zero_()
            # c0 of each filter is its log gain: start at about -40 dB
            self.proj.bias[2] = -4.0
            self.proj.bias[2 + synth.harmonic_ceps] = -5.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h))


class VoiceDecoder(StreamingModule):
    """latent [B, D, F] -> wav [B, 1, F * frame_size] through a harmonic-plus-noise synthesiser."""

    def __init__(self, cfg: VoiceConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VoiceConfig()
        c = self.cfg
        up = c.frame_size // c.synth.hop
        if up * c.synth.hop != c.frame_size:
            raise ValueError("frame_size must be a multiple of the synthesiser's hop")
        lo: list[nn.Module] = [
            StreamingConv1d.from_conv1d(FastConv1d(c.latent_dim, c.lo_channels, 3)),
            *[ResBlock(c.lo_channels, d) for d in c.lo_dilations],
        ]
        if c.lstm:
            lo += [ChannelNorm(c.lo_channels), StreamingLSTM(nn.LSTM(c.lo_channels, c.lo_channels))]
        self.net = StreamingSequential(
            *lo,
            ChannelNorm(c.lo_channels),
            FastConv1d(c.lo_channels, c.hi_channels * up, 1),
            _PixelShuffle1d(up),
            *[ResBlock(c.hi_channels, d) for d in c.hi_dilations],
            _ControlHead(c.hi_channels, c.synth),
        )
        self.synth = HarmonicNoiseSynth(c.synth)

    def train(self, mode: bool = True) -> VoiceDecoder:
        """Train in float32; evaluate in float64.

        Why float64 at inference: the oscillator integrates F0 over the whole stream, so float32
        rounding differences between chunkings (matrix products of different shapes round
        differently) would grow into audible phase drift and break streamed == offline; in
        float64 the network's output does not depend on the chunking here (tests check it).
        """
        super().train(mode)
        return self.float() if mode else self.double()

    def controls(self, latent: torch.Tensor) -> Controls:
        """The network's predictions for latent [B, D, F] (J = 4 F sub-frames)."""
        p = next(iter(self.parameters()))
        y = self.net(latent.to(p.dtype))
        qh = self.cfg.synth.harmonic_ceps
        return Controls(
            log_f0=math.log(self.cfg.f0_ref) + y[:, 0],
            voicing=y[:, 1],
            ceps_h=y[:, 2 : 2 + qh],
            ceps_n=y[:, 2 + qh :],
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        c = self.controls(latent)
        gate = (torch.sigmoid(c.voicing) > self.cfg.voicing_threshold).to(c.log_f0.dtype)
        return self.synth(torch.exp(c.log_f0), gate, c.ceps_h, c.ceps_n).float()

    def forward_train(
        self,
        latent: torch.Tensor,
        f0: torch.Tensor,
        voiced: torch.Tensor,
        offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Controls]:
        """Teacher-forced pass: the synthesiser uses the given F0 [B, J] (Hz, filled where
        unvoiced) and voicing [B, J] (0/1); returns the waveform and the predictions."""
        c = self.controls(latent)
        wav = self.synth(f0, voiced.float(), c.ceps_h, c.ceps_n, offset)
        return wav, c


class VoicedCodec(SmallCodec):
    """The small codec's frozen encoder and quantiser with the voiced decoder."""

    def build_decoder(self, cfg: SmallCodecConfig) -> nn.Module:
        voice = VoiceConfig.from_dict(cfg.extra.get("voice", {}))
        return VoiceDecoder(voice)


def voiced_config(base: SmallCodecConfig, voice: VoiceConfig | None = None) -> SmallCodecConfig:
    """The codec config of a voiced codec built on `base` (encoder and quantiser unchanged)."""
    d = base.to_dict()
    d["extra"] = {"decoder": "voice", "voice": (voice or VoiceConfig()).to_dict()}
    return SmallCodecConfig.from_dict(d)
