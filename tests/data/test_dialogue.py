"""Dialogues: words sit inside their audio, turn-taking rules hold, the domain is respected."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from duplex.data import dialogue as G
from duplex.data import domain as D
from duplex.data import speech as S

SR = 16000


@pytest.fixture(scope="module")
def bank() -> G.WordBank:
    return G.WordBank(SR)


@pytest.fixture(scope="module")
def duplex_dialogue(bank) -> G.Dialogue:
    # Enough turns that pauses, barge-ins and acknowledgements all occur.
    rng = np.random.default_rng(7)
    while True:
        d = G.generate("duplex", rng, bank, max_turns=30)
        kinds = {e["kind"] for e in d.events}
        cut = any("cut_at" in e for e in d.events)
        if cut and "ack" in kinds and any(e.get("pause") for e in d.events):
            return d


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


@pytest.mark.parametrize("warp", [1.0, 0.87, 1.13])
def test_every_word_sits_inside_its_audio(bank, warp):
    """Each word's span holds speech and the gaps between words of one speaker are silent: the
    timing comes from where the word's audio was placed, so text and sound agree exactly (a
    warped voice too: its words are shorter or longer, and placed as they are)."""
    rng = np.random.default_rng(3)
    voice = dataclasses.replace(G.user_voice(rng, "train"), warp=warp)
    tl = G.Timeline(bank, rng, voice, "train", "asr", G.Augment())
    for _ in range(4):
        tl.request(tl._intent(), pause_p=0.5)
    d = tl.render()
    for speaker, track in (("user", d.user), ("model", d.model)):
        words = [w for w in d.words if w.speaker == speaker]
        assert words
        for w in words:
            seg = track[int(w.start * SR) : int(w.end * SR)]
            assert _rms(seg) > 0.01, (speaker, w)
            # The first and last 5 ms of a word hold its trimmed onset and offset.
            assert np.abs(seg[: SR // 200]).max() > 1e-3, (speaker, w, "onset")
            assert np.abs(seg[-SR // 200 :]).max() > 1e-3, (speaker, w, "offset")
        for a, b in itertools.pairwise(words):
            gap = track[int(a.end * SR) + 16 : int(b.start * SR) - 16]
            if len(gap) and d.augment.rt60 == 0:
                assert np.abs(gap).max() < 1e-6, (speaker, a, b)


def test_each_word_is_found_in_the_track_where_its_timing_says(bank):
    """An independent check of the timing: each word synthesised afresh by espeak-ng (not from
    the bank) is located in the mixed track by cross-correlation, and lands where the word's
    start says (within one 20 ms frame)."""
    rng = np.random.default_rng(0)
    tl = G.Timeline(bank, rng, G.MODEL_VOICE, "train", "tts", G.Augment())
    tl.model_reads("remember the number seven hundred")
    tl.model_reads("spell moon")
    d = tl.render()
    for w in d.words:
        ref = S._trim(S._to_rate(S._run_espeak(w.text, G.MODEL_VOICE), SR))
        lo = max(0, int((w.start - 0.5) * SR))
        seg = d.model[lo : int((w.end + 0.5) * SR)]
        corr = np.correlate(seg, ref, mode="valid")
        found = (lo + int(np.argmax(corr))) / SR
        assert abs(found - w.start) < 0.02, (w.text, found, w.start)


def test_replies_follow_requests_within_200_ms(duplex_dialogue):
    d = duplex_dialogue
    for e in d.events:
        if e["kind"] == "request" and "reply_start" in e:
            assert 0.08 <= e["reply_start"] - e["end"] <= 0.2
            model_words = [
                w for w in d.words if w.speaker == "model" and w.start >= e["reply_start"] - 1e-9
            ]
            assert model_words and abs(model_words[0].start - e["reply_start"]) < 1e-6


def test_barge_in_silences_the_model_within_200_ms(duplex_dialogue):
    d = duplex_dialogue
    cuts = [e for e in d.events if "cut_at" in e]
    assert cuts
    for e in cuts:
        barge = [x for x in d.events if x.get("barge_in") and x["start"] <= e["cut_at"]][-1]
        lo, hi = G.BARGE_STOP
        assert lo - 1e-9 <= e["cut_at"] - barge["start"] <= hi + 1e-9
        # The output lags a frame (20 ms) and fades 10 ms: still inside the domain's 200 ms.
        assert hi + 0.03 <= 0.2
        after = d.model[int((e["cut_at"] + 0.011) * SR) : int(barge["end"] * SR)]
        assert np.abs(after).max(initial=0) == 0.0
        # Its text stops with the last word begun before the cut.
        assert all(
            w.start < e["cut_at"]
            for w in d.words
            if w.speaker == "model" and e["reply_start"] <= w.start < barge["end"]
        )


def test_a_warped_voice_is_the_same_words_faster_and_higher(bank):
    """warp 1.12 plays the voice 1.12 times faster: each word 1/1.12 as long, its pitch up by
    the same factor (the strongest autocorrelation lag of its voiced middle, 60-400 Hz)."""
    voice = G.user_voice(np.random.default_rng(0), "train")
    fast = dataclasses.replace(voice, warp=1.12)

    def pitch(a: np.ndarray) -> float:
        mid = a[len(a) // 4 : 3 * len(a) // 4].astype(np.float64)
        ac = np.correlate(mid, mid, "full")[len(mid) - 1 :]
        lo, hi = SR // 400, SR // 60
        return SR / (lo + int(np.argmax(ac[lo:hi])))

    for word in ("hello", "remember", "morning"):
        a, b = bank.word(voice, word), bank.word(fast, word)
        assert abs(len(a) / len(b) - 1.12) < 0.04, word
        assert 1.06 < pitch(b) / pitch(a) < 1.18, (word, pitch(a), pitch(b))
    d = G.generate("asr", np.random.default_rng(5), bank, warp=0.9)
    assert d.user_voice.warp == 0.9


def test_the_barge_in_stop_is_a_setting(bank):
    """The same seed with another `barge_stop` moves only where the model's audio stops."""
    fixed, default = [], []
    for stops, out in (((0.15, 0.15), fixed), (G.BARGE_STOP, default)):
        rng = np.random.default_rng(7)
        while not out:
            d = G.generate("duplex", rng, bank, max_turns=30, barge_stop=stops)
            out += [
                e["cut_at"]
                - [x for x in d.events if x.get("barge_in") and x["start"] <= e["cut_at"]][-1][
                    "start"
                ]
                for e in d.events
                if "cut_at" in e
            ]
    assert np.allclose(fixed, 0.15) and len(fixed) == len(default)
    assert not np.allclose(default, 0.15)


def test_pauses_fall_only_where_the_request_is_unfinished(bank):
    rng = np.random.default_rng(1)
    whole = set()
    for it in D.INTENTS:
        for _ in range(30):
            whole.add(D.make_request(it, rng, D.Memory()).text)
    for it in D.INTENTS:
        for _ in range(30):
            r = D.make_request(it, rng, D.Memory())
            for p in r.pauses:
                assert 0 < p < len(r.words)
                assert " ".join(r.words[:p]) not in whole, (r.text, p)


def test_acknowledgements_are_talked_through(duplex_dialogue):
    d = duplex_dialogue
    for a in (e for e in d.events if e["kind"] == "ack"):
        seg = d.model[int(a["start"] * SR) : int((a["end"] + 0.3) * SR)]
        assert _rms(seg) > 0.01


def test_answers_follow_the_domain_and_newest_facts():
    rng = np.random.default_rng(2)
    m = D.Memory()
    assert D.make_request("ask_name", rng, m).answer == "i do not know your name yet."
    D.make_request("tell_name", rng, m, name="ada")
    D.make_request("tell_name", rng, m, name="zoe")
    assert D.make_request("ask_name", rng, m).answer == "your name is zoe."
    D.make_request("store_number", rng, m, number="427")
    assert (
        D.make_request("ask_number", rng, m).answer == "the number was four hundred twenty seven."
    )
    assert D.number_words(0) == "zero" and D.number_words(110) == "one hundred ten"
    r = D.make_request("arithmetic", rng, m)
    a, op, b = r.words[2], r.words[-2], r.words[-1]
    assert r.answer.startswith(f"{' '.join(r.words[2:])} is ")
    for _ in range(200):
        r = D.make_request("arithmetic", rng, m)
        assert "minus" not in r.words or r.answer.split(" is ")[1] != "-"
    assert D.make_request("spell", rng, m, value="cat").answer.count(",") >= 2
    assert op in ("plus", "minus", "times") and a and b


def test_eval_split_is_disjoint_from_train(bank):
    """Held-out voices, numbers and arithmetic problems never appear in training dialogues."""
    assert not set(S.voices("train")) & set(S.voices("eval"))
    rng = np.random.default_rng(4)
    for _ in range(300):
        m = D.Memory()
        n = D.make_request("store_number", rng, m, "train")
        assert not D.held_out_number(m.number)
        e = D.make_request("store_number", rng, m, "eval")
        assert D.held_out_number(m.number), (n.text, e.text)
        r = D.make_request("arithmetic", rng, m, "train")
        w = r.text.split()
        op_i = next(i for i, x in enumerate(w) if x in ("plus", "minus", "times"))
        a = " ".join(w[2:op_i])
        b = " ".join(w[op_i + 1 :])
        nums = {D.number_words(i): i for i in range(13)}
        assert not D.held_out_arithmetic(nums[a], w[op_i], nums[b])
    for _ in range(50):
        v = G.user_voice(rng, "train")
        assert (v.accent, v.variant) in S.voices("train")
        assert 120 <= v.rate <= 260
        assert (v.accent, v.variant) != (G.MODEL_VOICE.accent, G.MODEL_VOICE.variant)


def test_fact_distance_dialogue_asks_each_fact_after_its_distance(bank):
    rng = np.random.default_rng(5)
    d = G.fact_distance_dialogue(bank, rng, minutes=(0.5, 2.0))
    asks = [e for e in d.events if e["kind"] == "request" and "asks" in e]
    assert len(asks) == 5
    ago = sorted(round((e["start"] - e["told_at"]) / 60, 1) for e in asks)
    assert ago[0] >= 0.5 and ago[-1] >= 2.0
    for e in asks:
        assert e["value"] is not None and e["value"].split()[0] in e["answer"]
    tells = [e for e in d.events if e["kind"] == "request" and "fact" in e]
    assert len({e["fact"] for e in tells}) == len(tells) == 5
