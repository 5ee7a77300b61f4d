"""Streaming audio codecs: EnCodec 24 kHz and the small codec duplex trains and ships.

`load(name_or_path)` returns a `StreamingCodec` (see `duplex.codecs.base`); `available()` lists the
names. "default" is the small shipped codec (16 kHz, 50 Hz frames, 8 x 256 codes), loaded from
package data with no network. Heavy imports (the `encodec` package) happen only when needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duplex.codecs.base import StreamingCodec
from duplex.codecs.resample import resample

if TYPE_CHECKING:
    from duplex.codecs.small import SmallCodecConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
# "default" is the voiced decoder (issue 13); "default-v1" the first decoder on the same tokens,
# kept so the two can be compared (it reproduces no pitch: a whisper).
SHIPPED = {
    "default": WEIGHTS_DIR / "default.safetensors",
    "default-v1": WEIGHTS_DIR / "default-v1.safetensors",
}

__all__ = ["StreamingCodec", "available", "load", "load_small", "resample", "small_codec"]


def available() -> list[str]:
    """Every codec name `load` accepts (shipped small codecs and EnCodec 24 kHz)."""
    return [*sorted(SHIPPED), "encodec_24khz"]


def small_codec(cfg: SmallCodecConfig, name: str = "") -> StreamingCodec:
    """A small codec of config `cfg` with random weights: the decoder kind comes from the config."""
    from duplex.codecs.small import SmallCodec
    from duplex.codecs.voiced import VoicedCodec

    kind = cfg.extra.get("decoder", "spectral")
    if kind == "voice":
        return VoicedCodec(cfg, name=name)
    if kind == "spectral":
        return SmallCodec(cfg, name=name)
    raise ValueError(f"unknown small-codec decoder {kind!r} in the config")


def load_small(
    path: str | Path, device: str | torch.device = "cpu", name: str = ""
) -> StreamingCodec:
    """A small codec from a safetensors file written by `duplex train codec`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from duplex.codecs.small import SmallCodecConfig

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"codec weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no codec config in its metadata: not a duplex codec file")
    cfg = SmallCodecConfig.from_dict(json.loads(meta["config"]))
    codec = small_codec(cfg, name=name or path.stem)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = codec.load_state_dict(sd, strict=False)
    needed = [k for k in missing if not k.endswith(("embed_sum", "cluster_size", "initialized"))]
    if needed or unexpected:
        raise ValueError(f"{path} does not match the codec: missing {needed}, extra {unexpected}")
    if missing:
        # Shipped files leave out the codebooks' EMA statistics (training only). Set them from
        # the codebooks rather than leaving construction-time random values: they are part of the
        # state dict, so a codec's fingerprint (recordings, state files) must not depend on the
        # random generator's position when it was loaded.
        from duplex.codecs.small import ResidualVQ

        quantizer = getattr(codec, "quantizer", None)
        if isinstance(quantizer, ResidualVQ):
            with torch.no_grad():
                for cb in quantizer.codebooks:
                    cb.embed_sum.copy_(cb.embed)
                    cb.cluster_size.fill_(1.0)
                    cb.initialized.fill_(True)
    return codec.to(device).eval()


def load(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    pretrained: bool = True,
    bandwidth: float = 6.0,
    download: bool = True,
) -> StreamingCodec:
    """Load a codec by name ("default", "encodec_24khz") or from a .safetensors path.

    `pretrained=False` gives random weights (architecture only). `bandwidth` (kbps) applies to
    EnCodec; `download=False` forbids fetching EnCodec's weights when they are not cached.
    """
    name = str(name_or_path)
    if name == "encodec_24khz":
        from duplex.codecs.encodec_stream import load_encodec_24khz

        return load_encodec_24khz(pretrained, bandwidth, download).to(device)
    if name in SHIPPED:
        if not pretrained:
            from duplex.codecs.small import SmallCodecConfig
            from duplex.codecs.voiced import voiced_config

            cfg = voiced_config(SmallCodecConfig()) if name == "default" else SmallCodecConfig()
            return small_codec(cfg, name=name).to(device).eval()
        return load_small(SHIPPED[name], device, name=name)
    if name.endswith(".safetensors") or Path(name).exists():
        return load_small(name, device)
    raise ValueError(f"unknown codec {name!r}: choose one of {available()} or a .safetensors path")
