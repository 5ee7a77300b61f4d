"""The codec interface both codecs implement, with the input checks they share.

Checks raise ValueError with the reason, because a wrong shape or rate silently accepted would
produce plausible-looking but wrong tokens that nobody would notice downstream.
"""

from __future__ import annotations

import torch

from duplex.streaming import StreamingModule


class StreamingCodec(StreamingModule):
    """A codec: audio [B, 1, T] <-> codes [B, K, F] (int64), one frame = `frame_size` samples.

    Subclasses set `sample_rate`, `frame_size`, `num_codebooks`, `cardinality` and implement
    `_encode(wav) -> codes` and `_decode(codes) -> wav` with modules that stream when inside
    `with self.streaming(B)`; this class checks inputs and routes offline/streaming calls.
    """

    sample_rate: int
    frame_size: int
    num_codebooks: int
    cardinality: int
    name: str = ""

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(iter(self.parameters()))
        return p.device, p.dtype

    def _check_wav(self, wav: torch.Tensor, sample_rate: int | None) -> torch.Tensor:
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(
                f"{self.name or type(self).__name__} takes {self.sample_rate} Hz audio, got "
                f"{sample_rate} Hz: resample first (duplex.codecs.resample)"
            )
        if not isinstance(wav, torch.Tensor) or not torch.is_floating_point(wav):
            raise ValueError("audio must be a floating point torch.Tensor [B, 1, T]")
        if wav.dim() != 3:
            raise ValueError(f"audio must have shape [B, 1, T], got {tuple(wav.shape)}")
        if wav.shape[1] != 1:
            raise ValueError(
                f"audio must be mono [B, 1, T], got {wav.shape[1]} channels: mix down first"
            )
        if not torch.isfinite(wav).all():
            raise ValueError("audio contains NaN or infinite samples")
        dev, dt = self._device_dtype()
        return wav.to(device=dev, dtype=dt)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.uint8,
        ):
            raise ValueError("codes must be an integer torch.Tensor [B, K, F]")
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"codes must have shape [B, {self.num_codebooks}, F], got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cardinality):
            raise ValueError(f"codes must lie in [0, {self.cardinality})")
        dev, _ = self._device_dtype()
        return codes.to(device=dev, dtype=torch.int64)

    def _check_batch(self, b: int) -> None:
        st = self._require_streaming()
        if b != st.batch_size:
            raise ValueError(f"streaming with batch size {st.batch_size}, got {b} rows")

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Offline: wav [B, 1, T] -> codes [B, K, ceil(T / frame_size)] (zero padded at the end)."""
        if self.is_streaming:
            raise RuntimeError("encode() is offline: use encode_step() inside streaming()")
        wav = self._check_wav(wav, sample_rate)
        pad = (-wav.shape[-1]) % self.frame_size
        if pad:
            wav = torch.nn.functional.pad(wav, (0, pad))
        return self._encode(wav)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Offline: codes [B, K, F] -> wav [B, 1, F * frame_size]."""
        if self.is_streaming:
            raise RuntimeError("decode() is offline: use decode_step() inside streaming()")
        return self._decode(self._check_codes(codes))

    @torch.no_grad()
    def encode_step(self, pcm: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Streaming: pcm [B, 1, n * frame_size] -> codes [B, K, n] (n >= 1 whole frames)."""
        pcm = self._check_wav(pcm, sample_rate)
        self._check_batch(pcm.shape[0])
        T = pcm.shape[-1]
        if T == 0 or T % self.frame_size:
            raise ValueError(
                f"encode_step takes whole frames of {self.frame_size} samples, got {T} samples"
            )
        return self._encode(pcm)

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor) -> torch.Tensor:
        """Streaming: codes [B, K, n] -> pcm [B, 1, n * frame_size]."""
        codes = self._check_codes(codes)
        self._check_batch(codes.shape[0])
        if codes.shape[-1] == 0:
            raise ValueError("decode_step needs at least one frame of codes")
        return self._decode(codes)
