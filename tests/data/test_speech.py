"""Synthetic speech: disjoint splits, exact word timing, determinism, augmentation, corpus I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex.data import speech as S
from duplex.data.asr import Judge, vocabulary, word_accuracy


def test_splits_are_disjoint() -> None:
    assert not set(S.TRAIN_ACCENTS) & set(S.EVAL_ACCENTS)
    assert not set(S.TRAIN_VARIANTS) & set(S.EVAL_VARIANTS)
    train = S.voices("train")
    assert len(train) == len(S.TRAIN_ACCENTS) * len(S.TRAIN_VARIANTS)
    assert not set(train) & set(S.voices("eval"))
    with pytest.raises(ValueError, match="split"):
        S.voices("test")


def test_training_sentences_never_eval_sentences() -> None:
    rng = np.random.default_rng(0)
    seen = {S.random_sentence(rng) for _ in range(3000)}
    assert len(seen) > 2000
    assert not seen & set(S.EVAL_SENTENCES)


def test_synthesize_is_deterministic_and_sane() -> None:
    v = S.Voice("en-us", "f2", rate=170, pitch=40)
    a = S.synthesize("hello there my friend", v)
    b = S.synthesize("hello there my friend", v)
    assert a.sample_rate == 16000
    assert a.audio.dtype == np.float32
    assert 0.5 < a.duration < 3.0
    assert np.array_equal(a.audio, b.audio)
    assert 0.05 < np.abs(a.audio).max() <= 1.0
    # another voice gives other audio
    c = S.synthesize("hello there my friend", S.Voice("en-gb", "m2", rate=170, pitch=40))
    assert len(c.audio) != len(a.audio) or not np.allclose(c.audio, a.audio)


def test_word_timing_is_exact() -> None:
    text = "the quick brown fox jumps"
    u = S.synthesize_words(text, S.Voice("en-us", "", rate=160, pitch=50), gap_s=(0.1, 0.1))
    assert [w.word for w in u.words] == text.split()
    sr = u.sample_rate
    prev_end = 0.0
    for w in u.words:
        assert w.start >= prev_end and w.end > w.start
        seg = u.audio[round(w.start * sr) : round(w.end * sr)]
        # each word span holds speech: its first and last samples are above the trim threshold
        assert np.sqrt(np.mean(seg**2)) > 0.01
        prev_end = w.end
    assert u.words[-1].end <= u.duration
    # gaps between words are silent, exactly 0.1 s long
    for a, b in zip(u.words, u.words[1:], strict=False):
        assert b.start - a.end == pytest.approx(0.1, abs=1.5 / sr)
        gap = u.audio[round(a.end * sr) + 1 : round(b.start * sr) - 1]
        assert np.all(gap == 0)


def test_empty_text_rejected() -> None:
    with pytest.raises(ValueError, match="no words"):
        S.synthesize_words("  ", S.Voice("en-us"))


def test_augment() -> None:
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.sin(torch.linspace(0, 2000, 16000)).repeat(8, 1, 1)
    y = S.augment(x, g)
    assert y.shape == x.shape
    assert y.abs().max() <= 1.0
    assert torch.isfinite(y).all()
    # rows get different levels and noise
    rms = y.pow(2).mean(-1).sqrt().flatten()
    assert rms.max() / rms.min() > 1.5
    y2 = S.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)


def test_corpus_roundtrip(tmp_path) -> None:
    c = S.build_corpus("eval", 3, seed=1)
    assert len(c) == 3
    assert [m["text"] for m in c.meta] == list(S.EVAL_SENTENCES[:3])
    for m in c.meta:
        assert (m["voice"]["accent"], m["voice"]["variant"]) in S.voices("eval")
    p = tmp_path / "c.npz"
    c.save(p)
    d = S.Corpus.load(p)
    assert np.array_equal(c.audio, d.audio) and d.meta == c.meta
    crops = d.random_crops(4, 8000, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 1, 8000)
    assert crops.abs().sum() > 0


def test_word_accuracy() -> None:
    assert word_accuracy("a b c d", "a b c d") == 1.0
    assert word_accuracy("a b c d", "a x c d") == 0.75
    assert word_accuracy("a b c d", "a c d") == 0.75
    assert word_accuracy("a b", "x y z w v") == 0.0


def test_judge_hears_clean_speech_not_noise() -> None:
    judge = Judge()
    assert set(judge.words) <= set(vocabulary())
    accs, accs_noise = [], []
    for i, text in enumerate(S.EVAL_SENTENCES[:3]):
        u = S.synthesize(text, S.Voice("en-us-nyc", "klatt4", rate=150, pitch=50))
        accs.append(word_accuracy(text, judge.transcribe(u.audio, u.sample_rate)))
        noise = np.random.default_rng(i).normal(0, 0.1, len(u.audio)).astype(np.float32)
        accs_noise.append(word_accuracy(text, judge.transcribe(noise, u.sample_rate)))
    # a weak judge on formant speech (about 0.5 here), but far above noise
    assert np.mean(accs) >= 0.35
    assert np.mean(accs_noise) < 0.1
    # transcripts do not depend on what was decoded before
    u = S.synthesize(S.EVAL_SENTENCES[0], S.Voice("en-us-nyc", "klatt4", rate=150, pitch=50))
    assert judge.transcribe(u.audio, 16000) == Judge().transcribe(u.audio, 16000)
