"""Synthetic speech from espeak-ng: many voices, rates and pitches, with exact word timing.

Why synthetic: the project ships everything it needs and downloads nothing, so its codec and its
conversational model learn from speech it makes itself. espeak-ng is fast (hundreds of times real
time), has dozens of voice variants and accents, and is deterministic for a given text and voice.

Word timing is exact because words can be synthesised one at a time and concatenated with chosen
gaps (`synthesize_words`); whole sentences (`synthesize`) sound more natural but carry no timing.

Splits: voices and sentences are divided into "train" and "eval" so quality can be measured on
speakers and texts the codec or model never saw. Eval voices use an accent and variants that no
training voice uses; eval sentences are a fixed hand-written list that the training generator never
produces (its templates differ and it rejects any exact match).

`duplex data speech` writes a corpus file (`.npz`: concatenated audio plus offsets and metadata).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from duplex.codecs.resample import resample

ESPEAK_RATE = 22050

# The word tables and voices are data (speech_words.json): accents and espeak-ng voice variants
# (`-v ACCENT+VARIANT`), split into training and held-out evaluation ones that never appear in
# training; the training sentence templates' words; and hand-written held-out sentences that the
# templates never produce.
_TABLES = json.loads(Path(__file__).with_name("speech_words.json").read_text(encoding="utf-8"))
TRAIN_ACCENTS: tuple[str, ...] = tuple(_TABLES["train_accents"])
EVAL_ACCENTS: tuple[str, ...] = tuple(_TABLES["eval_accents"])
TRAIN_VARIANTS: tuple[str, ...] = tuple(_TABLES["train_variants"])
EVAL_VARIANTS: tuple[str, ...] = tuple(_TABLES["eval_variants"])
EVAL_SENTENCES: tuple[str, ...] = tuple(_TABLES["eval_sentences"])
_NOUNS: list[str] = _TABLES["nouns"]
_ADJECTIVES: list[str] = _TABLES["adjectives"]
_VERBS_PAST: list[str] = _TABLES["verbs_past"]
_VERBS_BASE: list[str] = _TABLES["verbs_base"]
_PLACES: list[str] = _TABLES["places"]
_TIMES: list[str] = _TABLES["times"]
_NAMES: list[str] = _TABLES["names"]
_NUMBERS: list[str] = _TABLES["numbers"]


@dataclass(frozen=True)
class Voice:
    """One espeak-ng speaker: accent+variant, speaking rate (words per minute) and base pitch;
    `warp` plays the synthesised audio warp times faster (pitch and formants up by warp: a
    shorter or longer vocal tract, a new speaker from the same voice; speed perturbation)."""

    accent: str
    variant: str = ""
    rate: int = 165
    pitch: int = 50
    warp: float = 1.0

    @property
    def espeak_name(self) -> str:
        return f"{self.accent}+{self.variant}" if self.variant else self.accent

    def args(self) -> list[str]:
        return ["-v", self.espeak_name, "-s", str(self.rate), "-p", str(self.pitch)]


@dataclass
class WordTiming:
    """A word and where it sits in the utterance, in seconds from the start."""

    word: str
    start: float
    end: float


@dataclass
class Utterance:
    """Synthetic speech: mono float32 audio at `sample_rate`, its text, voice and word timing."""

    text: str
    voice: Voice
    audio: np.ndarray
    sample_rate: int
    words: list[WordTiming] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def espeak_available() -> bool:
    """True when the espeak-ng binary is on PATH."""
    return shutil.which("espeak-ng") is not None


def _require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is not installed: install the Debian package `espeak-ng` "
            "(apt-get install espeak-ng) to synthesise speech"
        )
    return exe


def voices(split: str) -> list[tuple[str, str]]:
    """The (accent, variant) pairs of a split: "train" or "eval" (disjoint accents and variants)."""
    if split == "train":
        return [(a, v) for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS]
    if split == "eval":
        return [(a, v) for a in EVAL_ACCENTS for v in EVAL_VARIANTS]
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def random_voice(rng: np.random.Generator, split: str) -> Voice:
    """A voice of `split` with a random rate and base pitch.

    Train: 120-230 wpm, pitch 15-85 (wide, for robustness). Eval: 130-180 wpm, pitch 30-70, a
    moderate range where the ASR judge is reliable.
    """
    pairs = voices(split)
    accent, variant = pairs[int(rng.integers(len(pairs)))]
    if split == "train":
        rate, pitch = int(rng.integers(120, 231)), int(rng.integers(15, 86))
    else:
        rate, pitch = int(rng.integers(130, 181)), int(rng.integers(30, 71))
    return Voice(accent, variant, rate=rate, pitch=pitch)


def random_sentence(rng: np.random.Generator) -> str:
    """A training sentence from templates (never one of EVAL_SENTENCES)."""

    def pick(xs: Sequence[str]) -> str:
        return xs[int(rng.integers(len(xs)))]

    while True:
        k = int(rng.integers(7))
        if k == 0:
            s = f"the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS_PAST)} the {pick(_NOUNS)}"
        elif k == 1:
            s = (
                f"{pick(_NAMES)} {pick(_VERBS_PAST)} a {pick(_ADJECTIVES)} {pick(_NOUNS)} "
                f"{pick(_PLACES)}"
            )
        elif k == 2:
            s = f"did you {pick(_VERBS_BASE)} the {pick(_NOUNS)} {pick(_TIMES)}"
        elif k == 3:
            s = (
                f"there were {pick(_NUMBERS)} {pick(_ADJECTIVES)} {pick(_NOUNS)}s {pick(_PLACES)} "
                f"{pick(_TIMES)}"
            )
        elif k == 4:
            s = f"i will {pick(_VERBS_BASE)} your {pick(_NOUNS)} {pick(_TIMES)} {pick(_PLACES)}"
        elif k == 5:
            s = (
                f"{pick(_NAMES)} and {pick(_NAMES)} {pick(_VERBS_PAST)} the {pick(_NOUNS)} "
                f"because it was {pick(_ADJECTIVES)}"
            )
        else:
            s = f"why is the {pick(_NOUNS)} so {pick(_ADJECTIVES)} {pick(_TIMES)}"
        if s not in EVAL_SENTENCES:
            return s


def _run_espeak(text: str, voice: Voice) -> np.ndarray:
    """espeak-ng speaks `text` -> float32 mono at ESPEAK_RATE."""
    exe = _require_espeak()
    proc = subprocess.run(
        [exe, *voice.args(), "--stdout", text], capture_output=True, check=False, timeout=60
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(
            f"espeak-ng failed for voice {voice.espeak_name!r}: "
            f"{proc.stderr.decode(errors='replace')}"
        )
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if sr != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng returned {sr} Hz audio, expected {ESPEAK_RATE}")
    return audio


def _to_rate(audio: np.ndarray, sample_rate: int, speed: float = 1.0) -> np.ndarray:
    """espeak-ng's audio at `sample_rate`, played `speed` times faster (pitch and formants up by
    `speed`, length down by it; quantised to 1/441 steps): one resampling either way."""
    # Read as if recorded at `speed` times espeak-ng's rate (50 Hz steps: 22050 = 441 * 50).
    from_rate = ESPEAK_RATE if speed == 1.0 else round(speed * 441) * 50
    if sample_rate == from_rate:
        return audio.astype(np.float32)
    # [T] -> [1, T] -> resampled [1, T'] -> [T']
    t = resample(torch.from_numpy(audio)[None], from_rate, sample_rate)
    return t[0].numpy().astype(np.float32)


def _trim(audio: np.ndarray, rel_threshold: float = 0.02) -> np.ndarray:
    """Drop the leading and trailing near-silence espeak-ng puts around every call.

    The threshold is relative to the peak because espeak-ng leaves a long quiet decay after a word.
    """
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    idx = np.flatnonzero(np.abs(audio) > max(1e-3, rel_threshold * peak))
    if len(idx) == 0:
        return audio[:0]
    return audio[idx[0] : idx[-1] + 1]


def synthesize(text: str, voice: Voice, sample_rate: int = 16000) -> Utterance:
    """Speak a whole sentence (natural prosody, no word timing)."""
    audio = _to_rate(_run_espeak(text, voice), sample_rate, voice.warp)
    return Utterance(text=text, voice=voice, audio=audio, sample_rate=sample_rate)


def synthesize_words(
    text: str,
    voice: Voice,
    sample_rate: int = 16000,
    rng: np.random.Generator | None = None,
    gap_s: tuple[float, float] = (0.04, 0.16),
    lead_s: float = 0.1,
) -> Utterance:
    """Speak `text` one word at a time so each word's start and end time is known exactly.

    Words are trimmed of espeak-ng's surrounding silence and joined with a gap drawn uniformly from
    `gap_s` (seconds; fixed at its mean when `rng` is None); `lead_s` of silence opens and closes
    the utterance.
    """
    words = text.split()
    if not words:
        raise ValueError("text has no words")
    lo, hi = gap_s
    pieces: list[np.ndarray] = [np.zeros(round(lead_s * sample_rate), np.float32)]
    pos = len(pieces[0])
    timings: list[WordTiming] = []
    for i, w in enumerate(words):
        a = _trim(_to_rate(_run_espeak(w, voice), sample_rate, voice.warp))
        timings.append(WordTiming(w, pos / sample_rate, (pos + len(a)) / sample_rate))
        pieces.append(a)
        pos += len(a)
        if i + 1 < len(words):
            g = (lo + hi) / 2 if rng is None else float(rng.uniform(lo, hi))
            gap = np.zeros(round(g * sample_rate), np.float32)
            pieces.append(gap)
            pos += len(gap)
    pieces.append(np.zeros(round(lead_s * sample_rate), np.float32))
    audio = np.concatenate(pieces)
    return Utterance(text=text, voice=voice, audio=audio, sample_rate=sample_rate, words=timings)


def augment(wav: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random level, level changes and background noise, so a codec meets realistic inputs.

    wav [B, 1, T] in [-1, 1] -> [B, 1, T]. Per row: a gain of -30..0 dB relative to a peak of
    0.95, a slow gain ramp (up to +-12 dB across the clip), and with probability 0.6 white, pink or
    brown noise at 5..45 dB SNR.
    """
    B, _, T = wav.shape
    g = generator
    peak = wav.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
    # [B, 1, 1] base gain
    gain_db = -30 * torch.rand(B, 1, 1, generator=g)
    # [B, 1, T] linear ramp in dB between two random end points
    ramp = torch.linspace(0, 1, T).view(1, 1, T)
    a = 12 * (2 * torch.rand(B, 1, 1, generator=g) - 1)
    b = 12 * (2 * torch.rand(B, 1, 1, generator=g) - 1)
    ramp_db = a + (b - a) * ramp
    out = wav / peak * 0.95 * 10 ** ((gain_db + ramp_db - 12).clamp(max=0) / 20)
    # noise: white, then coloured by cumulative sums (pink-ish by averaging white and brown)
    white = torch.randn(B, 1, T, generator=g)
    brown = torch.cumsum(white, dim=-1)
    brown = brown - brown.mean(dim=-1, keepdim=True)
    brown = brown / brown.std(dim=-1, keepdim=True).clamp_min(1e-6)
    pink = white + brown
    pink = pink / pink.std(dim=-1, keepdim=True).clamp_min(1e-6)
    kind = torch.randint(0, 3, (B, 1, 1), generator=g)
    noise = torch.where(kind == 0, white, torch.where(kind == 1, pink, brown))
    sig_rms = out.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
    snr_db = 5 + 40 * torch.rand(B, 1, 1, generator=g)
    use = (torch.rand(B, 1, 1, generator=g) < 0.6).float()
    out = out + use * noise * sig_rms * 10 ** (-snr_db / 20)
    return out.clamp(-1, 1)


@dataclass
class Corpus:
    """Many utterances stored as one float32 array with offsets (cheap random crops)."""

    audio: np.ndarray
    offsets: np.ndarray
    sample_rate: int
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def utterance(self, i: int) -> np.ndarray:
        return self.audio[self.offsets[i] : self.offsets[i + 1]]

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            audio=self.audio,
            offsets=self.offsets,
            sample_rate=np.array(self.sample_rate),
            meta=np.array(json.dumps(self.meta)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        z = np.load(path)
        return cls(
            audio=z["audio"],
            offsets=z["offsets"],
            sample_rate=int(z["sample_rate"]),
            meta=json.loads(str(z["meta"])),
        )

    def random_crops(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """`batch` random crops of `length` samples -> [B, 1, length] (short ones zero padded)."""
        out = torch.zeros(batch, 1, length)
        for b in range(batch):
            i = int(torch.randint(0, len(self), (1,), generator=generator))
            u = self.utterance(i)
            if len(u) > length:
                s = int(torch.randint(0, len(u) - length + 1, (1,), generator=generator))
                out[b, 0] = torch.from_numpy(u[s : s + length])
            else:
                out[b, 0, : len(u)] = torch.from_numpy(u)
        return out


def build_corpus(
    split: str, n: int, seed: int, sample_rate: int = 16000, word_fraction: float = 0.2
) -> Corpus:
    """`n` utterances of `split` voices; train texts from templates, eval texts from EVAL_SENTENCES.

    A `word_fraction` of them are synthesised word by word (the style the conversational data
    uses); the rest as whole sentences.
    """
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    meta: list[dict] = []
    for i in range(n):
        voice = random_voice(rng, split)
        text = random_sentence(rng) if split == "train" else EVAL_SENTENCES[i % len(EVAL_SENTENCES)]
        if rng.random() < word_fraction:
            utt = synthesize_words(text, voice, sample_rate, rng)
        else:
            utt = synthesize(text, voice, sample_rate)
        pieces.append(utt.audio)
        meta.append({"text": text, "voice": asdict(voice)})
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype(np.int64)
    return Corpus(np.concatenate(pieces), offsets, sample_rate, meta)


HELP = "make a synthetic speech corpus with espeak-ng (many voices, rates, pitches)"
DESCRIPTION = """Synthesise a speech corpus with espeak-ng and save it as .npz.

Train and eval splits use disjoint voices (accents and variants) and disjoint sentences, so
quality can be measured on speakers and texts never seen in training. A fraction of utterances is
spoken word by word (exact word timing). The same seed gives the same corpus.

Example:
  duplex data speech --split train --n 3000 --out data/speech_train.npz
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split", choices=["train", "eval"], default="train", help="voices and sentences to use"
    )
    p.add_argument("--n", type=int, default=3000, help="number of utterances")
    p.add_argument("--seed", type=int, default=0, help="voices, texts and gaps")
    p.add_argument("--sample-rate", type=int, default=16000, help="output rate (Hz)")
    p.add_argument("--out", type=Path, required=True, help="output .npz path")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    corpus = build_corpus(args.split, args.n, args.seed, args.sample_rate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    corpus.save(args.out)
    hours = len(corpus.audio) / corpus.sample_rate / 3600
    print(f"{len(corpus)} utterances, {hours:.2f} h, in {time.time() - t0:.0f} s -> {args.out}")
    return 0
