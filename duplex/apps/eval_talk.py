"""`duplex eval talk`: judge a talking model the way a listener would, through the real loop.

Held-out conversations (voices, numbers and arithmetic problems training never sees) are spoken
into the same path `duplex talk --input` uses: the user's audio is cut into frames, encoded by
the codec, stepped through the model, and its sampled tokens are decoded to audio. Nothing is
teacher-forced. From what comes out:

- listening: word error rate of the model's transcript of the user;
- answers: the model's text (inner monologue) after each request against the canonical answer,
  per intent, and fact questions by how long ago the fact was told (1, 10, 60 minutes);
- speaking: a closed-vocabulary pocketsphinx (`duplex.data.asr.Judge`) on the model's audio
  against the answer, beside the same judge on the answer spoken by the model voice through the
  codec (the ceiling);
- timing, from the audio: reply latency (end of user speech -> start of model speech), pause
  takeovers, barge-in stop latency, talk-through of acknowledgements, speech when nobody asked;
- state as a system prompt: facts told, the state saved, a new session from the file asked.

Two scripted models validate the evaluator: `oracle` emits the reference answers (the model
voice's codes and text of the script) and must score near the ceiling; `silent` emits silence
and must score near zero, as must an untrained model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from duplex.data import dialogue as G
from duplex.data import domain as D
from duplex.data.asr import word_errors
from duplex.data.conversations import text_stream
from duplex.model.duplex_lm import CONFIGS, DuplexConfig, DuplexLM, StepLogits, delay_audio
from duplex.model.tokenizer import EOT, PAD
from duplex.streamer.transcript import Transcript, model_activity, voiced_frames

SCRIPTED = ("oracle", "silent")


@dataclass
class EvalConfig:
    """What `eval talk` runs."""

    model: str = "default"
    codec: str = "default"
    conversations: int = 4
    turns: int = 16
    minutes: tuple[float, ...] = (1.0, 10.0, 60.0)
    seed: int = 0
    judge_max: int = 48
    state_prompt: bool = True
    temperature: float | None = None


class ScriptedLM(DuplexLM):
    """A stand-in model that emits a fixed script of tokens, one frame per step, whatever it
    hears: the evaluator's known answer. Each batch row has its own script. It has a DuplexLM's
    streaming state (unused), so the engine runs it exactly as it runs a real model."""

    def __init__(self, cfg: DuplexConfig | None = None) -> None:
        super().__init__(cfg or DuplexConfig.from_dict(CONFIGS["tiny"].to_dict()))
        self.scripts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.silence = np.zeros(self.cfg.num_codebooks, np.int64)
        self.t: dict[int, int] = {}

    def set_script(
        self, row: int, text: np.ndarray, user: np.ndarray, audio: np.ndarray, silence: np.ndarray
    ) -> None:
        """Row `row` will emit text, user [F] ids and audio [F, K] (plain frames, delayed
        here), then PAD and `silence` [K] codes."""
        a = torch.as_tensor(np.asarray(audio, np.int64))[None]
        delayed = delay_audio(a, self.cfg.acoustic_delay, -1)[0].numpy()
        self.scripts[row] = (np.asarray(text, np.int64), np.asarray(user, np.int64), delayed)
        self.silence = np.asarray(silence, np.int64)
        self.t[row] = 0

    def restream(self, rows: torch.Tensor, batch_size: int) -> None:
        """Sessions left or joined: new row i continues old row rows[i], with its script."""
        super().restream(rows, batch_size)
        old_s, old_t = self.scripts, self.t
        keep = [int(r) for r in rows]
        self.scripts = {i: old_s[r] for i, r in enumerate(keep) if r in old_s}
        self.t = {i: old_t[r] for i, r in enumerate(keep) if r in old_t}

    def step(self, user_audio, prev_audio, prev_text, prev_user_text) -> StepLogits:
        B, K, card = user_audio.shape[0], self.cfg.num_codebooks, self.cfg.codebook_size
        vt = self.cfg.text_vocab
        lt = torch.full((B, vt), -1e4)
        lu = torch.full((B, vt), -1e4)
        la = torch.full((B, K, card), -1e4)
        st = self.stream_state
        mask = getattr(st, "exec_mask", None) if st is not None else None
        for r in range(B):
            text, user, codes = PAD, PAD, self.silence
            if r in self.scripts and (mask is None or bool(mask[r])):
                t = self.t[r]
                self.t[r] += 1
                tx, us, au = self.scripts[r]
                text = int(tx[t]) if t < len(tx) else PAD
                user = int(us[t]) if t < len(us) else PAD
                codes = au[t] if t < len(au) else self.silence
                codes = np.where(codes < 0, self.silence, codes)
            lt[r, text] = 0
            lu[r, user] = 0
            la[r, torch.arange(K), torch.as_tensor(codes)] = 0
        return StepLogits(lt, la, lu, torch.zeros(B, self.cfg.backbone.d_model))


@dataclass
class Heard:
    """What came out of one run through the loop, per frame."""

    frame_rate: float
    frame_size: int
    out_pcm: np.ndarray
    text: np.ndarray
    user: np.ndarray
    transcript: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def model_text(self, f0: int, f1: int) -> str:
        """The model's text emitted in frames [f0, f1)."""
        return decode_ids(self.text[max(0, f0) : max(0, f1)])


def decode_ids(ids) -> str:
    """Byte ids to text; an end of turn separates words like a space, other controls vanish."""
    data = bytes(32 if int(i) == EOT else int(i) for i in ids if 0 <= int(i) < 256 or i == EOT)
    return data.decode("utf-8", errors="replace")


def run_dialogues(
    engine,
    dialogues: list[G.Dialogue],
    sampling=None,
    states: list[str | None] | None = None,
    saves: list[str | None] | None = None,
    scripted: ScriptedLM | None = None,
    script_codec=None,
    kind: str = "oracle",
    on_progress=None,
) -> list[Heard]:
    """Speak each dialogue's user track into its own session, all batched in one engine (as
    `serve` steps its clients): frames in through the codec, model step, frames out, exactly
    `duplex talk --input`'s path. A session leaves when its audio ends. -> one Heard per
    dialogue (and each session's state saved where asked)."""
    from duplex.streamer.audio import FileAudio

    n = len(dialogues)
    states = states or [None] * n
    saves = saves or [None] * n
    sessions = [engine.join(sampling, state=st) for st in states]
    if scripted is not None:
        for s, d in zip(sessions, dialogues, strict=True):
            script_for(scripted, s.slot, d, script_codec, kind)
    audio = [FileAudio(engine.sample_rate, engine.frame_size, signal=d.user) for d in dialogues]
    lines = [Transcript(engine.frame_rate) for _ in dialogues]
    frames = [math.ceil(len(d.user) / engine.frame_size) for d in dialogues]
    text: list[list[int]] = [[] for _ in dialogues]
    user: list[list[int]] = [[PAD] for _ in dialogues]
    out: list[list[np.ndarray]] = [[] for _ in dialogues]
    t0 = time.perf_counter()
    live = dict(enumerate(sessions))
    for i in range(max(frames, default=0)):
        heard = {s: audio[k].read_frame() for k, s in live.items()}
        results = engine.step(heard)
        for k, s in list(live.items()):
            res = results[s]
            lines[k].add(heard[s], res)
            out[k].append(res.pcm)
            text[k].append(res.tokens_out[-2])
            user[k].append(res.tokens_out[-1])
            if i + 1 >= frames[k]:
                # Its audio is over: save it if asked and free its row, so the batch shrinks.
                lines[k].close()
                if saves[k] is not None:
                    engine.save_session(s, saves[k])
                engine.leave(s)
                del live[k]
        if on_progress is not None and (i + 1) % 250 == 0:
            on_progress(250 / engine.frame_rate)
    seconds = time.perf_counter() - t0
    return [
        Heard(
            engine.frame_rate,
            engine.frame_size,
            np.concatenate(out[k]) if out[k] else np.zeros(0, np.float32),
            np.array(text[k], np.int64),
            np.array(user[k][: len(text[k])], np.int64),
            lines[k].lines,
            seconds,
        )
        for k in range(n)
    ]


def script_for(model: ScriptedLM, row: int, d: G.Dialogue, codec, kind: str) -> None:
    """Load the oracle's (or the silent model's) script for dialogue `d` into batch row `row`."""
    from duplex.data.conversations import dialogue_record, encode_tracks

    fs = codec.frame_size
    F = math.ceil(len(d.user) / fs)
    silence = encode_tracks(codec, np.zeros((1, fs * 4), np.float32))[0, -1]
    if kind == "silent":
        pad = np.full(F, PAD)
        model.set_script(row, pad, pad, np.tile(silence, (F, 1)), silence)
        return
    words = dialogue_record(d, codec.frame_rate)["words"]
    audio = encode_tracks(codec, d.model[None])[0]
    model.set_script(
        row,
        text_stream(words, 1, F, 0),
        text_stream(words, 0, F, model.cfg.transcript_delay),
        audio,
        silence,
    )


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
            later = [x for x in _requests(d) if x.get("barge_in") and x["start"] <= e["cut_at"]]
            barge = later[-1]["start"] if later else e["cut_at"]
            b0 = _frame(barge, rate)
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
        r["answers"].append(
            {
                "part": part,
                "intent": e["intent"],
                "ok": ok,
                "said": said,
                "answer": e["answer"],
                "ago": ago,
                "asks": e.get("asks"),
            }
        )
        on = np.flatnonzero(voiced[f0:f1])
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


def _judge_speaking(items, heard_by, judge) -> list[float]:
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


def ceiling(answers: list[str], codec, judge) -> list[float]:
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


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _mean(xs) -> float | None:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def suite(cfg: EvalConfig, bank: G.WordBank) -> list[tuple[str, G.Dialogue]]:
    """The held-out dialogues: conversations with every duplex event, and one fact-distance
    dialogue (facts told `minutes` before they are asked)."""
    rng = np.random.default_rng(cfg.seed + 1000)
    out = []
    rates = {"pause": 0.4, "barge": 0.25, "ack": 0.3, "silence": 0.15}
    for i in range(cfg.conversations):
        # Every conversation holds each kind of event at least once.
        while True:
            d = G.generate("duplex", rng, bank, "eval", cfg.turns, rates, cfg.turns // 2)
            kinds = {e["kind"] for e in d.events}
            cut = any("cut_at" in e for e in d.events)
            if cut and {"ack", "silence"} <= kinds and any(e.get("pause") for e in d.events):
                break
        out.append((f"conversation{i}", d))
    if cfg.minutes:
        out.append(("facts", G.fact_distance_dialogue(bank, rng, tuple(cfg.minutes))))
    return out


def state_prompt_dialogues(bank: G.WordBank, seed: int) -> tuple[G.Dialogue, G.Dialogue]:
    """Facts told in one session; the same facts asked in a session started from its state."""
    rng = np.random.default_rng(seed + 2000)
    voice = G.user_voice(rng, "eval")
    tl = G.Timeline(bank, rng, voice, "eval", "state", G.Augment.random(rng, "eval"))
    tl.request("tell_name")
    tl.request("store_number")
    tl.request("tell_favorite", kind="color")
    first = tl.render()
    memory = tl.memory.copy()
    tl2 = G.Timeline(bank, rng, voice, "eval", "state", G.Augment.random(rng, "eval"))
    tl2.memory = memory
    tl2.told_at = {k: -1.0 for k in ("name", "number", "color")}
    tl2.request("ask_name")
    tl2.request("ask_number")
    tl2.request("ask_favorite", kind="color")
    return first, tl2.render()


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run the whole evaluation; returns the report (also what --json writes)."""
    from tqdm import tqdm

    from duplex import codecs
    from duplex.data.asr import Judge
    from duplex.model import duplex_lm
    from duplex.streamer.engine import Engine, SamplingConfig

    t_start = time.perf_counter()
    codec = codecs.load(cfg.codec)
    scripted = cfg.model in SCRIPTED
    model = ScriptedLM() if scripted else duplex_lm.load(cfg.model)
    # The engine streams its codec; scripts and the ceiling need one of their own.
    offline = codecs.load(cfg.codec)
    sampling = SamplingConfig(seed=cfg.seed)
    if cfg.temperature is not None:
        sampling.temperature = sampling.text_temperature = cfg.temperature
    bank = G.WordBank(codec.sample_rate)
    dialogues = suite(cfg, bank)
    if cfg.state_prompt:
        first, second = state_prompt_dialogues(bank, cfg.seed)
    audio_s = sum(d.duration for _, d in dialogues)
    longest = max((d.duration for _, d in dialogues), default=0.0)
    bar = tqdm(
        total=round(longest),
        bar_format="{l_bar}{bar}| {n:.0f}/{total} s of audio",
        unit="s",
        disable=not progress,
        desc=f"eval talk {cfg.model}",
    )
    script = {"scripted": model if scripted else None, "script_codec": offline, "kind": cfg.model}
    with Engine(model, codec, slots=len(dialogues)) as engine:
        heard = run_dialogues(
            engine, [d for _, d in dialogues], sampling, on_progress=bar.update, **script
        )
        heard_by = {name: h for (name, _), h in zip(dialogues, heard, strict=True)}
        results = [
            score_dialogue(d, h, "facts" if name == "facts" else "chat")
            for (name, d), h in zip(dialogues, heard, strict=True)
        ]
        timing = {name: {"audio_s": d.duration} for name, d in dialogues}
        loop_s = heard[0].seconds if heard else 0.0
        state_answers = []
        if cfg.state_prompt:
            with tempfile.TemporaryDirectory(prefix="duplex-eval-") as tmp:
                path = str(Path(tmp) / "prompt.dstate")
                run_dialogues(engine, [first], sampling, saves=[path], **script)
                (h2,) = run_dialogues(engine, [second], sampling, states=[path], **script)
            loop_s += h2.seconds
            state_answers = score_dialogue(second, h2, "state")["answers"]
    bar.close()
    judge = Judge(D.vocabulary())
    items = [(n, a, s0, s1) for (n, _), r in zip(dialogues, results) for a, s0, s1 in r["speaking"]]
    if len(items) > cfg.judge_max:
        # An even spread over the conversations; the ceiling hears the very same answers.
        idx = np.linspace(0, len(items) - 1, cfg.judge_max).round().astype(int)
        items = [items[i] for i in idx]
    spoken = _judge_speaking(items, heard_by, judge)
    answers = [a for r in results for a in r["answers"]]
    ceil = ceiling([it[1] for it in items], offline, judge)
    report = _summarise(cfg, results, answers, state_answers, spoken, ceil)
    report["runs"] = timing
    report["seconds"] = {
        "audio": audio_s,
        "wall": time.perf_counter() - t_start,
        "loop": loop_s,
        "longest_dialogue_audio": longest,
    }
    report["config"] = asdict(cfg)
    return report


def _summarise(cfg, results, answers, state_answers, spoken, ceil) -> dict:
    wer_e = sum(r["wer"][0] for r in results)
    wer_n = sum(r["wer"][1] for r in results)
    per_intent = {}
    for it in D.INTENTS:
        xs = [a["ok"] for a in answers if a["intent"] == it]
        if xs:
            per_intent[it] = {"n": len(xs), "correct": _mean(xs)}
    facts = {f"{m:g}min": [] for m in cfg.minutes}
    for a in answers:
        if a["part"] == "facts" and a["ago"] is not None and cfg.minutes:
            # Each question counts at the planned distance nearest to how long ago it was told.
            m = min(cfg.minutes, key=lambda m: abs(a["ago"] - 60 * m))
            facts[f"{m:g}min"].append(a["ok"])
    facts = {k: {"n": len(v), "correct": _mean(v)} for k, v in facts.items()}
    latency = [x for r in results for x in r["latency"]]
    barge = [x for r in results for x in r["barge"]]
    pauses = [x for r in results for x in r["pauses"]]
    acks = [x for r in results for x in r["acks"]]
    silence = [x for r in results for x in r["silence"]]
    return {
        "model": cfg.model,
        "codec": cfg.codec,
        "listening": {"wer": wer_e / max(1, wer_n), "words": wer_n},
        "answers": {
            "n": len(answers),
            "correct": _mean(a["ok"] for a in answers),
            "per_intent": per_intent,
            "facts_by_distance": facts,
            "examples": [
                {"said": a["said"], "answer": a["answer"], "ok": a["ok"]} for a in answers[:12]
            ],
        },
        "speaking": {
            "n": len(spoken),
            "word_accuracy": _mean(spoken),
            "ceiling": _mean(ceil),
            "ratio": (_mean(spoken) or 0.0) / max(_mean(ceil) or 0.0, 1e-9),
        },
        "timing": {
            "reply_latency_p50": _pct(latency, 50),
            "reply_latency_p90": _pct(latency, 90),
            "replied": len(latency) / max(1, len(latency) + sum(r["no_reply"] for r in results)),
            "pause_takeovers": _mean(pauses),
            "pauses": len(pauses),
            "barge_ins": len(barge),
            "barge_in_stopped_200ms": _mean((x is not None and x <= 0.2) for x in barge),
            "barge_in_stop_p50": _pct([x for x in barge if x is not None], 50),
            "talk_through": _mean(acks),
            "acks": len(acks),
            "speech_when_silent": _mean(silence),
        },
        "state_prompt": {
            "n": len(state_answers),
            "correct": _mean(a["ok"] for a in state_answers),
        },
    }


def _fmt(x, pct: bool = False, ms: bool = False) -> str:
    if x is None:
        return "-"
    if ms:
        return f"{1000 * x:.0f} ms"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def table(report: dict) -> str:
    """The report as a plain-text table."""
    a, t, s = report["answers"], report["timing"], report["speaking"]
    rows = [
        ("user transcript WER", _fmt(report["listening"]["wer"], pct=True)),
        ("answers correct (text)", f"{_fmt(a['correct'], pct=True)} of {a['n']}"),
    ]
    for k, v in a["facts_by_distance"].items():
        rows.append((f"  fact asked {k} later", f"{_fmt(v['correct'], pct=True)} of {v['n']}"))
    for k, v in a["per_intent"].items():
        rows.append((f"  {k}", f"{_fmt(v['correct'], pct=True)} of {v['n']}"))
    rows += [
        ("spoken answers: judge word accuracy", _fmt(s["word_accuracy"])),
        ("  ceiling (model voice via codec)", _fmt(s["ceiling"])),
        ("  ratio", _fmt(s["ratio"])),
        (
            "reply latency p50 / p90",
            f"{_fmt(t['reply_latency_p50'], ms=True)} / {_fmt(t['reply_latency_p90'], ms=True)}",
        ),
        ("requests with a spoken reply", _fmt(t["replied"], pct=True)),
        ("pause takeovers", f"{_fmt(t['pause_takeovers'], pct=True)} of {t['pauses']}"),
        (
            "barge-ins stopped within 200 ms",
            f"{_fmt(t['barge_in_stopped_200ms'], pct=True)} of {t['barge_ins']}",
        ),
        ("talk-through of acknowledgements", f"{_fmt(t['talk_through'], pct=True)} of {t['acks']}"),
        ("speech when nobody asked (frames)", _fmt(t["speech_when_silent"], pct=True)),
        (
            "state as system prompt: answers",
            f"{_fmt(report['state_prompt']['correct'], pct=True)} of {report['state_prompt']['n']}",
        ),
        (
            "audio / wall time",
            f"{report['seconds']['audio']:.0f} s / {report['seconds']['wall']:.0f} s",
        ),
    ]
    w = max(len(k) for k, _ in rows)
    head = f"duplex eval talk: model {report['model']}, codec {report['codec']}"
    return "\n".join([head, *(f"{k:<{w}}  {v}" for k, v in rows)])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, a = report["timing"], report["answers"]
    names = [
        "1-WER",
        "answers",
        "speaking/ceil",
        "replied",
        "no takeover",
        "barge stop",
        "talk-through",
        "quiet when silent",
        "state prompt",
    ]
    vals = [
        max(0.0, 1 - report["listening"]["wer"]),
        a["correct"] or 0,
        min(1.0, report["speaking"]["ratio"] or 0),
        t["replied"] or 0,
        1 - (t["pause_takeovers"] or 0) if t["pause_takeovers"] is not None else 0,
        t["barge_in_stopped_200ms"] or 0,
        t["talk_through"] or 0,
        1 - (t["speech_when_silent"] or 0) if t["speech_when_silent"] is not None else 0,
        report["state_prompt"]["correct"] or 0,
    ]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(range(len(vals)), vals, color="#3b7dd8")
    ax.set_xticks(range(len(vals)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"duplex eval talk: {report['model']} (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HELP = "score a talking model on held-out spoken conversations through the real loop"
DESCRIPTION = """Score a model the way a listener would, on held-out conversations.

Held-out voices (an accent and variants training never uses), numbers and arithmetic problems are
spoken into the real loop (codec in, model step, codec out, as `duplex talk --input`). Reported:
user transcript WER; answers correct in the model's text, per intent and for facts asked 1, 10
and 60 minutes after being told; a closed-vocabulary recogniser on the model's speech against the
same recogniser on the model voice through the codec (the ceiling); reply latency p50/p90, pause
takeovers, barge-in stops within 200 ms, talk-through of acknowledgements, speech when nobody
asked; and a state saved after facts were told, reloaded in a new session and asked.

--model oracle (the reference answers, scripted) and --model silent validate the evaluator:
the oracle scores near the ceiling, silence near zero. The 60-minute fact question runs an hour
of audio through the loop (minutes on this CPU); --minutes 1,10 is quicker.

Examples:
  duplex eval talk                                 the shipped model (default, trained)
  duplex eval talk --model oracle --minutes 1,10
  duplex eval talk --model runs/m1/model.safetensors --json out.json --png out.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="model name, .safetensors, oracle or silent (default)"
    )
    p.add_argument("--codec", default="default", help="codec name or .safetensors")
    p.add_argument("--conversations", type=int, default=4, help="held-out conversations (4)")
    p.add_argument("--turns", type=int, default=16, help="most turns per conversation (16)")
    p.add_argument(
        "--minutes",
        default="1,10,60",
        help="fact distances in minutes (default 1,10,60; empty for none)",
    )
    p.add_argument("--seed", type=int, default=0, help="which held-out conversations (0)")
    p.add_argument("--judge-max", type=int, default=48, help="spoken answers judged (48)")
    p.add_argument("--no-state", action="store_true", help="skip the saved-state check")
    p.add_argument("--temperature", type=float, help="sampling temperature (text and audio)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--json", type=Path, help="write the report here (default under benchmarks/)")
    p.add_argument("--png", type=Path, help="write the bar chart here")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    try:
        minutes = tuple(float(x) for x in args.minutes.split(",") if x.strip())
    except ValueError:
        print(f"duplex eval talk: --minutes must be numbers, got {args.minutes!r}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        args.model,
        args.codec,
        args.conversations,
        args.turns,
        minutes,
        args.seed,
        args.judge_max,
        not args.no_state,
        args.temperature,
    )
    try:
        report = evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"duplex eval talk: {e}", file=sys.stderr)
        return 2
    print(table(report))
    stem = Path(str(args.model)).stem.replace("/", "_")
    out = args.json or Path("benchmarks/results") / f"eval_talk_{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    png = args.png or out.with_suffix(".png")
    plot(report, png)
    print(f"[eval] {out} {png}")
    return 0
