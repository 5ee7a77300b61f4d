"""An independent intelligibility judge: offline pocketsphinx over a closed vocabulary.

Why closed vocabulary: pocketsphinx's stock English language model recognises espeak-ng's formant
voices poorly (about 10% word accuracy on clean synthetic speech), too noisy a base for a ratio.
Restricting it to the words our synthetic sentences can use (a uniform unigram model, so word
order gives no hint) keeps it a real acoustic test while making the original's accuracy high
enough that "round trip / original" measures what a codec loses.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duplex.codecs.resample import resample


def vocabulary() -> list[str]:
    """Every word the synthetic sentences (train templates and eval sentences) can contain."""
    from duplex.data import speech as S

    words: set[str] = set()
    for s in S.EVAL_SENTENCES:
        words |= set(s.split())
    for lst in (S._NOUNS, S._ADJECTIVES, S._VERBS_PAST, S._VERBS_BASE, S._NUMBERS, S._NAMES):
        words |= set(lst)
    for phrases in (S._PLACES, S._TIMES):
        for p in phrases:
            words |= set(p.split())
    words |= set(
        [
            "a",
            "the",
            "and",
            "i",
            "you",
            "your",
            "is",
            "was",
            "to",
            "of",
            "in",
            "on",
            "at",
            "it",
            "so",
            "why",
            "did",
            "will",
            "there",
            "were",
        ]
    )
    return sorted(words)


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions)."""
    prev = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        cur = [i] + [0] * len(hyp)
        for j in range(1, len(hyp) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ref[i - 1] != hyp[j - 1]))
        prev = cur
    return prev[-1]


def word_accuracy(reference: str, hypothesis: str) -> float:
    """1 - word error rate, floored at 0."""
    r, h = reference.split(), hypothesis.split()
    if not r:
        return 1.0 if not h else 0.0
    return max(0.0, 1.0 - word_errors(r, h) / len(r))


class Judge:
    """pocketsphinx recogniser limited to `words` (default: `vocabulary()`)."""

    sample_rate = 16000

    def __init__(self, words: Iterable[str] | None = None) -> None:
        from pocketsphinx import Decoder

        probe = Decoder(samprate=self.sample_rate, loglevel="FATAL")
        vocab = sorted(w for w in (words or vocabulary()) if probe.lookup_word(w))
        self.words = vocab
        lp = math.log10(1.0 / len(vocab))
        lines = [
            "\\data\\",
            f"ngram 1={len(vocab) + 2}",
            "",
            "\\1-grams:",
            "-99 <s>",
            f"{lp:.4f} </s>",
        ]
        lines += [f"{lp:.4f} {w}" for w in vocab]
        lines += ["", "\\end\\", ""]
        self._dir = tempfile.TemporaryDirectory(prefix="duplex-asr-")
        lm = Path(self._dir.name) / "vocab.arpa"
        lm.write_text("\n".join(lines))
        self._lm = str(lm)
        # Only the vocabulary's pronunciations: loading the whole English dictionary made each
        # fresh decoder take seconds; the recogniser can only output these words anyway.
        pron = Path(self._dir.name) / "vocab.dict"
        entries = []
        for w in vocab:
            entries.append(f"{w} {probe.lookup_word(w)}\n")
            # Alternative pronunciations are listed as WORD(2), WORD(3), ...
            for i in range(2, 10):
                alt = probe.lookup_word(f"{w}({i})")
                if not alt:
                    break
                entries.append(f"{w}({i}) {alt}\n")
        pron.write_text("".join(entries))
        self._dict = str(pron)

    def _new_decoder(self) -> Any:
        from pocketsphinx import Decoder

        return Decoder(samprate=self.sample_rate, loglevel="FATAL", lm=self._lm, dict=self._dict)

    def transcribe(self, audio: np.ndarray | torch.Tensor, sample_rate: int) -> str:
        """Mono audio [T] (any rate; peak-normalised here) -> recognised words."""
        x = torch.as_tensor(audio, dtype=torch.float32).reshape(-1)
        x = resample(x, sample_rate, self.sample_rate)
        x = x / x.abs().max().clamp_min(1e-4) * 0.7
        pcm = (x.numpy() * 32767).astype(np.int16).tobytes()
        # A fresh decoder per utterance (~0.5 s): a reused one carries state (noise estimate,
        # cepstral mean) from the previous utterance and changed about 1 transcript in 10.
        d = self._new_decoder()
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        return hyp.hypstr if hyp is not None else ""
