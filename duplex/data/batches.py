"""Training batches from the conversation corpus: crops of every stream, a curriculum over stages.

`ConversationBatches(corpus_dir)` loads every shard of a split into memory (tokens are small:
an hour of conversation is about 1.4 MB of codes) and renders the per-frame text streams once,
with the layout the model asks for (how far the model's text leads its audio, how far the user's
transcript lags their speech). `batch(step, rows)` is a pure function of (step, rows), as the
shared training loop requires: the same step gives the same global batch on any number of
processes, and a resumed run sees exactly the batches it would have seen.

Each row is a crop of `seq_len` frames from one stage, chosen by the curriculum's weights at that
step (`Curriculum`: the first stages dominate early, whole conversations and full-duplex events
later, and no stage ever drops below a floor, so earlier skills are not forgotten). A shard is one
stream of conversations: a crop longer than what is left of its conversation runs on into the
next one of the same shard. A share `from_start` of the crops begins where a conversation
begins: every question in such a crop finds the fact it asks for (if it was told at all) earlier
in the same crop, so a fact asked a minute after it was told is learnable, and "you have not told
me" is the truth there rather than a guess about frames before the crop.

A share `crosstalk` of the asr crops gets the model's own voice over the user's: a stretch of a
tts crop (the model reading, its codes and its text together) replaces the model's streams where
the user speaks, and the model's losses there are off (talking over the user is not taught). The
user's transcript stays the target: the listener learns to hear a request it talks over, which
it otherwise never practises (barge-ins overlap for a tenth of a second), and which is where its
transcript fails (77-100% word errors in `duplex eval talk` against ~30% on clear requests).

A share `synthetic_barge` of the asr crops become barge-in drills: before each user onset the
model reads (a tts crop, its losses off), and 40-120 ms after the onset its streams fall silent
(the reading's word finished in its text, then EOT), the silence taught while the user speaks.
The corpus holds a barge-in every couple of minutes of conversation; a drill crop holds one per
utterance, each in a voice and channel of the transcription stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duplex.data.conversations import Shard, read_manifest
from duplex.data.dialogue import BARGE_STOP, STAGES
from duplex.model.tokenizer import EOT, PAD

# Stages where the model is silent by construction, not by choice: the user's requests go
# unanswered there, so its own streams after a request would teach it to ignore one (a model
# that missed one reply then stayed silent for a whole conversation). Its streams are trained
# only while the user speaks (silence there is right: it does not talk over the user).
UNANSWERED_STAGES = ("asr",)
# Seconds of the model's voice laid over an asr crop by `crosstalk` (one stretch, 1 to 4 s).
CROSSTALK_SECONDS = (1.0, 4.0)
# Seconds after a barge-in's cut that `barge_weight` still weights: the model's silence must
# hold, and its audio lags its decision by the codebooks' delay.
BARGE_AFTER = 0.2
# A barge-in drill: seconds the model reads before the user's onset, and seconds it goes on
# after it (the corpus's default barge-in stop, `dialogue.BARGE_STOP`).
DRILL_LEAD = (0.26, 2.5)


@dataclass
class Curriculum:
    """Stage weights that move from `start` to `end` over `steps`, never below `floor`."""

    steps: int = 10_000
    start: dict[str, float] = field(
        default_factory=lambda: {"tts": 4, "asr": 4, "pairs": 2, "conversations": 1, "duplex": 1}
    )
    end: dict[str, float] = field(
        default_factory=lambda: {"tts": 1, "asr": 1, "pairs": 1, "conversations": 3, "duplex": 4}
    )
    floor: float = 0.1

    def weights(self, step: int, stages: list[str]) -> np.ndarray:
        """Probabilities over `stages` at `step`."""
        a = min(1.0, max(0.0, step / max(1, self.steps)))
        w = np.array(
            [(1 - a) * self.start.get(s, 1.0) + a * self.end.get(s, 1.0) for s in stages], float
        )
        w = w / w.sum()
        w = np.maximum(w, self.floor / len(stages))
        return w / w.sum()


@dataclass
class _Stream:
    """One shard as one stream: codes [F, K] and rendered text [F] of both speakers."""

    user: np.ndarray
    model: np.ndarray
    model_text: np.ndarray
    user_text: np.ndarray
    # Frame where each conversation begins (the first is 0).
    starts: np.ndarray
    # 1 where the user is speaking and the model's reply is not yet due, else 0 [F]; only for
    # `UNANSWERED_STAGES` (None elsewhere: every frame teaches the model there).
    user_speaking: np.ndarray | None
    # 1 from each barge-in's onset to `BARGE_AFTER` past the model's stop, else 0 [F]; None
    # when no barge-in weight is asked for.
    barge: np.ndarray | None = None


def barge_onset(events: list[dict], cut: float) -> float:
    """Seconds at which the model was interrupted for a reply cut at `cut`: the start of the
    latest barge-in request at or before it (the cut itself if none). Training weights the
    stop from here, and `eval talk` times it from here."""
    onsets = [
        e["start"]
        for e in events
        if e["kind"] == "request" and e.get("barge_in") and e["start"] <= cut
    ]
    return onsets[-1] if onsets else cut


def barge_frames(events: list, frames: int, rate: float, after: float = BARGE_AFTER) -> np.ndarray:
    """1 on the frames where the model must stop for a barge-in: from the onset of the request
    that interrupts it to `after` seconds past its cut (`cut_at`), else 0. -> float32 [frames].

    These are a few frames in a conversation of thousands, and the only ones that teach
    stopping: weighted like any other frame, the lesson is easily lost in a run that changes
    something else (barge-ins stopped in time fell from 29 to 21 of 47 in two such runs)."""
    out = np.zeros(frames, np.float32)
    for e in events:
        if "cut_at" not in e:
            continue
        t0 = barge_onset(events, e["cut_at"])
        f0, f1 = math.floor(t0 * rate), math.ceil((e["cut_at"] + after) * rate)
        out[max(0, f0) : max(0, min(frames, f1))] = 1.0
    return out


def user_speaking(words: list, frames: int, text_lead: int = 0) -> np.ndarray:
    """1 on the frames of each user utterance (its first word's first frame to its last word's
    end, less the `text_lead` frames by which a reply's text would precede its speech), else 0.
    -> float32 [frames]."""
    out = np.zeros(frames, np.float32)
    spans: dict[int, list[int]] = {}
    for speaker, utt, _, f0, f1 in words:
        if speaker == 0:
            span = spans.setdefault(utt, [f0, f1])
            span[0], span[1] = min(span[0], f0), max(span[1], f1)
    for f0, f1 in spans.values():
        out[max(0, f0) : max(0, min(frames, f1 - text_lead))] = 1.0
    return out


class ConversationBatches:
    """Crops of the corpus in `corpus_dir` (a `duplex data conversations --out` folder), or of
    several such folders at once (corpora made with different `--seed`s): their shards are
    pooled as they are, with no copying or renaming. A shard file reached twice (the same folder
    given twice, or a hard link) is an error, since it would be drawn twice as often."""

    def __init__(
        self,
        corpus_dir: str | Path | Sequence[str | Path],
        seq_len: int,
        split: str = "train",
        text_lead: int = 0,
        transcript_delay: int = 3,
        stages: list[str] | None = None,
        curriculum: Curriculum | None = None,
        seed: int = 0,
        from_start: float = 0.0,
        crosstalk: float = 0.0,
        barge_weight: float = 1.0,
        synthetic_barge: float = 0.0,
    ) -> None:
        dirs = [corpus_dir] if isinstance(corpus_dir, (str, Path)) else list(corpus_dir)
        self.dirs = [Path(d) for d in dirs]
        self.dir = self.dirs[0]
        entries, seen = [], {}
        for d in self.dirs:
            for e in read_manifest(d)["shards"]:
                if e["split"] != split:
                    continue
                path = d / e["file"]
                st = path.stat()
                if (st.st_dev, st.st_ino) in seen:
                    raise ValueError(
                        f"{path} is the same file as {seen[st.st_dev, st.st_ino]}: each shard "
                        "may be given once"
                    )
                seen[st.st_dev, st.st_ino] = path
                entries.append(dict(e, path=path))
        if stages is not None:
            unknown = set(stages) - set(STAGES)
            if unknown:
                raise ValueError(f"unknown stages {sorted(unknown)}: choose from {STAGES}")
            entries = [e for e in entries if e["stage"] in stages]
        if not entries:
            where = ", ".join(str(d) for d in self.dirs)
            raise ValueError(
                f"{where}: no {split} shards (make them with `duplex data conversations`)"
            )
        if barge_weight < 0:
            raise ValueError(f"barge_weight must be >= 0, not {barge_weight}")
        self.barge_weight = barge_weight
        if not 0.0 <= from_start <= 1.0:
            raise ValueError(f"from_start must be a share in [0, 1], not {from_start}")
        self.seq_len, self.seed, self.from_start = seq_len, seed, from_start
        self.curriculum = curriculum or Curriculum()
        self.streams: dict[str, list[_Stream]] = {}
        for e in entries:
            sh = Shard(e["path"])
            texts = [sh.text_streams(i, text_lead, transcript_delay) for i in range(len(sh))]
            sizes = np.diff(sh.offsets)
            speaking = None
            if e["stage"] in UNANSWERED_STAGES:
                words = [sh.record(i)["words"] for i in range(len(sh))]
                speaking = np.concatenate(
                    [user_speaking(w, n, text_lead) for w, n in zip(words, sizes, strict=True)]
                )
            barge = None
            if barge_weight != 1.0 and e["stage"] not in UNANSWERED_STAGES:
                rate = sh.meta["frame_rate"]
                events = [sh.record(i)["events"] for i in range(len(sh))]
                barge = np.concatenate(
                    [barge_frames(v, n, rate) for v, n in zip(events, sizes, strict=True)]
                )
            s = _Stream(
                np.ascontiguousarray(sh.user.T),
                np.ascontiguousarray(sh.model.T),
                np.concatenate([t[0] for t in texts]),
                np.concatenate([t[1] for t in texts]),
                np.asarray(sh.offsets[:-1], np.int64),
                speaking,
                barge,
            )
            if len(s.user) >= seq_len:
                self.streams.setdefault(e["stage"], []).append(s)
        if not self.streams:
            raise ValueError(f"no shard in {self.dirs} holds {seq_len} frames: lower seq_len")
        if not 0.0 <= crosstalk <= 1.0:
            raise ValueError(f"crosstalk must be a share in [0, 1], not {crosstalk}")
        if crosstalk > 0 and "tts" not in self.streams:
            raise ValueError("crosstalk lays the model's reading over asr crops: no tts stage")
        self.crosstalk = crosstalk
        if not 0.0 <= synthetic_barge <= 1.0 - crosstalk:
            raise ValueError(
                f"synthetic_barge must be a share in [0, 1 - crosstalk], not {synthetic_barge}"
            )
        if synthetic_barge > 0 and "tts" not in self.streams:
            raise ValueError("synthetic_barge drills with the model's reading: no tts stage")
        self.synthetic_barge = synthetic_barge
        self.stages = sorted(self.streams, key=STAGES.index)
        self.frames = {k: sum(len(s.user) for s in v) for k, v in self.streams.items()}

    def batch(self, step: int, rows: slice | None = None, batch_size: int = 8) -> dict:
        """Rows `rows` of the global batch of `step`: user_audio, model_audio [B, T, K] (long),
        model_text, user_text [B, T] (long), model_weight [B, T] (float; 0 where the model's
        own streams teach nothing: `UNANSWERED_STAGES` once the user stops), and the stage of
        each row."""
        rows = rows or slice(0, batch_size)
        p = self.curriculum.weights(step, self.stages)
        out = {"user_audio": [], "model_audio": [], "model_text": [], "user_text": []}
        weight = []
        stages = []
        T = self.seq_len
        for r in range(rows.start, rows.stop):
            rng = np.random.default_rng([self.seed, step, r])
            stage = self.stages[int(rng.choice(len(self.stages), p=p))]
            streams = self.streams[stage]
            # A shard is picked by its length, so every frame is equally likely.
            sizes = np.array([len(s.user) - T + 1 for s in streams], float)
            s = streams[int(rng.choice(len(streams), p=sizes / sizes.sum()))]
            a = int(rng.integers(len(s.user) - T + 1))
            if self.from_start > 0 and rng.random() < self.from_start:
                a = int(rng.choice(s.starts[s.starts <= len(s.user) - T]))
            out["user_audio"].append(s.user[a : a + T])
            out["model_audio"].append(s.model[a : a + T])
            out["model_text"].append(s.model_text[a : a + T])
            out["user_text"].append(s.user_text[a : a + T])
            unanswered = stage in UNANSWERED_STAGES
            w = s.user_speaking[a : a + T] if unanswered else np.ones(T, np.float32)
            if s.barge is not None:
                w = w + (self.barge_weight - 1.0) * s.barge[a : a + T]
            weight.append(w)
            if unanswered and (self.crosstalk > 0 or self.synthetic_barge > 0):
                u = rng.random()
                if u < self.crosstalk:
                    self._talk_over(rng, out, weight)
                elif u < self.crosstalk + self.synthetic_barge:
                    self._barge_drill(rng, out, weight)
            stages.append(stage)
        batch = {k: torch.from_numpy(np.stack(v).astype(np.int64)) for k, v in out.items()}
        batch["model_weight"] = torch.from_numpy(np.stack(weight))
        batch["stage"] = stages
        return batch

    def _talk_over(self, rng: np.random.Generator, out: dict, weight: list) -> None:
        """Lay a stretch of the model reading (a tts crop) over the last row where the user
        speaks; the model's losses there are off. Rows where the user is silent are left alone."""
        speaking = np.flatnonzero(weight[-1] > 0)
        if len(speaking) == 0:
            return
        T = self.seq_len
        lo, hi = (round(x * 50) for x in CROSSTALK_SECONDS)
        n = min(T, int(rng.integers(lo, hi + 1)))
        # Centred on a frame where the user speaks, kept inside the crop.
        c = int(speaking[int(rng.integers(len(speaking)))])
        a0 = min(max(0, c - n // 2), T - n)
        tts = self.streams["tts"]
        sizes = np.array([len(s.model) - n + 1 for s in tts], float)
        src = tts[int(rng.choice(len(tts), p=sizes / sizes.sum()))]
        b = int(rng.integers(len(src.model) - n + 1))
        model, text, w = out["model_audio"][-1].copy(), out["model_text"][-1].copy(), weight[-1]
        model[a0 : a0 + n] = src.model[b : b + n]
        text[a0 : a0 + n] = src.model_text[b : b + n]
        w = w.copy()
        w[a0 : a0 + n] = 0.0
        out["model_audio"][-1], out["model_text"][-1], weight[-1] = model, text, w

    def _barge_drill(self, rng: np.random.Generator, out: dict, weight: list) -> None:
        """Before each user onset in the last row, the model reads (losses off) and stops
        `BARGE_STOP` seconds after the onset; its silence from there, weighted `barge_weight`
        up to `BARGE_AFTER` past the stop, is the lesson. Onsets too close to the crop's start
        or to the previous utterance, and readings with no word at the stop, are left alone."""
        T = self.seq_len
        w = weight[-1].copy()
        model, text = out["model_audio"][-1].copy(), out["model_text"][-1].copy()
        speaking = w > 0
        onsets = np.flatnonzero(speaking[1:] & ~speaking[:-1]) + 1
        lo, hi = (round(x * 50) for x in DRILL_LEAD)
        tts = self.streams["tts"]
        sizes = np.array([max(0, len(s.model) - hi - 30) for s in tts], float)
        if sizes.sum() == 0:
            return
        # Frames before the first onset where nothing is laid: after the last user frame.
        free = 0
        for u0 in onsets:
            before = np.flatnonzero(speaking[:u0])
            after_user = int(before[-1]) + 1 if len(before) else 0
            a0 = max(free, after_user, u0 - int(rng.integers(lo, hi + 1)))
            c = u0 + max(1, round(float(rng.uniform(*BARGE_STOP)) * 50))
            if u0 - a0 < lo or c >= T:
                continue
            n = c - a0
            for _ in range(10):
                src = tts[int(rng.choice(len(tts), p=sizes / sizes.sum()))]
                b = int(rng.integers(len(src.model) - n - 24))
                if (src.model_text[b + n - 12 : b + n + 2] != PAD).any():
                    break
            else:
                continue
            model[a0:c] = src.model[b : b + n]
            text[a0:c] = src.model_text[b : b + n]
            # The word being written at the stop is finished, then EOT (as the corpus cuts).
            j = c
            while j < min(T, c + 24) and src.model_text[b + j - a0] not in (PAD, EOT, ord(" ")):
                text[j] = src.model_text[b + j - a0]
                j += 1
            written = np.flatnonzero(text[a0:j] != PAD)
            if len(written):
                q = a0 + int(written[-1])
                if text[q] == ord(" "):
                    text[q] = EOT
                elif text[q] != EOT and q + 1 < T:
                    text[q + 1] = EOT
                    j = max(j, q + 2)
            w[a0:u0] = 0.0
            e = min(T, c + round(BARGE_AFTER * 50))
            w[u0:e] *= self.barge_weight
            free = max(j, c)
        out["model_audio"][-1], out["model_text"][-1], weight[-1] = model, text, w
