"""Both codecs: streaming equals offline, causality, exec masks, snapshots, bad input, loading."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from duplex import codecs
from duplex.codecs.base import StreamingCodec
from duplex.codecs.encodec_stream import (
    CHECKPOINT_NAME,
    WARMUP_FRAMES,
    CodecWeightsMissing,
    EncodecCodec,
    checkpoint_dir,
)
from duplex.codecs.small import SmallCodec
from duplex.codecs.voiced import VoicedCodec

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_grad():
    """These tests only run codecs forward; grad mode is per test, never global."""
    with torch.no_grad():
        yield


def _small() -> SmallCodec:
    torch.manual_seed(0)
    codec = SmallCodec().eval()
    # spread the random codebooks so random weights still use many codes
    for cb in codec.quantizer.codebooks:
        cb.embed.normal_(0, 0.3)
    return codec


def _voiced() -> VoicedCodec:
    torch.manual_seed(1)
    codec = codecs.load("default", pretrained=False)
    assert isinstance(codec, VoicedCodec)
    for cb in codec.quantizer.codebooks:
        cb.embed.normal_(0, 0.3)
    # random heads: spread the voicing logits so both voiced and unvoiced sub-frames occur
    head = codec.decoder.net.layers[-1].proj
    with torch.no_grad():
        head.weight[1].normal_(0, 0.3)
    return codec


@pytest.fixture(scope="module")
def encodec() -> EncodecCodec:
    torch.manual_seed(0)
    codec = codecs.load("encodec_24khz", pretrained=False)
    assert isinstance(codec, EncodecCodec)
    return codec


@pytest.fixture(scope="module")
def small() -> SmallCodec:
    return _small()


@pytest.fixture(scope="module")
def voiced() -> VoicedCodec:
    return _voiced()


@pytest.fixture(params=["small", "voiced", "encodec"])
def codec(
    request: pytest.FixtureRequest, small: SmallCodec, voiced: VoicedCodec, encodec: EncodecCodec
) -> StreamingCodec:
    return {"small": small, "voiced": voiced, "encodec": encodec}[request.param]


def _audio(codec: StreamingCodec, batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # [B, 1, T]: noise with a slow envelope, roughly speech-like in level changes
    T = frames * codec.frame_size
    env = torch.linspace(0, 6.28 * 3, T).sin().abs() + 0.1
    return 0.3 * env * torch.randn(batch, 1, T, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def _stream_encode(codec: StreamingCodec, x: torch.Tensor, chunk: int) -> torch.Tensor:
    n = chunk * codec.frame_size
    with codec.streaming(x.shape[0]):
        return torch.cat(
            [codec.encode_step(x[..., s : s + n]) for s in range(0, x.shape[-1], n)], -1
        )


def _stream_decode(codec: StreamingCodec, codes: torch.Tensor, chunk: int) -> torch.Tensor:
    with codec.streaming(codes.shape[0]):
        parts = [
            codec.decode_step(codes[..., s : s + chunk]) for s in range(0, codes.shape[-1], chunk)
        ]
    return torch.cat(parts, -1)


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_stream_equals_offline(codec: StreamingCodec, chunk: int) -> None:
    x = _audio(codec, 2, 15)
    codes = codec.encode(x)
    assert codes.shape == (2, codec.num_codebooks, 15)
    assert codes.dtype == torch.int64
    assert torch.equal(_stream_encode(codec, x, chunk), codes)
    # the test means something only if codes vary
    assert codes.unique().numel() > 10
    wav = codec.decode(codes)
    assert wav.shape == (2, 1, 15 * codec.frame_size)
    assert _rel(_stream_decode(codec, codes, chunk), wav) <= 1e-5


@pytest.mark.parametrize("chunk,bw", [(1, 24.0), (2, 6.0), (7, 1.5)])
def test_encodec_stream_matches_package_after_warmup(
    encodec: EncodecCodec, chunk: int, bw: float
) -> None:
    # The package pads with reflect padding at the start, which a stream cannot reproduce for
    # its deep low-rate layers (see encodec_stream's docstring): outputs may differ only in the
    # first WARMUP_FRAMES frames.
    encodec.set_bandwidth(bw)
    try:
        x = _audio(encodec, 2, WARMUP_FRAMES + 14, seed=3)
        ref_codes = encodec.model.encode(x)[0][0]
        codes = _stream_encode(encodec, x, chunk)
        assert codes.shape == ref_codes.shape
        assert torch.equal(codes[..., WARMUP_FRAMES:], ref_codes[..., WARMUP_FRAMES:])
        ref_wav = encodec.model.decode([(ref_codes, None)])
        wav = _stream_decode(encodec, ref_codes, chunk)
    finally:
        encodec.set_bandwidth(6.0)
    cut = WARMUP_FRAMES * encodec.frame_size
    assert wav.shape == ref_wav.shape
    assert _rel(wav[..., cut:], ref_wav[..., cut:]) <= 1e-5
    # the bound is not vacuous: the start does differ (reflect vs zero padding)
    assert _rel(wav[..., : encodec.frame_size], ref_wav[..., : encodec.frame_size]) > 1e-3


@pytest.mark.parametrize("bw,k", [(1.5, 2), (3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32)])
def test_encodec_bandwidths(encodec: EncodecCodec, bw: float, k: int) -> None:
    encodec.set_bandwidth(bw)
    try:
        x = _audio(encodec, 1, 4)
        codes = encodec.encode(x)
        assert codes.shape == (1, k, 4)
        assert torch.equal(_stream_encode(encodec, x, 1), codes)
        assert encodec.decode(codes).shape == (1, 1, 4 * 320)
    finally:
        encodec.set_bandwidth(6.0)
    with pytest.raises(ValueError, match="bandwidth"):
        encodec.set_bandwidth(5.0)


def test_causal_prefix(codec: StreamingCodec) -> None:
    x = _audio(codec, 1, 12, seed=5)
    codes = codec.encode(x)
    wav = codec.decode(codes)
    F = codec.frame_size
    for n in (1, 4, 9):
        assert torch.equal(codec.encode(x[..., : n * F]), codes[..., :n])
        assert _rel(codec.decode(codes[..., :n]), wav[..., : n * F]) <= 1e-5
    # a different future leaves past codes and audio unchanged, and does change the future
    y = x.clone()
    y[..., 6 * F :] = torch.randn_like(y[..., 6 * F :])
    cy = codec.encode(y)
    assert torch.equal(cy[..., :6], codes[..., :6])
    assert not torch.equal(cy[..., 6:], codes[..., 6:])
    wy = codec.decode(cy)
    assert _rel(wy[..., : 6 * F], wav[..., : 6 * F]) <= 1e-5


def test_exec_mask_and_reset_rows(codec: StreamingCodec) -> None:
    x = _audio(codec, 3, 8, seed=7)
    F = codec.frame_size
    ref = codec.encode(x)
    ref_wav = codec.decode(ref)
    with codec.streaming(3):
        got = []
        wav = []
        for f in range(8):
            # row 1 skips frames 2 and 3 (it is fed garbage and must ignore it)
            mask = torch.tensor([True, f not in (2, 3), True])
            codec.set_exec_mask(mask)
            pcm = x[..., f * F : (f + 1) * F].clone()
            if f in (2, 3):
                pcm[1] = torch.randn_like(pcm[1])
            got.append(codec.encode_step(pcm))
            wav.append(codec.decode_step(ref[..., f : f + 1]))
        codes = torch.cat(got, -1)
        wav_t = torch.cat(wav, -1)
    assert torch.equal(codes[[0, 2]], ref[[0, 2]])
    # row 1 as if it had only ever seen frames 0, 1, 4, 5, 6, 7
    keep = torch.tensor([0, 1, 4, 5, 6, 7])
    x1 = torch.cat([x[1:2, :, f * F : (f + 1) * F] for f in keep.tolist()], -1)
    ref1 = codec.encode(x1)
    assert torch.equal(codes[1, :, keep], ref1[0])
    assert _rel(wav_t[[0, 2]], ref_wav[[0, 2]]) <= 1e-5

    # reset_rows: a new session taking slot 0 mid-stream starts from the initial state
    with codec.streaming(2):
        codec.encode_step(x[:2, :, : 3 * F])
        codec.reset_rows(torch.tensor([True, False]))
        after = codec.encode_step(x[:2, :, 3 * F : 6 * F])
    assert torch.equal(after[0], codec.encode(x[:1, :, 3 * F : 6 * F])[0])
    assert torch.equal(after[1], ref[1, :, 3:6])


def test_snapshot_restore(codec: StreamingCodec) -> None:
    x = _audio(codec, 2, 10, seed=9)
    F = codec.frame_size
    codes = codec.encode(x)
    with codec.streaming(2):
        codec.encode_step(x[..., : 4 * F])
        codec.decode_step(codes[..., :4])
        snap = codec.get_state()
        a = codec.encode_step(x[..., 4 * F :])
        wa = codec.decode_step(codes[..., 4:])
        codec.set_state(snap)
        b = codec.encode_step(x[..., 4 * F :])
        wb = codec.decode_step(codes[..., 4:])
    assert torch.equal(a, b)
    assert torch.equal(a, codes[..., 4:])
    assert torch.equal(wa, wb)


def test_bad_input(codec: StreamingCodec) -> None:
    F = codec.frame_size
    with pytest.raises(ValueError, match="channels"):
        codec.encode(torch.zeros(1, 2, F))
    with pytest.raises(ValueError, match="Hz"):
        codec.encode(torch.zeros(1, 1, F), sample_rate=codec.sample_rate + 1)
    with pytest.raises(ValueError, match="NaN"):
        bad = torch.zeros(1, 1, F)
        bad[0, 0, 3] = float("nan")
        codec.encode(bad)
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        codec.encode(torch.zeros(1, F))
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        codec.encode(torch.zeros(1, 1, F, dtype=torch.int16))
    with pytest.raises(ValueError, match="codes"):
        codec.decode(torch.zeros(1, codec.num_codebooks + 1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="codes"):
        codec.decode(torch.full((1, codec.num_codebooks, 2), codec.cardinality))
    with codec.streaming(2):
        with pytest.raises(ValueError, match="whole frames"):
            codec.encode_step(torch.zeros(2, 1, F - 1))
        with pytest.raises(ValueError, match="batch size"):
            codec.encode_step(torch.zeros(3, 1, F))
        with pytest.raises(ValueError, match="NaN"):
            codec.encode_step(torch.full((2, 1, F), float("nan")))
        with pytest.raises(ValueError, match="Hz"):
            codec.encode_step(torch.zeros(2, 1, F), sample_rate=8000)
        with pytest.raises(RuntimeError, match="offline"):
            codec.encode(torch.zeros(2, 1, F))
    with pytest.raises(RuntimeError, match="streaming"):
        codec.encode_step(torch.zeros(2, 1, F))


def test_offline_pads_partial_frame(codec: StreamingCodec) -> None:
    x = _audio(codec, 1, 3)
    F = codec.frame_size
    codes = codec.encode(x[..., : 2 * F + 5])
    assert codes.shape[-1] == 3
    assert torch.equal(codes[..., :2], codec.encode(x)[..., :2])


def test_encodec_pretrained_missing_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert checkpoint_dir() == tmp_path / "hub" / "checkpoints"
    with pytest.raises(CodecWeightsMissing) as e:
        codecs.load("encodec_24khz", download=False)
    assert CHECKPOINT_NAME in str(e.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(CodecWeightsMissing, match="download failed") as e:
        codecs.load("encodec_24khz")
    assert CHECKPOINT_NAME in str(e.value)


def test_encodec_checkpoint_hash_checked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    d = tmp_path / "hub" / "checkpoints"
    d.mkdir(parents=True)
    (d / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="sha256"):
        codecs.load("encodec_24khz")


def test_encodec_wraps_package_model(encodec: EncodecCodec) -> None:
    from encodec import EncodecModel

    assert isinstance(encodec.model, EncodecModel)
    assert encodec.sample_rate == 24000 and encodec.frame_size == 320
    assert encodec.frame_rate == 75
    assert encodec.cardinality == 1024
    # weights are shared with the package model, not copied
    ids = {id(p) for p in encodec.model.parameters()}
    assert all(id(p) in ids for p in encodec.encoder.parameters())
    assert all(id(p) in ids for p in encodec.decoder.parameters())


def test_available_and_unknown() -> None:
    names = codecs.available()
    assert "default" in names and "encodec_24khz" in names
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.load("nope")
