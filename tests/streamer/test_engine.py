"""The engine: batched equals alone, joins and leaves, exec masks, saved states, bad input."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.engine import Engine, SamplingConfig
from duplex.streamer.statefile import StateFileError


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    codec = SmallCodec(SmallCodecConfig()).eval()
    return load("tiny"), codec


def _audio(seed: int, frames: int, fs: int = 320) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * fs) / 16000
    x = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return [x[i * fs : (i + 1) * fs].astype(np.float32) for i in range(frames)]


def _run_alone(parts, seed: int, frames: list[np.ndarray], typed: str = "") -> list[list[int]]:
    model, codec = parts
    out = []
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=seed))
        s.type_text(typed)
        for f in frames:
            out.append(eng.step({s: f})[s].tokens_out)
    return out


def test_batched_equals_alone_with_joins_leaves_and_skips(parts) -> None:
    model, codec = parts
    n = 24
    a_in, b_in, c_in = _audio(1, n), _audio(2, n), _audio(3, n)
    ref_a = _run_alone(parts, 11, a_in, typed="hi")
    ref_b = _run_alone(parts, 22, b_in[:10])
    ref_c = _run_alone(parts, 33, c_in[:12])
    got = {"a": [], "b": [], "c": []}
    with Engine(model, codec, slots=3) as eng:
        a = eng.join(SamplingConfig(seed=11))
        a.type_text("hi")
        b = c = None
        bi = ci = 0
        for i in range(n):
            if i == 3:
                b = eng.join(SamplingConfig(seed=22))
            if i == 5:
                c = eng.join(SamplingConfig(seed=33))
            frames = {a: a_in[i]}
            # b streams every other frame (skips in between); c streams until it leaves.
            if b is not None and i % 2 == 1 and bi < 10:
                frames[b] = b_in[bi]
                bi += 1
            if c is not None and ci < 12:
                frames[c] = c_in[ci]
                ci += 1
            res = eng.step(frames)
            got["a"].append(res[a].tokens_out)
            if b in res:
                got["b"].append(res[b].tokens_out)
            if c in res:
                got["c"].append(res[c].tokens_out)
            if c is not None and ci == 12 and c.id in eng.sessions:
                eng.leave(c)
        assert eng.free_slots == 1
    assert got["a"] == ref_a
    assert got["b"] == ref_b
    assert got["c"] == ref_c


def test_batch_is_as_large_as_its_sessions_and_rows_move_on_leave(parts, tmp_path) -> None:
    """The first session leaves while three others stream: they move down a row each and go
    on exactly as alone; a later session joins into the shrunken batch."""
    model, codec = parts
    n = 16
    ins = {k: _audio(10 + k, n) for k in range(5)}
    refs = {k: _run_alone(parts, 40 + k, ins[k][: 6 if k == 0 else n]) for k in range(4)}
    refs[4] = _run_alone(parts, 44, ins[4][:8])
    got: dict[int, list] = {k: [] for k in range(5)}
    with Engine(model, codec, slots=4) as eng:
        assert eng.rows == 1
        live = {k: eng.join(SamplingConfig(seed=40 + k)) for k in range(4)}
        assert eng.rows == 4 and [live[k].slot for k in range(4)] == [0, 1, 2, 3]
        fed = dict.fromkeys(range(5), 0)
        for i in range(n):
            if i == 6:
                eng.leave(live.pop(0))
                assert eng.rows == 3 and [live[k].slot for k in (1, 2, 3)] == [0, 1, 2]
            if i == 8:
                live[4] = eng.join(SamplingConfig(seed=44))
                assert eng.rows == 4 and live[4].slot == 3
            res = eng.step({s: ins[k][fed[k]] for k, s in live.items()})
            for k, s in live.items():
                got[k].append(res[s].tokens_out)
                fed[k] += 1
        # A moved session saves and reloads like any other.
        path = eng.save_session(live[2], tmp_path / "moved.dstate")
        for s in list(live.values()):
            eng.leave(s)
        assert eng.rows == 1 and not eng.sessions
        with pytest.raises(ValueError, match="left"):
            eng.step({live[1]: ins[1][0]})
        again = eng.join(state=path)
        assert again.frame == n
    for k in range(5):
        assert got[k] == refs[k], f"session {k} differs from its solo run"


def test_save_state_then_many_sessions_continue_identically(parts, tmp_path) -> None:
    model, codec = parts
    warm, cont = _audio(4, 15), _audio(5, 10)
    sampling = SamplingConfig(seed=7, text_temperature=1.5, text_top_k=0)
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(sampling)
        for f in warm:
            eng.step({s: f})
        path = eng.save_session(s, tmp_path / "prompt.dstate")
        ref = [(r.tokens_out, r.text, r.user_text) for r in (eng.step({s: f})[s] for f in cont)]
    assert any(text for _, text, _ in ref), "the test needs some text after the save"
    with Engine(model, codec, slots=3) as eng:
        other = eng.join(SamplingConfig(seed=1))
        s1 = eng.join(state=path)
        s2 = eng.join(state=path)
        got1, got2 = [], []
        for f in cont:
            res = eng.step({s1: f, s2: f, other: f})
            got1.append((res[s1].tokens_out, res[s1].text, res[s1].user_text))
            got2.append((res[s2].tokens_out, res[s2].text, res[s2].user_text))
    assert got1 == ref and got2 == ref
    assert s1.frame == 25


def test_state_file_rejections_change_nothing(parts, tmp_path) -> None:
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=7))
        for f in _audio(6, 5):
            eng.step({s: f})
        good = eng.save_session(s, tmp_path / "good")
    corrupt = tmp_path / "corrupt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:1000])
    other_model = load("tiny")
    with torch.no_grad():
        other_model.text_head.weight.add_(0.01)
    with Engine(model, codec, slots=2) as eng:
        s = eng.join(SamplingConfig(seed=3))
        for f in _audio(7, 3):
            eng.step({s: f})
        before = eng.model.get_state()
        for bad in (corrupt, truncated, tmp_path / "missing"):
            with pytest.raises(StateFileError):
                eng.join(state=bad)
        assert len(eng.sessions) == 1
        after = eng.model.get_state()
        for name, st in before.items():
            for k, v in st.tensor_fields():
                assert torch.equal(getattr(after[name], k), v)
    with Engine(other_model, codec, slots=1) as eng, pytest.raises(StateFileError, match="model"):
        eng.join(state=good)


def test_bad_frames_are_clear_errors(parts) -> None:
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        s = eng.join()
        with pytest.raises(ValueError, match="expected 320"):
            eng.step({s: np.zeros(100, np.float32)})
        with pytest.raises(ValueError, match="NaN"):
            eng.step({s: np.full(320, np.nan, np.float32)})
        assert s.frame == 0
        eng.step({s: np.zeros(320, np.float32)})
        assert s.frame == 1


def test_full_engine_refuses_a_session(parts) -> None:
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        eng.join()
        with pytest.raises(RuntimeError, match="busy"):
            eng.join()


def test_codes_in_equals_pcm_in(parts) -> None:
    """A client that runs the codec itself gets exactly what a PCM client gets."""
    model, codec = parts
    frames = _audio(8, 12)
    with Engine(model, codec, slots=2) as eng:
        a = eng.join(SamplingConfig(seed=5))
        b = eng.join(SamplingConfig(seed=5))
        for f in frames:
            ra = eng.step({a: f})[a]
            rb = eng.step({}, codes={b: ra.tokens_in})[b]
            assert rb.tokens_out == ra.tokens_out
            np.testing.assert_array_equal(rb.pcm, ra.pcm)
        with pytest.raises(ValueError, match="expected 8 codes"):
            eng.step({}, codes={a: [1, 2, 3]})
        with pytest.raises(ValueError, match="both"):
            eng.step({a: frames[0]}, codes={a: ra.tokens_in})


def test_sampler_matches_softmax_and_respects_top_k() -> None:
    from duplex.streamer.engine import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, 5, generator=g)
    n = len(logits)
    got = sample(logits, torch.full((n,), 0.7), torch.full((n,), 3, dtype=torch.long), u)
    freq = torch.bincount(got, minlength=5).float() / n
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 0.7, 0)
    assert freq[3:].sum() == 0, "sampled outside the top-k"
    torch.testing.assert_close(freq[:3], want, atol=0.015, rtol=0)
    greedy = sample(logits[:4], torch.zeros(4), torch.zeros(4, dtype=torch.long), u[:4])
    assert greedy.tolist() == [0, 0, 0, 0]
    # top_k <= 0 keeps everything: the least likely entry shows up at temperature 1.
    anyk = sample(logits, torch.ones(n), torch.zeros(n, dtype=torch.long), u)
    assert (anyk == 4).any()


def test_text_decides_pad_apart_at_its_own_temperature() -> None:
    """sample_text: write a byte with the model's own odds (speak temperature 1), whatever the
    byte's temperature; the byte from the bytes alone at that temperature and top-k. The single
    draw at 0.7 would speak far less often than the model's 40%."""
    from duplex.streamer.sampling import sample, sample_text

    pad, n = 4, 40000
    # PAD 0.6 (id 4 here), four bytes 0.4 together, and id 5 near impossible.
    p = torch.tensor([0.16, 0.12, 0.08, 0.04, 0.6, 1e-9])
    logits = p.log().repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    u, decide = torch.rand(n, 6, generator=g), torch.rand(n, generator=g)
    temp, k = torch.full((n,), 0.7), torch.full((n,), 3, dtype=torch.long)
    got = sample_text(logits, pad, temp, k, torch.ones(n), u, decide)
    wrote = got != pad
    assert abs(float(wrote.float().mean()) - 0.4) < 0.01
    old = sample(logits, temp, torch.full((n,), 5, dtype=torch.long), u)
    assert float((old != pad).float().mean()) < 0.3
    # The byte: from the top 3 bytes at the byte temperature, never PAD or beyond k.
    freq = torch.bincount(got[wrote], minlength=6).float() / int(wrote.sum())
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq[:3], torch.softmax(p[:3].log() / 0.7, 0), atol=0.015, rtol=0)
    # Speak temperature 0: write iff writing is more likely than not; cooler, less often.
    assert (sample_text(logits, pad, temp, k, torch.zeros(n), u, decide) == pad).all()
    flip = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 1e-9]).log().repeat(n, 1)
    assert (sample_text(flip, pad, temp, k, torch.zeros(n), u, decide) != pad).all()
    cool = sample_text(logits, pad, temp, k, torch.full((n,), 0.5), u, decide)
    assert 0.05 < float((cool != pad).float().mean()) < 0.35


def test_sessions_decide_pad_apart_unless_saved_before(parts) -> None:
    """A session with a speak temperature draws its text by `sample_text` (one more uniform of
    its own per step); one restored from an older config (None) draws as before, so two of
    those with one seed match token for token whatever their batch-mates do."""
    model, codec = parts
    frames = _audio(6, 20)
    old = SamplingConfig.from_saved(
        {"temperature": 0.8, "top_k": 50, "text_temperature": 0.7, "text_top_k": 25, "seed": 9}
    )
    assert old.speak_temperature is None and SamplingConfig().speak_temperature == 0.7
    calls = []
    with Engine(model, codec, slots=3) as eng:
        import duplex.streamer.engine as E

        inner = E.sample_text

        def spy(*a):
            calls.append(inner(*a))
            return calls[-1]

        drawn = []
        outer = eng._sample

        def spy_sample(stepping, logits):
            out = outer(stepping, logits)
            drawn.append((out[0], [s.id for s in stepping]))
            return out

        E.sample_text, eng._sample = spy, spy_sample
        try:
            a = eng.join(old)
            b = eng.join(SamplingConfig(seed=9))
            c = eng.join(SamplingConfig.from_saved(asdict(old)))
            out = {a: [], b: [], c: []}
            for f in frames:
                res = eng.step({a: f, b: f, c: f})
                for s in out:
                    out[s].append(res[s].tokens_out)
        finally:
            E.sample_text = inner
    # b's text is the two-choice draw, every step; a's and c's are not.
    assert len(calls) == len(drawn) == len(frames)
    for split, (texts, ids) in zip(calls, drawn):
        assert texts[ids.index(b.id)] == split[ids.index(b.id)]
    assert any(
        texts[ids.index(a.id)] != split[ids.index(a.id)]
        for split, (texts, ids) in zip(calls, drawn)
    )
    assert out[a] == out[c]
    assert out[a] != out[b]
    alone = []
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(old)
        for f in frames:
            alone.append(eng.step({s: f})[s].tokens_out)
    assert alone == out[a]


def test_the_transcript_is_greedy_unless_asked_and_per_session(parts) -> None:
    """The user's transcript byte is the argmax of its logits by default (a recognition: a byte
    drawn at random is read back and derails its word); a session asking for a temperature
    draws it, each row of a batch by its own setting."""
    model, codec = parts
    seen = []
    with Engine(model, codec, slots=2) as eng:
        inner = eng._sample

        def spy(stepping, logits):
            texts, audio, users = inner(stepping, logits)
            rows = torch.tensor([s.slot for s in stepping])
            seen.append((logits.user_text[rows].argmax(-1), users, [s.id for s in stepping]))
            return texts, audio, users

        eng._sample = spy
        greedy = eng.join(SamplingConfig(seed=3))
        drawn = eng.join(SamplingConfig(seed=3, transcript_temperature=5.0))
        assert greedy.sampling.transcript_temperature == 0.0
        for f in _audio(4, 30):
            eng.step({greedy: f, drawn: f})
    assert len(seen) == 30
    ids = seen[0][2]
    g, d = ids.index(greedy.id), ids.index(drawn.id)
    assert all(torch.equal(best[g], users[g]) for best, users, _ in seen)
    assert sum(int(best[d] != users[d]) for best, users, _ in seen) >= 10


def test_saved_sampling_without_a_transcript_temperature_keeps_drawing_it() -> None:
    """Configs saved before the transcript had its own temperature drew it at the text's: read
    back, they keep doing so (recordings replay exactly); a bad value is refused."""
    from duplex.streamer.conversation import ConversationConfig
    from duplex.streamer.sampling import check_sampling

    old = {"temperature": 0.8, "top_k": 50, "text_temperature": 0.6, "text_top_k": 25, "seed": 1}
    assert SamplingConfig.from_saved(old).transcript_temperature == 0.6
    assert ConversationConfig(sampling=old).sampling.transcript_temperature == 0.6

    def bad(why: str) -> Exception:
        return ValueError(why)

    assert check_sampling(old, bad).transcript_temperature == 0.6
    assert check_sampling({**old, "transcript_temperature": 0.0}, bad).transcript_temperature == 0
    with pytest.raises(ValueError, match="transcript_temperature"):
        check_sampling({**old, "transcript_temperature": -1}, bad)
    with pytest.raises(ValueError, match="fields"):
        check_sampling({**old, "other": 1}, bad)
