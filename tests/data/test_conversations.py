"""The conversation corpus: deterministic shards, resume, manifest, text streams, held-out split."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from duplex import codecs
from duplex.data import conversations as C
from duplex.data import corpus_command
from duplex.data import dialogue as G
from duplex.data import speech as S
from duplex.model.tokenizer import EOT, PAD

HOURS = {"tts": 0.004, "asr": 0.004, "duplex": 0.008}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    C.build(out, HOURS, seed=3, shard_minutes=0.25, max_turns=6, progress=False)
    return out


def test_same_seed_same_bytes(corpus, tmp_path):
    """A shard depends on nothing but its seed: rebuilt elsewhere, its arrays are identical."""
    manifest = C.read_manifest(corpus)
    first = manifest["shards"][0]
    C.build(
        tmp_path,
        {first["stage"]: HOURS[first["stage"]]},
        seed=3,
        shard_minutes=0.25,
        max_turns=6,
        progress=False,
    )
    a, b = C.Shard(corpus / first["file"]), C.Shard(tmp_path / first["file"])
    assert np.array_equal(a.user, b.user) and np.array_equal(a.model, b.model)
    assert a.meta == b.meta
    other = tmp_path / "other"
    C.build(
        other,
        {first["stage"]: HOURS[first["stage"]]},
        seed=4,
        shard_minutes=0.25,
        max_turns=6,
        progress=False,
    )
    c = C.Shard(other / first["file"])
    assert c.meta["conversations"] != a.meta["conversations"]


def test_manifest_lists_every_shard_and_stats_add_up(corpus):
    manifest = C.read_manifest(corpus)
    files = sorted(p.name for p in corpus.glob("*.npz"))
    assert sorted(e["file"] for e in manifest["shards"]) == files
    assert {e["stage"] for e in manifest["shards"]} == set(HOURS)
    for e in manifest["shards"]:
        sh = C.Shard(corpus / e["file"])
        assert e["frames"] == int(sh.offsets[-1]) == sh.user.shape[1] == sh.model.shape[1]
        assert e["conversations"] == len(sh)
        assert e["bytes"] == (corpus / e["file"]).stat().st_size
        assert abs(e["hours"] - e["frames"] / 50 / 3600) < 1e-9
        assert e["voices"]
    table = corpus_command.stats(manifest)
    total = sum(e["hours"] for e in manifest["shards"])
    assert f"{total:.2f}" in table.splitlines()[-3 if "last run" in table else -2]


def test_a_killed_run_resumes_without_redoing_finished_shards(corpus, tmp_path):
    hours = {"asr": 0.012}
    C.build(tmp_path, {"asr": 0.004}, seed=3, shard_minutes=0.25, progress=False)
    done = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    assert len(done) == 1
    # A run killed after writing a shard but before listing it, and a half-written temp file.
    manifest = C.read_manifest(tmp_path)
    (tmp_path / ".asr-train-00001.npz.tmp-123.npz").write_bytes(b"partial")
    C.build(tmp_path, hours, seed=3, shard_minutes=0.25, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    assert len(after) == 3
    for name, t in done.items():
        assert after[name] == t
    assert not list(tmp_path.glob(".*.tmp-*"))
    manifest = C.read_manifest(tmp_path)
    assert len(manifest["shards"]) == 3
    # Listed in no manifest: picked up from disk, not regenerated.
    (tmp_path / "manifest.json").write_text(
        json.dumps({"version": 1, "seed": 3, "codec": "default", "shards": []})
    )
    mt = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    C.build(tmp_path, hours, seed=3, shard_minutes=0.25, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")} == mt
    assert len(C.read_manifest(tmp_path)["shards"]) == 3
    with pytest.raises(ValueError, match="seed"):
        C.build(tmp_path, hours, seed=4, shard_minutes=0.25, progress=False)


def test_stored_codes_are_the_codec_codes_of_the_tracks():
    """Chunked streaming encode (what shards store) equals the codec's offline encode."""
    codec = codecs.load("default")
    bank = G.WordBank(codec.sample_rate)
    d = G.generate("pairs", np.random.default_rng(0), bank)
    codes = C.encode_tracks(codec, np.stack([d.user, d.model]), chunk_frames=37)
    x = torch.from_numpy(np.stack([d.user, d.model]))[:, None]
    ref = codec.encode(x).permute(0, 2, 1).numpy()
    assert codes.dtype == np.uint8
    assert np.array_equal(codes, ref)


def test_text_streams_place_words_at_their_frames(corpus):
    manifest = C.read_manifest(corpus)
    e = next(x for x in manifest["shards"] if x["stage"] == "duplex")
    sh = C.Shard(corpus / e["file"])
    for i in range(len(sh)):
        words = sh.record(i)["words"]
        model_text, user_text = sh.text_streams(i, text_lead=2, transcript_delay=3)
        F = len(model_text)
        assert len(user_text) == F == sh.codes(i)[0].shape[0]
        for spk, stream, shift in ((1, model_text, -2), (0, user_text, 3)):
            mine = [w for w in words if w[0] == spk]
            text = bytes(int(t) if t != EOT else 10 for t in stream if t != PAD).decode()
            # Every word, in order; utterances end with EOT.
            assert text.split() == [w[2] for w in mine]
            assert int((stream == EOT).sum()) == len({w[1] for w in mine})
            for w in mine:
                # A word's first byte is never before its audio start + shift.
                first = w[3] + shift
                idx = np.flatnonzero(stream[max(0, first) :] == w[2].encode()[0])
                assert len(idx), w
    # A direct case: lead moves text earlier, overflow pushes the next word later.
    words = [[1, 0, "hello,", 10, 12], [1, 0, "hi", 12, 20]]
    s = C.text_stream(words, 1, 30, -2)
    assert list(s[8:15]) == [*b"hello, "] and list(s[15:18]) == [*b"hi", EOT]
    assert (s[:8] == PAD).all() and (s[18:] == PAD).all()


def test_train_shards_never_hold_eval_voices(corpus):
    eval_voices = {f"{a}+{v}" if v else a for a, v in S.voices("eval")}
    for e in C.read_manifest(corpus)["shards"]:
        assert e["split"] == "train"
        assert not set(e["voices"]) & eval_voices


def test_cli_makes_and_describes_a_corpus(tmp_path, capsys):
    from duplex.apps.cli import main

    assert (
        main(
            [
                "data",
                "conversations",
                "--out",
                str(tmp_path),
                "--hours",
                "pairs=0.003",
                "--shard-minutes",
                "0.2",
                "--split",
                "eval",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "pairs" in out and "eval" in out
    assert main(["data", "conversations", "--stats", str(tmp_path)]) == 0
    assert "h of conversation per CPU-hour" in capsys.readouterr().out
    assert main(["data", "conversations", "--stats", str(tmp_path / "none")]) == 2
    with pytest.raises(SystemExit):
        main(["data", "conversations", "--out", str(tmp_path), "--hours", "nope=1"])
    assert main(["data", "conversations", "--out", str(tmp_path), "--warp", "0.7"]) == 2
    assert "--warp" in capsys.readouterr().err
    for bad in ("0.1", "0.2,0.1", "a,b"):
        with pytest.raises(SystemExit):
            main(["data", "conversations", "--out", str(tmp_path), "--barge-stop", bad])
    assert "--barge-stop" in capsys.readouterr().err
    # The corpus keeps its barge-in stops: another range is refused, nothing is lost.
    before = (tmp_path / "manifest.json").read_text()
    assert json.loads(before)["barge_stop"] == list(G.BARGE_STOP)
    args = ["data", "conversations", "--out", str(tmp_path), "--split", "eval"]
    assert main([*args, "--hours", "pairs=0.003", "--barge-stop", "0.1,0.2"]) == 2
    assert "barge_stop" in capsys.readouterr().err
    assert (tmp_path / "manifest.json").read_text() == before


def test_a_corpus_made_before_the_setting_keeps_its_old_stops(tmp_path):
    """A manifest without `barge_stop` was made with (0.08, 0.18): resuming it with those is
    allowed, the new default is refused."""
    hours, kw = {"pairs": 0.003}, {"split": "eval", "shard_minutes": 0.2, "progress": False}
    C.build(tmp_path, hours, barge_stop=(0.08, 0.18), **kw)
    m = json.loads((tmp_path / "manifest.json").read_text())
    del m["barge_stop"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    C.build(tmp_path, hours, barge_stop=(0.08, 0.18), **kw)
    with pytest.raises(ValueError, match="barge_stop"):
        C.build(tmp_path, hours, **kw)


def test_warp_gives_each_conversation_its_own_speed(tmp_path):
    """--warp W: every conversation's user voice plays at a speed in [1 - W, 1 + W], recorded
    with the voice; without it every voice plays as synthesised and the shard is as before."""
    spec = C.plan({"asr": 0.6 / 60}, "train", 4, "default", shard_minutes=0.6)[0]
    C.make_shard(dataclasses.replace(spec, warp=0.15), tmp_path / "w")
    C.make_shard(spec, tmp_path / "plain")
    warped, plain = C.Shard(tmp_path / "w" / spec.name), C.Shard(tmp_path / "plain" / spec.name)
    speeds = [warped.record(i)["voice"]["warp"] for i in range(len(warped))]
    assert len(set(speeds)) == len(speeds) > 1 and all(0.85 <= x <= 1.15 for x in speeds)
    assert all(plain.record(i)["voice"]["warp"] == 1.0 for i in range(len(plain)))
    # The same dialogues (own generator for the speeds): same words, other audio.
    assert [r["words"][0][2] for r in warped.meta["conversations"]][:1] == [
        r["words"][0][2] for r in plain.meta["conversations"]
    ][:1]
    assert not np.array_equal(warped.user[:, :50], plain.user[:, :50])


def test_shards_are_made_with_the_corpus_barge_in_stops(tmp_path):
    spec = C.plan({"duplex": 1.5 / 60}, "train", 3, "default", shard_minutes=1.5)[0]
    spec = dataclasses.replace(spec, barge_stop=(0.15, 0.15))
    C.make_shard(spec, tmp_path)
    sh = C.Shard(tmp_path / spec.name)
    gaps = []
    for i in range(len(sh)):
        ev = sh.record(i)["events"]
        for e in ev:
            if "cut_at" in e:
                barge = [x for x in ev if x.get("barge_in") and x["start"] <= e["cut_at"]][-1]
                gaps.append(e["cut_at"] - barge["start"])
    assert gaps and np.allclose(gaps, 0.15)
