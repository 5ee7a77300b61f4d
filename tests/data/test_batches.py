"""Training batches: pure in (step, rows), streams aligned, curriculum weights, DuplexLM-ready."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from duplex.data import conversations as C
from duplex.data.batches import (
    BARGE_AFTER,
    ConversationBatches,
    Curriculum,
    barge_frames,
    user_speaking,
)
from duplex.model.tokenizer import EOT, PAD


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    C.build(
        out,
        {"tts": 0.004, "asr": 0.003, "pairs": 0.004, "duplex": 0.006},
        seed=1,
        shard_minutes=0.25,
        max_turns=5,
        progress=False,
    )
    return out


def test_a_batch_is_a_pure_function_of_step_and_rows(corpus):
    b = ConversationBatches(corpus, seq_len=200)
    whole = b.batch(7, slice(0, 6))
    again = b.batch(7, slice(0, 6))
    halves = [b.batch(7, slice(0, 3)), b.batch(7, slice(3, 6))]
    for k in ("user_audio", "model_audio", "model_text", "user_text"):
        assert whole[k].equal(again[k])
        assert whole[k][:3].equal(halves[0][k]) and whole[k][3:].equal(halves[1][k])
    assert not whole["user_audio"].equal(b.batch(8, slice(0, 6))["user_audio"])
    assert whole["user_audio"].shape == (6, 200, 8) and whole["model_text"].shape == (6, 200)


def test_crops_are_the_stored_streams_in_place(corpus):
    """Each row is a slice of one shard: its codes and its rendered text at the same frames."""
    b = ConversationBatches(corpus, seq_len=150, text_lead=2, stages=["tts"])
    sh = C.Shard(next(corpus.glob("tts-*.npz")))
    texts = [sh.text_streams(i, 2, 3) for i in range(len(sh))]
    model_text = np.concatenate([t[0] for t in texts])
    batch = b.batch(0, slice(0, 4))
    for r in range(4):
        codes = batch["model_audio"][r].numpy()
        # Locate the crop by its codes, then its text must be the text of the same frames.
        F = sh.model.shape[1]
        hits = [a for a in range(F - 150 + 1) if np.array_equal(sh.model[:, a : a + 150].T, codes)]
        assert hits
        assert any(
            np.array_equal(model_text[a : a + 150], batch["model_text"][r].numpy()) for a in hits
        )
    assert set(batch["stage"]) == {"tts"}
    # The tts stage: the model reads, the user is silent (no user text at all).
    assert (batch["user_text"] == PAD).all()
    assert ((batch["model_text"] != PAD) & (batch["model_text"] != EOT)).any()


def test_the_curriculum_moves_but_keeps_every_stage():
    c = Curriculum(steps=100, floor=0.1)
    stages = ["tts", "asr", "pairs", "conversations", "duplex"]
    w0, w1 = c.weights(0, stages), c.weights(100, stages)
    assert w0[0] > w1[0] and w0[-1] < w1[-1]
    for w in (w0, c.weights(50, stages), w1, c.weights(10**6, stages)):
        assert abs(w.sum() - 1) < 1e-9 and (w >= 0.1 / 5 - 1e-12).all()


def test_rows_follow_the_curriculum(corpus):
    c = Curriculum(
        steps=1,
        start={"tts": 1, "asr": 1, "pairs": 1, "duplex": 1},
        end={"tts": 0, "asr": 0, "pairs": 0, "duplex": 1},
        floor=0.0,
    )
    b = ConversationBatches(corpus, seq_len=100, curriculum=c)
    late = [s for step in range(5, 10) for s in b.batch(step, slice(0, 8))["stage"]]
    assert set(late) == {"duplex"}
    early = {s for s in b.batch(0, slice(0, 64))["stage"]}
    assert early == {"tts", "asr", "pairs", "duplex"}


def test_user_speaking_spans_each_utterance_less_the_lead():
    # speaker, utterance, text, first frame, end frame: user utterance 0 is two words.
    words = [[0, 0, "hi", 2, 5], [0, 0, "there", 6, 9], [1, 1, "yes", 10, 12], [0, 2, "no", 14, 20]]
    want = np.zeros(22, np.float32)
    want[2:9] = 1
    want[14:20] = 1
    assert user_speaking(words, 22).tolist() == want.tolist()
    want[7:9] = 0
    want[18:20] = 0
    assert user_speaking(words, 22, text_lead=2).tolist() == want.tolist()
    # An utterance cut by the end of the conversation stays inside it.
    assert user_speaking([[0, 0, "hi", 5, 30]], 10).tolist() == [0] * 5 + [1] * 5


def test_unanswered_stages_train_the_model_only_while_the_user_speaks(corpus):
    """In asr crops the user's requests go unanswered by construction: the model's streams are
    weighted 1 while the user speaks (it must not talk over them) and 0 after each request."""
    b = ConversationBatches(corpus, seq_len=100, text_lead=2)
    batch = b.batch(0, slice(0, 32))
    stages, weight = batch["stage"], batch["model_weight"]
    assert "asr" in stages and len(set(stages)) > 1
    assert weight.shape == (32, 100) and weight.dtype == torch.float32
    asr = [r for r, s in enumerate(stages) if s == "asr"]
    others = [r for r, s in enumerate(stages) if s != "asr"]
    assert (weight[others] == 1).all()
    assert set(weight[asr].unique().tolist()) == {0.0, 1.0}
    # What makes them unanswered: the user speaks, the model writes nothing.
    assert (batch["user_text"][asr] != PAD).any()
    assert (batch["model_text"][asr] == PAD).all()
    # In place: the utterances of each stored asr conversation, its words' frames.
    entries = [e for e in C.read_manifest(corpus)["shards"] if e["stage"] == "asr"]
    for e in entries:
        sh = C.Shard(corpus / e["file"])
        (stream,) = [s for s in b.streams["asr"] if np.array_equal(s.user, sh.user.T)]
        for i in range(len(sh)):
            lo, hi = sh.offsets[i], sh.offsets[i + 1]
            span = stream.user_speaking[lo:hi]
            users = [w for w in sh.record(i)["words"] if w[0] == 0]
            for w, nxt in zip(users, [*users[1:], None]):
                # Inside a word: 1, but for the lead before a request ends.
                assert (span[w[3] : w[4] - 2] == 1).all()
                if nxt is None or nxt[1] != w[1]:
                    # After a request, until the next one: the reply nobody gives, 0.
                    end = len(span) if nxt is None else nxt[3]
                    assert (span[w[4] - 2 : end] == 0).all()


def test_a_batch_trains_the_model(corpus):
    from duplex.model.duplex_lm import load

    model = load("tiny").train()
    batch = ConversationBatches(corpus, seq_len=64).batch(0, slice(0, 2))
    _, losses = model({k: v for k, v in batch.items() if k != "stage"})
    assert all(np.isfinite(float(v.detach())) for v in losses.values())
    losses["loss"].backward()


def test_clear_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="no eval shards"):
        ConversationBatches(corpus, 100, split="eval")
    with pytest.raises(ValueError, match="unknown stages"):
        ConversationBatches(corpus, 100, stages=["nope"])
    with pytest.raises(ValueError, match="lower seq_len"):
        ConversationBatches(corpus, 10**7)


def test_several_corpora_pool_their_shards_once(corpus, tmp_path):
    one = ConversationBatches(corpus, 100)
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    both = ConversationBatches([corpus, copy], 100)
    assert both.frames == {k: 2 * v for k, v in one.frames.items()}
    assert [len(both.streams[k]) for k in both.stages] == [
        2 * len(one.streams[k]) for k in one.stages
    ]
    # The same shard reached twice (the folder given twice, or hard-linked into another
    # folder, as a merge by links does) would be drawn twice as often: refused.
    with pytest.raises(ValueError, match="same file"):
        ConversationBatches([corpus, corpus], 100)
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in corpus.glob("*.npz"):
        os.link(f, linked / f"other-{f.name}")
    manifest = json.loads((corpus / "manifest.json").read_text())
    for e in manifest["shards"]:
        e["file"] = f"other-{e['file']}"
    (linked / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="same file"):
        ConversationBatches([corpus, linked], 100)


def _crop_starts(b: ConversationBatches, batch: dict) -> list[tuple[int, bool]]:
    """Where each row was cut: (frame in its stream, whether a conversation begins there)."""
    T = b.seq_len
    found = []
    for r, stage in enumerate(batch["stage"]):
        codes = batch["user_audio"][r].numpy()
        hits = [
            (a, bool(np.isin(a, s.starts)))
            for s in b.streams[stage]
            for a in range(len(s.user) - T + 1)
            if np.array_equal(s.user[a : a + T], codes)
            and np.array_equal(s.model[a : a + T], batch["model_audio"][r].numpy())
        ]
        assert hits, "a row is not a crop of its stage's streams"
        found.append(hits[0])
    return found


def test_crops_from_the_start_begin_where_conversations_begin(corpus):
    """from_start=1: every crop begins a conversation, so each question in it sees whatever
    fact was told before it; by default crops begin anywhere."""
    starts = ConversationBatches(corpus, seq_len=60, from_start=1.0)
    assert any(len(s.starts) >= 2 for v in starts.streams.values() for s in v)
    rows = [x for step in range(4) for x in _crop_starts(starts, starts.batch(step))]
    assert all(at_start for _, at_start in rows)
    assert len({a for a, _ in rows}) > 1
    anywhere = ConversationBatches(corpus, seq_len=60)
    rows = [x for step in range(4) for x in _crop_starts(anywhere, anywhere.batch(step))]
    assert sum(at_start for _, at_start in rows) < len(rows) // 2
    # Half: some rows at a start, and the same step is the same batch again.
    half = ConversationBatches(corpus, seq_len=60, from_start=0.5)
    rows = [x for step in range(6) for x in _crop_starts(half, half.batch(step))]
    assert 0 < sum(at_start for _, at_start in rows) < len(rows)
    assert half.batch(3)["user_audio"].equal(half.batch(3)["user_audio"])
    with pytest.raises(ValueError, match="from_start"):
        ConversationBatches(corpus, 60, from_start=1.5)


def test_crosstalk_lays_the_models_reading_over_the_user_with_its_losses_off(corpus):
    """crosstalk=1: every asr crop where the user speaks gets a 1-4 s stretch of a tts crop (the
    model's codes and text together) on the model's streams, weighted 0 there; the user's
    streams, the other rows and the frames outside the stretch are the plain batch's."""
    plain = ConversationBatches(corpus, seq_len=250, text_lead=2)
    over = ConversationBatches(corpus, seq_len=250, text_lead=2, crosstalk=1.0)
    tts = over.streams["tts"]
    laid = 0
    for step in range(6):
        a, b = plain.batch(step, slice(0, 8)), over.batch(step, slice(0, 8))
        assert a["stage"] == b["stage"]
        for k in ("user_audio", "user_text"):
            assert a[k].equal(b[k])
        for r, stage in enumerate(b["stage"]):
            changed = (a["model_audio"][r] != b["model_audio"][r]).any(-1) | (
                a["model_weight"][r] != b["model_weight"][r]
            )
            if stage != "asr" or not (a["model_weight"][r] > 0).any():
                assert not changed.any()
                continue
            off = np.flatnonzero((b["model_weight"][r] == 0) & (a["model_weight"][r] > 0))
            assert len(off) > 0
            # One stretch, 1-4 s, over frames where the user speaks, the rest untouched.
            lo, hi = int(np.flatnonzero(changed)[0]), int(np.flatnonzero(changed)[-1]) + 1
            assert 50 <= hi - lo <= 200 or hi - lo == 250
            assert (b["model_weight"][r][lo:hi] == 0).all()
            assert torch.equal(b["model_weight"][r][:lo], a["model_weight"][r][:lo])
            assert torch.equal(b["model_weight"][r][hi:], a["model_weight"][r][hi:])
            codes = b["model_audio"][r][lo:hi].numpy()
            text = b["model_text"][r][lo:hi].numpy()
            n = hi - lo
            src = [
                s
                for s in tts
                for j in range(len(s.model) - n + 1)
                if np.array_equal(s.model[j : j + n], codes)
                and np.array_equal(s.model_text[j : j + n], text)
            ]
            assert src, "the stretch is not a tts crop (codes and text at the same frames)"
            laid += 1
    assert laid >= 3
    with pytest.raises(ValueError, match="crosstalk"):
        ConversationBatches(corpus, 250, crosstalk=1.5)
    with pytest.raises(ValueError, match="no tts stage"):
        ConversationBatches(corpus, 250, stages=["asr"], crosstalk=0.5)


def test_synthetic_barge_drills_stop_the_model_40_to_120_ms_after_each_onset(corpus):
    """synthetic_barge=1: in asr crops the model reads before user onsets (its losses off) and
    its streams fall silent 2-6 frames after each: every change to its audio lies in a drill's
    reading, none where the silence is taught; the reading's text ends with EOT; the weight
    changes only by `barge_weight` from the onset to just past the stop."""
    plain = ConversationBatches(corpus, seq_len=250, text_lead=2, barge_weight=3.0)
    drill = ConversationBatches(
        corpus, seq_len=250, text_lead=2, synthetic_barge=1.0, barge_weight=3.0
    )
    drills = spoken = 0
    for step in range(8):
        a, b = plain.batch(step, slice(0, 8)), drill.batch(step, slice(0, 8))
        assert a["stage"] == b["stage"]
        for k in ("user_audio", "user_text"):
            assert a[k].equal(b[k])
        for r, stage in enumerate(b["stage"]):
            pw, dw = a["model_weight"][r].numpy(), b["model_weight"][r].numpy()
            audio = (a["model_audio"][r] != b["model_audio"][r]).any(-1).numpy()
            text = b["model_text"][r].numpy()
            if stage != "asr":
                assert not audio.any() and (dw == pw).all()
                assert a["model_text"][r].equal(b["model_text"][r])
                continue
            assert (a["model_text"][r] == PAD).all()
            on = np.flatnonzero((pw[1:] > 0) & (pw[:-1] == 0)) + 1
            for f in np.flatnonzero(audio):
                assert any(u - 125 <= f < u + 6 for u in on), f"speech at {f}, onsets {on}"
            for f in np.flatnonzero(text != PAD):
                assert any(u - 125 <= f < u + 6 + 26 for u in on), f"text at {f}"
            for f in np.flatnonzero(dw != pw):
                assert dw[f] == 3 * pw[f] and any(u <= f < u + 6 + 10 for u in on)
            for u in on:
                if dw[u] != 3 * pw[u]:
                    continue
                drills += 1
                spoken += int(audio[u - 13 : u].any())
                ue = u + int(np.argmax(pw[u:] == 0)) if (pw[u:] == 0).any() else 250
                end = min(ue, u + 33)
                written = np.flatnonzero(text[max(0, u - 125) : end] != PAD)
                last = max(0, u - 125) + written[-1]
                # Unless the crop ends first, the reading's last byte is EOT.
                assert text[last] == EOT or last == 249
    assert drills >= 5 and spoken >= drills * 0.8
    with pytest.raises(ValueError, match="synthetic_barge"):
        ConversationBatches(corpus, 250, crosstalk=0.5, synthetic_barge=0.6)
    with pytest.raises(ValueError, match="no tts stage"):
        ConversationBatches(corpus, 250, stages=["asr"], synthetic_barge=0.5)


def test_barge_frames_run_from_the_interrupting_onset_to_past_the_cut():
    events = [
        {"kind": "request", "start": 0.1, "end": 0.5},
        {"kind": "answer", "start": 0.6, "end": 2.0, "cut_at": 1.1},
        {"kind": "request", "start": 1.0, "end": 1.6, "barge_in": True},
        {"kind": "answer", "start": 1.8, "end": 2.4},
    ]
    got = barge_frames(events, 200, 50.0, after=0.2)
    want = np.zeros(200, np.float32)
    # Onset 1.0 s (frame 50) to the cut 1.1 s + 0.2 s (frame 65).
    want[50:65] = 1
    assert got.tolist() == want.tolist()
    # A cut near the end of the conversation stays inside it; none: all zero.
    assert barge_frames(events, 55, 50.0).sum() == 5
    assert barge_frames(events[:1], 200, 50.0).sum() == 0


def test_barge_weight_weights_the_frames_where_the_model_must_stop(corpus):
    """--barge-weight W: the model's streams weigh W from a barge-in's onset to just past its
    stop, 1 elsewhere; asr crops keep their 0/1 weights; W = 1 changes nothing."""
    plain = ConversationBatches(corpus, seq_len=100, text_lead=2)
    heavy = ConversationBatches(corpus, seq_len=100, text_lead=2, barge_weight=4.0)
    assert all(s.barge is None for v in plain.streams.values() for s in v)
    cuts = 0
    for e in [e for e in C.read_manifest(corpus)["shards"] if e["stage"] == "duplex"]:
        sh = C.Shard(corpus / e["file"])
        (stream,) = [s for s in heavy.streams["duplex"] if np.array_equal(s.user, sh.user.T)]
        for i in range(len(sh)):
            span = stream.barge[sh.offsets[i] : sh.offsets[i + 1]]
            for ev in sh.record(i)["events"]:
                if "cut_at" in ev:
                    cuts += 1
                    f = int(ev["cut_at"] * 50)
                    assert span[f] == 1 and span[f - 2] == 1
                    assert span[int((ev["cut_at"] + BARGE_AFTER) * 50) + 1] == 0
    assert cuts >= 1
    hits = 0
    for step in range(40):
        a, b = plain.batch(step, slice(0, 16)), heavy.batch(step, slice(0, 16))
        for k in ("user_audio", "model_audio", "model_text", "user_text"):
            assert a[k].equal(b[k])
        for r, stage in enumerate(a["stage"]):
            if stage != "duplex":
                assert b["model_weight"][r].equal(a["model_weight"][r])
                continue
            assert (a["model_weight"][r] == 1).all()
            # In place: 4 exactly on the stored barge frames of this crop.
            user = a["user_audio"][r].numpy()
            for st in heavy.streams["duplex"]:
                at = [
                    i
                    for i in np.flatnonzero(st.user[:, 0] == user[0, 0])
                    if i + 100 <= len(st.user) and np.array_equal(st.user[i : i + 100], user)
                ]
                if at:
                    want = 1 + 3 * st.barge[at[0] : at[0] + 100]
                    assert b["model_weight"][r].tolist() == want.tolist()
                    hits += int((want == 4).any())
                    break
            else:
                raise AssertionError("a duplex crop not found in its stream")
    assert hits >= 1
    with pytest.raises(ValueError, match="barge_weight"):
        ConversationBatches(corpus, 100, barge_weight=-1.0)
