"""Spoken conversations in the talk domain: scripts on a timeline, rendered to two audio tracks.

A `Dialogue` is what happened, in seconds: every word either side said (with its exact time, from
word-by-word synthesis), the two waveforms (the user's, augmented like a real microphone, and the
model's, its one clean voice), and one event per turn (request, answer, pause, barge-in,
acknowledgement, silence) that training can weight and the evaluator can score. The corpus
(`duplex.data.conversations`) encodes the tracks to codec tokens; the evaluator feeds the user
track through the real loop.

How turns unfold (the rules of `TALK-DOMAIN.md`):
- the model's answer starts 80-200 ms after the end of the user's request;
- a pause (0.3-1 s) may split a request only where the words so far cannot be a whole request;
- a barge-in starts the next request while the model speaks; the model's audio stops 40-120 ms
  later (`BARGE_STOP`; 10 ms fade), its text stops with the last word begun, and it answers the
  new request;
- an acknowledgement ("okay", "uh huh", "right") during an answer is talked through;
- silences (seconds, or minutes in long conversations) separate some turns.

Word timing is exact by construction: each word is synthesised alone, trimmed of espeak-ng's
silence, and placed at a known sample; `tests/data/test_dialogue.py` checks that every word's
span holds its audio and the gaps do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from duplex.data import domain as D
from duplex.data import speech as S

# Seconds from a barge-in's onset to the model's silence (uniform). The domain asks for 200 ms
# measured on the output, which lags a frame and fades; corpora before 2026-11-30 used
# (0.08, 0.18), which a perfect imitation met only 90% of the time.
BARGE_STOP = (0.04, 0.12)

MODEL_VOICE = S.Voice("en-us", "", rate=170, pitch=50)
STAGES = ("tts", "asr", "pairs", "conversations", "duplex")

INTENT_WEIGHTS = {
    "greet": 0.05,
    "tell_name": 0.08,
    "ask_name": 0.08,
    "store_number": 0.08,
    "ask_number": 0.08,
    "tell_favorite": 0.10,
    "ask_favorite": 0.10,
    "arithmetic": 0.12,
    "count": 0.06,
    "spell": 0.08,
    "repeat": 0.08,
    "out_of_domain": 0.09,
}


def user_voice(rng: np.random.Generator, split: str) -> S.Voice:
    """A user's voice: train 120-260 wpm, pitch 15-85; eval voices are held out (other accent
    and variants), 130-240 wpm, pitch 25-75. Never the model's own voice."""
    pairs = [p for p in S.voices(split) if p != (MODEL_VOICE.accent, MODEL_VOICE.variant)]
    accent, variant = pairs[int(rng.integers(len(pairs)))]
    if split == "train":
        rate, pitch = int(rng.integers(120, 261)), int(rng.integers(15, 86))
    else:
        rate, pitch = int(rng.integers(130, 241)), int(rng.integers(25, 76))
    return S.Voice(accent, variant, rate=rate, pitch=pitch)


class WordBank:
    """espeak-ng words, synthesised once per (voice, word) and reused: a conversation repeats
    its words many times, and one subprocess per word would dominate the cost."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._cache: dict[tuple[S.Voice, str], np.ndarray] = {}

    def word(self, voice: S.Voice, word: str) -> np.ndarray:
        spoken = "".join(c for c in word if c.isalnum() or c == "'")
        key = (voice, spoken)
        if key not in self._cache:
            a = S._trim(S._to_rate(S._run_espeak(spoken, voice), self.sample_rate, voice.warp))
            if len(a) == 0:
                raise RuntimeError(f"espeak-ng produced no audio for {spoken!r}")
            self._cache[key] = a
        return self._cache[key]


@dataclass
class Word:
    """A word on the timeline: who said it, in which utterance, its text and span (seconds)."""

    speaker: str
    utt: int
    text: str
    start: float
    end: float


@dataclass
class Augment:
    """How the user's microphone sounds in one conversation."""

    level_db: float = -12.0
    jitter_db: float = 0.0
    noise: str = "none"
    snr_db: float = 40.0
    rt60: float = 0.0
    wet: float = 0.0

    @classmethod
    def random(cls, rng: np.random.Generator, split: str) -> Augment:
        noise = str(rng.choice(["none", "white", "pink", "brown"], p=[0.5, 0.15, 0.2, 0.15]))
        reverb = rng.random() < 0.5
        return cls(
            level_db=float(rng.uniform(-30, -3)),
            jitter_db=float(rng.uniform(0, 6)),
            noise=noise,
            snr_db=float(rng.uniform(10, 40)),
            rt60=float(rng.uniform(0.1, 0.7)) if reverb else 0.0,
            wet=float(rng.uniform(0.1, 0.5)) if reverb else 0.0,
        )


@dataclass
class Dialogue:
    """One conversation: words, events and the two tracks at `sample_rate`."""

    stage: str
    split: str
    user_voice: S.Voice
    sample_rate: int
    user: np.ndarray
    model: np.ndarray
    words: list[Word] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    augment: Augment = field(default_factory=Augment)

    @property
    def duration(self) -> float:
        return len(self.user) / self.sample_rate


def _reverb(x: np.ndarray, sr: int, rt60: float, wet: float, rng: np.random.Generator):
    """A synthetic room: exponentially decaying noise (RT60 seconds) mixed with the dry signal."""
    n = max(1, int(rt60 * sr))
    t = np.arange(n) / sr
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir = ir / np.sqrt((ir**2).sum())
    L = len(x) + n - 1
    size = 1 << (L - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[:L]
    out = np.zeros(L, np.float32)
    out[: len(x)] = (1 - wet) * x
    out += wet * y
    return out.astype(np.float32)


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n).astype(np.float32)
    if kind == "white":
        return white
    brown = np.cumsum(white)
    # A leaky integrator keeps brown noise from drifting over long tracks.
    brown = brown - np.convolve(brown, np.ones(801) / 801, mode="same")
    brown = brown / max(float(brown.std()), 1e-6)
    if kind == "brown":
        return brown.astype(np.float32)
    pink = white + brown
    return (pink / max(float(pink.std()), 1e-6)).astype(np.float32)


class Timeline:
    """Builds one dialogue turn by turn; `render()` mixes the tracks."""

    def __init__(
        self,
        bank: WordBank,
        rng: np.random.Generator,
        user: S.Voice,
        split: str,
        stage: str,
        augment: Augment,
        barge_stop: tuple[float, float] = BARGE_STOP,
    ) -> None:
        self.bank, self.rng, self.voice, self.split, self.stage = bank, rng, user, split, stage
        self.barge_stop = barge_stop
        self.sr = bank.sample_rate
        self.augment = augment
        self.t = float(rng.uniform(0.2, 1.0))
        self.memory = D.Memory()
        self.told_at: dict[str, float] = {}
        self.words: list[Word] = []
        self.events: list[dict] = []
        self.user_utts: list[tuple[int, np.ndarray]] = []
        self.model_clips: list[tuple[int, np.ndarray]] = []
        self._utt = 0

    def _gap(self, speaker: str) -> float:
        if speaker == "model":
            return float(self.rng.uniform(0.04, 0.10))
        # Faster speakers leave shorter gaps between words.
        scale = 165.0 / self.voice.rate
        return float(self.rng.uniform(0.03, 0.14) * scale)

    def user_says(self, words: list[str], start: float, pause_before: int | None = None):
        """Place a user utterance at `start`; returns (end, pause span or None)."""
        pitch = self.voice.pitch + int(self.rng.choice((-5, 0, 5)))
        voice = dataclasses.replace(self.voice, pitch=pitch)
        gain = 10 ** (float(self.rng.uniform(-1, 1)) * self.augment.jitter_db / 20)
        utt, self._utt = self._utt, self._utt + 1
        pieces, t, pause = [], start, None
        for i, w in enumerate(words):
            if i:
                gap = self._gap("user")
                if i == pause_before:
                    gap = float(self.rng.uniform(0.3, 1.0))
                    pause = (t, t + gap)
                t += gap
            a = self.bank.word(voice, w)
            pieces.append((t, a))
            self.words.append(Word("user", utt, w, t, t + len(a) / self.sr))
            t += len(a) / self.sr
        first = round(start * self.sr)
        audio = np.zeros(round(t * self.sr) - first + 1, np.float32)
        for ts, a in pieces:
            s = round(ts * self.sr) - first
            audio[s : s + len(a)] += a
        self.user_utts.append((first, audio * gain))
        return t, pause

    def model_says(self, text: str, start: float) -> tuple[int, float]:
        """Place a model utterance; returns (utterance id, end)."""
        utt, self._utt = self._utt, self._utt + 1
        t = start
        for i, w in enumerate(text.split()):
            if i:
                t += self._gap("model")
            a = self.bank.word(MODEL_VOICE, w)
            self.model_clips.append((round(t * self.sr), a))
            self.words.append(Word("model", utt, w, t, t + len(a) / self.sr))
            t += len(a) / self.sr
        return utt, t

    def cut_model(self, utt: int, at: float) -> None:
        """The model stops speaking utterance `utt` at `at` (a barge-in): words begun before the
        cut stay in its text, later ones are dropped, the audio fades out over 10 ms."""
        self.words = [w for w in self.words if not (w.utt == utt and w.start >= at)]
        for w in self.words:
            if w.utt == utt and w.end > at:
                w.end = at
        cut = round(at * self.sr)
        fade = round(0.01 * self.sr)
        kept = []
        # The utterance being cut is the last one placed: every later clip is its own.
        for s, a in self.model_clips:
            if s >= cut:
                continue
            if cut < s + len(a):
                a = a[: cut - s + fade].copy()
                n = min(fade, len(a))
                a[len(a) - n :] *= np.linspace(1, 0, n, dtype=np.float32)
            kept.append((s, a))
        self.model_clips = kept

    def request(
        self,
        intent: str,
        pause_p: float = 0.0,
        barge_p: float = 0.0,
        ack_p: float = 0.0,
        reply: bool = True,
        **fixed: str,
    ) -> dict:
        """One request and (with `reply`) its answer; may be interrupted by the next request."""
        req = D.make_request(intent, self.rng, self.memory, self.split, **fixed)
        pause_before = None
        if req.pauses and self.rng.random() < pause_p:
            pause_before = int(self.rng.choice(req.pauses))
        start = self.t
        end, pause = self.user_says(req.words, start, pause_before)
        ev = {
            "kind": "request",
            "intent": intent,
            "text": req.text,
            "answer": req.answer,
            "start": start,
            "end": end,
            "pause": list(pause) if pause else None,
        }
        if req.fact:
            ev["fact"], ev["value"] = req.fact, req.value
            self.told_at[req.fact] = start
        if req.asks:
            ev["asks"], ev["value"] = req.asks, req.value
            ev["told_at"] = self.told_at.get(req.asks)
        self.events.append(ev)
        if not reply:
            self.t = end + float(self.rng.uniform(0.3, 1.5))
            return ev
        r0 = end + float(self.rng.uniform(0.08, 0.2))
        utt, r1 = self.model_says(req.answer, r0)
        ev["reply_start"], ev["reply_end"] = r0, r1
        dur = r1 - r0
        if dur > 0.6 and self.rng.random() < barge_p:
            barge = r0 + float(self.rng.uniform(0.25, dur - 0.2))
            cut = barge + float(self.rng.uniform(*self.barge_stop))
            self.cut_model(utt, cut)
            ev["cut_at"] = cut
            ev["reply_end"] = cut
            self.t = barge
            nxt = self.request(
                self._intent(), pause_p=pause_p, barge_p=barge_p / 2, ack_p=ack_p, reply=True
            )
            nxt["barge_in"] = True
            return ev
        if dur > 1.2 and self.rng.random() < ack_p:
            a0 = r0 + float(self.rng.uniform(0.2, dur - 0.8))
            ack = str(self.rng.choice(D.ACKS))
            a1, _ = self.user_says(ack.split(), a0)
            self.events.append({"kind": "ack", "text": ack, "start": a0, "end": a1})
        self.t = r1 + float(self.rng.uniform(0.3, 2.0))
        return ev

    def silence(self, seconds: float) -> None:
        self.events.append({"kind": "silence", "start": self.t, "end": self.t + seconds})
        self.t += seconds

    def model_reads(self, text: str) -> None:
        """Text-to-speech practice: the model voice reads `text`, nobody asked."""
        _, end = self.model_says(text, self.t)
        self.events.append({"kind": "read", "text": text, "start": self.t, "end": end})
        self.t = end + float(self.rng.uniform(0.4, 1.5))

    def user_reads(self, text: str, pause_before: int | None = None) -> None:
        """Transcription practice: the user speaks, the model stays silent."""
        start = self.t
        end, pause = self.user_says(text.split(), start, pause_before)
        self.events.append(
            {"kind": "speech", "text": text, "start": start, "end": end, "pause": pause}
        )
        self.t = end + float(self.rng.uniform(0.3, 2.0))

    def _intent(self) -> str:
        names = list(INTENT_WEIGHTS)
        p = np.array([INTENT_WEIGHTS[n] for n in names])
        return names[int(self.rng.choice(len(names), p=p / p.sum()))]

    def render(self, tail: float = 0.5) -> Dialogue:
        """Mix both tracks (same length, whole frames are the codec's business)."""
        n = round((self.t + tail) * self.sr)
        for s, a in self.model_clips:
            n = max(n, s + len(a))
        for s, a in self.user_utts:
            n = max(n, s + len(a) + round(self.augment.rt60 * self.sr))
        user = np.zeros(n, np.float32)
        aug, rng = self.augment, self.rng
        for s, a in self.user_utts:
            if aug.rt60 > 0:
                a = _reverb(a, self.sr, aug.rt60, aug.wet, rng)
            user[s : s + len(a)] += a[: n - s]
        peak = float(np.abs(user).max()) if n else 0.0
        if peak > 0:
            user *= 10 ** (aug.level_db / 20) / peak
        if aug.noise != "none":
            voiced = np.abs(user) > 1e-4
            rms = float(np.sqrt((user[voiced] ** 2).mean())) if voiced.any() else 1e-3
            user += _noise(aug.noise, n, rng) * rms * 10 ** (-aug.snr_db / 20)
        model = np.zeros(n, np.float32)
        for s, a in self.model_clips:
            model[s : s + len(a)] += a[: n - s] * 0.8
        return Dialogue(
            self.stage,
            self.split,
            self.voice,
            self.sr,
            np.clip(user, -1, 1),
            np.clip(model, -1, 1),
            sorted(self.words, key=lambda w: (w.start, w.speaker)),
            self.events,
            aug,
        )


def _turns(rng: np.random.Generator, lo: int, hi: int) -> int:
    return round(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def generate(
    stage: str,
    rng: np.random.Generator,
    bank: WordBank,
    split: str = "train",
    max_turns: int = 200,
    rates: dict[str, float] | None = None,
    min_turns: int = 2,
    barge_stop: tuple[float, float] = BARGE_STOP,
    warp: float = 1.0,
) -> Dialogue:
    """One random dialogue of a curriculum stage:

    - tts: the model voice reads answers (and some general sentences); the user is silent
    - asr: the user speaks requests, acknowledgements and other sentences; the model is silent
    - pairs: one or two requests and their answers
    - conversations: 2-`max_turns` turns with facts told, updated and asked much later, pauses,
      silences and out-of-domain requests
    - duplex: conversations with barge-ins, acknowledgements and long silences as well

    `rates` overrides the per-turn probabilities of the conversation stages: "pause", "barge",
    "ack", "silence"; `barge_stop` the range of seconds from a barge-in to the model's silence;
    `warp` the user voice's speed factor (`speech.Voice.warp`).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
    voice = dataclasses.replace(user_voice(rng, split), warp=warp)
    tl = Timeline(bank, rng, voice, split, stage, Augment.random(rng, split), barge_stop)
    if stage == "tts":
        memory = D.Memory(
            str(rng.choice(D.NAMES)),
            int(rng.integers(1000)),
            {k: str(rng.choice(v)) for k, v in D.FAVOURITES.items()},
        )
        for _ in range(int(rng.integers(4, 16))):
            if rng.random() < 0.15:
                tl.model_reads(S.random_sentence(rng))
                continue
            req = D.make_request(tl._intent(), rng, memory.copy(), split)
            tl.model_reads(req.answer)
        return tl.render()
    if stage == "asr":
        for _ in range(int(rng.integers(4, 16))):
            u = rng.random()
            if u < 0.15:
                tl.user_reads(str(rng.choice(D.ACKS)))
            elif u < 0.3:
                tl.user_reads(S.random_sentence(rng))
            else:
                req = D.make_request(tl._intent(), rng, D.Memory(), split)
                pause = int(rng.choice(req.pauses)) if req.pauses and rng.random() < 0.3 else None
                tl.user_reads(req.text, pause)
        return tl.render()
    if stage == "pairs":
        for _ in range(int(rng.integers(1, 3))):
            tl.request(tl._intent())
        return tl.render()
    duplex = stage == "duplex"
    p = {"pause": 0.3, "barge": 0.15 if duplex else 0.0, "ack": 0.2 if duplex else 0.0}
    p["silence"] = 0.08
    p.update(rates or {})
    for _ in range(_turns(rng, min_turns, max(min_turns, max_turns))):
        if rng.random() < p["silence"]:
            long = duplex and rng.random() < 0.3 and not rates
            tl.silence(float(rng.uniform(20, 120) if long else rng.uniform(2, 10)))
        tl.request(tl._intent(), pause_p=p["pause"], barge_p=p["barge"], ack_p=p["ack"])
    return tl.render()


def fact_distance_dialogue(
    bank: WordBank,
    rng: np.random.Generator,
    minutes: tuple[float, ...] = (1.0, 10.0, 60.0),
    split: str = "eval",
) -> Dialogue:
    """Facts told, then asked `minutes` later, with small talk and silence in between.

    Each distance gets its own fact kinds (so no later telling replaces them): at the end, every
    kind is asked. Filler turns never tell a fact.
    """
    voice = user_voice(rng, split)
    tl = Timeline(bank, rng, voice, split, "facts", Augment.random(rng, split))
    kinds = [("tell_name", {}), ("store_number", {})] + [
        ("tell_favorite", {"kind": k}) for k in D.FAVOURITES
    ]
    asks = {"tell_name": ("ask_name", {}), "store_number": ("ask_number", {})}
    plan = sorted(minutes, reverse=True)
    per = max(1, len(kinds) // len(plan))
    groups = [kinds[i * per : (i + 1) * per] for i in range(len(plan))]
    groups[-1] += kinds[len(plan) * per :]
    end_at = plan[0] * 60 + 30.0
    fillers = ("greet", "arithmetic", "count", "spell", "repeat", "out_of_domain")
    told: list[tuple[str, dict]] = []
    for dist, group in zip(plan, groups):
        target = end_at - dist * 60
        while tl.t < target - 8:
            gap = target - tl.t
            if gap > 60:
                tl.silence(float(min(gap - 30, rng.uniform(30, 240))))
            else:
                tl.request(str(rng.choice(fillers)))
        tl.t = max(tl.t, target)
        for intent, fixed in group:
            tl.request(intent, **fixed)
            told.append((intent, fixed))
    while tl.t < end_at - 8:
        tl.request(str(rng.choice(fillers)))
    tl.t = max(tl.t, end_at)
    for intent, fixed in told:
        ask, f = asks.get(intent, ("ask_favorite", {"kind": fixed.get("kind", "")}))
        tl.request(ask, **f)
    return tl.render()
