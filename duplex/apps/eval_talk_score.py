"""The listener of `duplex eval talk`: what one run through the loop is worth, event by event.

Scores come from what a listener gets, never from the model's internals: the model's transcript
of the user (word error rate), its text after each request against the canonical answer, a
closed-vocabulary recogniser on its audio where each answer belongs (beside the same recogniser
on the answer spoken by the model voice through the codec: the ceiling), and timing read off the
voiced frames of its audio (reply latency, pause takeovers, barge-in stops, talk-through of
acknowledgements, speech when nobody asked).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from duplex.apps.eval_talk_loop import Heard, decode_ids
from duplex.data import dialogue as G
from duplex.data import domain as D
from duplex.data.asr import word_errors
from duplex.data.batches import barge_onset
from duplex.streamer.transcript import model_activity, voiced_frames

if TYPE_CHECKING:
    from duplex.codecs.base import StreamingCodec
    from duplex.data.asr import Judge

# One spoken answer to judge: (dialogue name, answer, first voiced frame, end frame); the frames
# are None where the model said nothing.
Spoken = tuple[str, str, int | None, int | None]


# How long after a request's end its transcript may still be written (it lags the speech).
HEARD_TAIL_S = 0.5


def _frame(t: float, rate: float) -> int:
    return math.floor(t * rate)


def _requests(d: G.Dialogue) -> list[dict]:
    return [e for e in d.events if e["kind"] == "request"]


def _window(d: G.Dialogue, e: dict) -> tuple[float, float]:
    """Where the answer to request `e` belongs: from just before its end to the next request."""
    later = [r["start"] for r in _requests(d) if r["start"] > e["end"]]
    end = later[0] if later else e.get("reply_end", e["end"]) + 4.0
    return e["end"] - 0.3, end


def score_dialogue(d: G.Dialogue, heard: Heard, part: str) -> dict:
    """Every per-event measurement of one dialogue (lists, pooled across dialogues later)."""
    rate = heard.frame_rate
    voiced = voiced_frames(heard.out_pcm, heard.frame_size, model_activity())
    r: dict = {
        "answers": [],
        "latency": [],
        "no_reply": 0,
        "pauses": [],
        "barge": [],
        "acks": [],
        "silence": [],
        "speaking": [],
    }
    ref = [D.normalize(w.text) for w in d.words if w.speaker == "user"]
    hyp = D.normalize(decode_ids(heard.user))
    r["wer"] = (word_errors(ref, hyp.split()), len(ref))
    for e in _requests(d):
        w0, w1 = _window(d, e)
        f0, f1 = _frame(w0, rate), _frame(w1, rate)
        if "cut_at" in e:
            b0 = _frame(barge_onset(d.events, e["cut_at"]), rate)
            stop = None
            for f in range(b0, min(len(voiced), b0 + round(3 * rate))):
                if not voiced[f : f + 5].any():
                    stop = (f - b0) / rate
                    break
            r["barge"].append(stop)
            continue
        said = heard.model_text(f0, f1)
        ok = D.normalize(said) == D.normalize(e["answer"])
        told = e.get("told_at")
        ago = None if told is None or "asks" not in e else e["start"] - told
        on = np.flatnonzero(voiced[f0:f1])
        q0, q1 = _frame(e["start"], rate), _frame(e["end"], rate)
        ref = D.normalize(e["text"]).split()
        hyp = D.normalize(decode_ids(heard.user[q0 : q1 + round(HEARD_TAIL_S * rate)])).split()
        r["answers"].append(
            {
                "part": part,
                "intent": e["intent"],
                "ok": ok,
                "said": said,
                "answer": e["answer"],
                "ago": ago,
                "asks": e.get("asks"),
                "request": e["text"],
                "start": e["start"],
                "heard": decode_ids(heard.user[_frame(e["start"], rate) : f1]),
                "spoke": bool(len(on)),
                # Share of the request during which the model's own voice sounded, and what
                # the transcript got wrong of it: does the model hear while it speaks?
                "overlap": float(voiced[q0:q1].mean()) if q1 > q0 else 0.0,
                "heard_errors": (word_errors(ref, hyp), len(ref)),
            }
        )
        if len(on):
            r["latency"].append((f0 + on[0]) / rate - e["end"])
            r["speaking"].append((e["answer"], f0 + on[0], f0 + on[-1] + 1))
        else:
            r["no_reply"] += 1
            r["speaking"].append((e["answer"], None, None))
        if e.get("pause"):
            p0, p1 = _frame(e["pause"][0] + 0.1, rate), _frame(e["pause"][1], rate)
            r["pauses"].append(bool(voiced[p0:p1].sum() >= 3))
    for e in d.events:
        if e["kind"] == "ack":
            a0, a1 = _frame(e["end"], rate), _frame(e["end"] + 0.3, rate)
            r["acks"].append(bool(voiced[a0:a1].mean() >= 0.5) if a1 > a0 else False)
        if e["kind"] == "silence":
            s0, s1 = _frame(e["start"] + 0.5, rate), _frame(e["end"], rate)
            if s1 > s0:
                r["silence"].append(float(voiced[s0:s1].mean()))
    return r


def judge_speaking(
    items: Iterable[Spoken], heard_by: dict[str, Heard], judge: Judge
) -> list[float]:
    """Recogniser word accuracy of the model's audio where each answer belongs."""
    from duplex.data.asr import word_accuracy

    out = []
    for key, answer, s0, s1 in items:
        if s0 is None:
            # No speech where the answer belongs: nothing to recognise.
            out.append(0.0)
            continue
        heard = heard_by[key]
        fs = heard.frame_size
        seg = heard.out_pcm[max(0, s0 - 2) * fs : (s1 + 2) * fs]
        hyp = judge.transcribe(seg, round(heard.frame_rate * fs)) if len(seg) else ""
        out.append(word_accuracy(D.normalize(answer), D.normalize(hyp)))
    return out


def ceiling(answers: list[str], codec: StreamingCodec, judge: Judge) -> list[float]:
    """The same judge on the answers spoken by the model voice through the codec."""
    from duplex.data.asr import word_accuracy

    bank = G.WordBank(codec.sample_rate)
    out = []
    for a in answers:
        tl = G.Timeline(bank, np.random.default_rng(0), G.MODEL_VOICE, "eval", "tts", G.Augment())
        tl.t = 0.2
        tl.model_reads(a)
        d = tl.render(tail=0.3)
        with torch.no_grad():
            x = torch.from_numpy(d.model)[None, None]
            y = codec.decode(codec.encode(x))[0, 0].numpy()
        hyp = judge.transcribe(y, codec.sample_rate)
        out.append(word_accuracy(D.normalize(a), D.normalize(hyp)))
    return out
