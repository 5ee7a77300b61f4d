"""Frame-by-frame streaming for Meta's EnCodec 24 kHz, reusing the `encodec` package's modules.

The package encodes a whole signal at once: its SConv1d re-pads every call, its SLSTM drops
(h, c) and its SConvTranspose1d trims its tail, so encoding consecutive blocks is not the same as
encoding the whole signal. Here each of those modules is wrapped (not copied) by a streaming
counterpart from `duplex.codecs.conv` that calls the package's own submodule with its weights;
the package's `EncodecModel` stays the holder of the weights (`codec.model`), so its own offline
`encode`/`decode` is the reference.

Stream start: the package pads causal convolutions with *reflect* padding, i.e. the padding
before sample 0 is a mirror of samples 1..p of the layer's own input. Deep layers run at 75 Hz or
less, where p input steps of the layer are several future frames, which a stream does not have
yet. The streaming wrappers therefore start from zero history (as Moshi's do). The difference
enters the LSTM state and decays geometrically (on random weights, about 3.5x every 3 frames, to
float rounding by frame ~30 for the encoder's output and ~8 for the decoder's audio), so codes and
audio differ from the package's offline output only near the start; the tests check that codes
are equal and audio within 1e-5 relative RMS from `WARMUP_FRAMES` on. Our own offline
`encode`/`decode` use the same zero history, so they equal the streamed output exactly.
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import torch
from torch import nn

from duplex.codecs.base import StreamingCodec
from duplex.codecs.conv import (
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingLSTM,
    StreamingSequential,
)
from duplex.streaming import StreamingModule

CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
CHECKPOINT_SHA256_PREFIX = "d7cc33bc"
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)
# Frames (0.32 s) after which streamed output matches the package's offline output (module doc).
WARMUP_FRAMES = 24


class CodecWeightsMissing(FileNotFoundError):
    """Pretrained weights are not on disk and could not be downloaded."""


def checkpoint_dir() -> Path:
    """Where torch hub keeps checkpoints (respects TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pretrained_model(download: bool) -> nn.Module:
    from encodec import EncodecModel

    path = checkpoint_dir() / CHECKPOINT_NAME
    if not path.exists():
        missing = (
            f"EnCodec 24 kHz weights not found: put {CHECKPOINT_NAME} in {checkpoint_dir()} "
            "(or set TORCH_HOME), or run once with network access to download it"
        )
        if not download:
            raise CodecWeightsMissing(missing)
        try:
            return EncodecModel.encodec_model_24khz(pretrained=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise CodecWeightsMissing(f"{missing} (download failed: {e})") from e
    digest = _sha256(path)
    if not digest.startswith(CHECKPOINT_SHA256_PREFIX):
        raise ValueError(
            f"{path} has sha256 {digest[:8]}..., expected {CHECKPOINT_SHA256_PREFIX}...: "
            "the file is corrupt or not EnCodec 24 kHz; delete it and download again"
        )
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def _wrap(m: nn.Module) -> nn.Module:
    """The streaming counterpart of one of the package's modules (sharing its weights)."""
    from encodec.modules.conv import SConv1d, SConvTranspose1d
    from encodec.modules.lstm import SLSTM
    from encodec.modules.seanet import SEANetResnetBlock

    if isinstance(m, SConv1d):
        if not m.causal:
            raise ValueError("only causal EnCodec models can stream")
        c = m.conv.conv
        # With weight norm the norm module is an Identity, so the inner Conv1d is the whole op.
        plain = isinstance(m.conv.norm, nn.Identity) and c.groups == 1 and c.padding == (0,)
        return StreamingConv1d(
            m.conv,
            c.in_channels,
            c.kernel_size[0],
            c.stride[0],
            c.dilation[0],
            gemm=c if plain else None,
        )
    if isinstance(m, SConvTranspose1d):
        if not m.causal or m.trim_right_ratio != 1.0:
            raise ValueError("only causal EnCodec models with trim_right_ratio=1 can stream")
        c = m.convtr.convtr
        plain = isinstance(m.convtr.norm, nn.Identity) and c.groups == 1 and c.padding == (0,)
        return StreamingConvTranspose1d(
            m.convtr,
            c.out_channels,
            c.kernel_size[0],
            c.stride[0],
            bias=c.bias,
            gemm=c if plain else None,
        )
    if isinstance(m, SLSTM):
        return StreamingLSTM(m.lstm, skip=m.skip)
    if isinstance(m, SEANetResnetBlock):
        return _StreamingResnetBlock(_wrap(m.block), _wrap(m.shortcut))
    if isinstance(m, nn.Sequential):
        return StreamingSequential(*[_wrap(x) for x in m])
    return m


class _StreamingResnetBlock(StreamingModule):
    """shortcut(x) + block(x), as SEANetResnetBlock, with streaming children."""

    def __init__(self, block: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class EncodecCodec(StreamingCodec):
    """EnCodec 24 kHz, offline and frame by frame (320 samples = 13.3 ms per frame)."""

    def __init__(self, model: nn.Module, bandwidth: float = 6.0, name: str = "encodec_24khz"):
        super().__init__()
        self.model = model
        self.name = name
        self.sample_rate = int(model.sample_rate)
        self.frame_size = int(torch.prod(torch.tensor(model.encoder.ratios)))
        self.cardinality = int(model.quantizer.bins)
        self.encoder = _wrap(model.encoder.model)
        self.decoder = _wrap(model.decoder.model)
        self.set_bandwidth(bandwidth)

    @property
    def bandwidth(self) -> float:
        return float(self.model.bandwidth)

    def set_bandwidth(self, bandwidth: float) -> None:
        """Choose 1.5, 3, 6, 12 or 24 kbps (2, 4, 8, 16 or 32 codebooks)."""
        if bandwidth not in BANDWIDTHS:
            raise ValueError(f"bandwidth must be one of {BANDWIDTHS} kbps, got {bandwidth}")
        if self.is_streaming:
            raise RuntimeError("cannot change the bandwidth while streaming")
        self.model.set_target_bandwidth(bandwidth)
        fr = self.model.frame_rate
        self.num_codebooks = int(
            self.model.quantizer.get_num_quantizers_for_bandwidth(fr, bandwidth)
        )

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        # wav [B, 1, T] -> emb [B, D, F] -> codes [K, B, F] -> [B, K, F]
        emb = self.encoder(wav)
        codes = self.model.quantizer.encode(emb, self.model.frame_rate, self.model.bandwidth)
        return codes.transpose(0, 1)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [B, K, F] -> emb [B, D, F] -> wav [B, 1, F * frame_size]
        emb = self.model.quantizer.decode(codes.transpose(0, 1))
        return self.decoder(emb)


@torch.no_grad()
def _random_codebooks(model: nn.Module, seed: int = 0) -> None:
    """Give a random-weight model usable codebooks.

    The package initialises codebooks to zeros and fills them by k-means on the first training
    batch, so an untrained model maps every frame to code 0, which would make any test of its
    codes vacuous. Here each codebook takes random residual vectors of the random encoder's output
    on seeded noise (with a little jitter), as that k-means initialisation would.
    """
    g = torch.Generator().manual_seed(seed)
    # [1, 1, 2 s] noise -> emb [1, D, 150] -> rows [150, D]
    noise = 0.1 * torch.randn(1, 1, 2 * int(model.sample_rate), generator=g)
    r = model.encoder(noise)[0].t()
    for layer in model.quantizer.vq.layers:
        cb = layer._codebook
        n = cb.embed.shape[0]
        pick = torch.randint(0, r.shape[0], (n,), generator=g)
        jitter = torch.randn(n, r.shape[1], generator=g) * r.std() * 0.5
        embed = r[pick] + jitter
        cb.embed.copy_(embed)
        cb.embed_avg.copy_(embed)
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1.0)
        r = r - cb.decode(cb.encode(r))


def load_encodec_24khz(
    pretrained: bool = True, bandwidth: float = 6.0, download: bool = True
) -> EncodecCodec:
    """EnCodec 24 kHz: Meta's weights from the torch hub cache (downloaded when allowed and
    missing, hash checked) or, with `pretrained=False`, the same architecture with random weights.
    """
    if pretrained:
        model = _pretrained_model(download)
    else:
        from encodec import EncodecModel

        model = EncodecModel.encodec_model_24khz(pretrained=False)
        _random_codebooks(model)
    model.eval()
    codec = EncodecCodec(model, bandwidth=bandwidth)
    return codec.eval()
