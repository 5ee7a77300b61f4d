"""Recall tasks say what they claim, training batches are deterministic, the suite runs, and the
GWA read can reach every answer at long context (the upper bound the trained model works under)."""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest
import torch

from duplex.apps.cli import main as cli_main
from duplex.model import recall as R
from duplex.model import recall_models as M
from duplex.model import recall_tasks as T
from duplex.model import recall_train as RT
from duplex.model.backbone import Backbone
from duplex.model.gated_deltanet import GatedDeltaNetConfig
from duplex.model.gwa import History


def value_after(ids: np.ndarray, key: np.ndarray, before: int) -> list[int]:
    """Ids that follow each earlier occurrence of `key` (brute force)."""
    L = key.size
    win = np.lib.stride_tricks.sliding_window_view(ids[:before], L)
    starts = np.nonzero((win == key).all(axis=1))[0]
    return [int(ids[p + L]) for p in starts if p + L < before]


def find(ids: np.ndarray, key: np.ndarray) -> list[int]:
    """Start positions of `key` in `ids` (brute force)."""
    win = np.lib.stride_tricks.sliding_window_view(ids, key.size)
    return [int(p) for p in np.nonzero((win == key).all(axis=1))[0]]


@pytest.mark.parametrize("N,key_len", [(2048, 1), (16 * 5000, 2)])
def test_mqar_answers_are_the_stored_values(N, key_len):
    s = T.mqar(N, np.random.default_rng(0))
    assert s.ids.size == N
    assert len(s.items) == min(1024, max(4, min(65536, N // 16)))
    for item in s.items[:200]:
        a = int(item[0])
        key = s.ids[a - key_len : a]
        assert np.all((key >= T.KEY0) & (key < T.KEY0 + T.N_KEY))
        assert value_after(s.ids, key, s.start) == [int(s.ids[a])]


def test_passkey_niah_copy_position_answers():
    rng = np.random.default_rng(1)
    s = T.passkey(1000, rng)
    p = int(np.nonzero(s.ids[: s.start] == T.PASSKEY)[0][0])
    np.testing.assert_array_equal(s.ids[p + 1 : p + 6], s.ids[s.items[0]])
    s = T.niah(3000, rng, asked=3)
    for item in s.items:
        key = s.ids[item[0] - 4 : item[0]]
        p = find(s.ids[: s.start], key)
        assert len(p) >= 1
        np.testing.assert_array_equal(s.ids[p[0] + 4 : p[0] + 12], s.ids[item])
    s = T.copy_task(4000, rng)
    span = s.ids[s.start + 1 :]
    assert span.size == 500 and s.items[0].size == 492
    starts = find(s.ids[: s.start], span[:8])
    assert len(starts) == 1 and s.start - starts[0] >= 2000
    np.testing.assert_array_equal(s.ids[starts[0] : starts[0] + 500], span)
    s = T.position(3000, rng, asked=2, offset=123456)
    for item in s.items:
        digits = {}
        for a in item:
            place = int(s.ids[a - 5]) - T.PLACE0
            digits[place] = int(s.ids[a]) - T.DIGIT0
        key = s.ids[item[0] - 4 : item[0]]
        where = [q + 3 for q in find(s.ids[: s.start], key)]
        value = sum(d * T.POS_BASE**j for j, d in digits.items())
        assert value - 123456 in where


def test_training_batches_are_deterministic_by_row():
    mb = RT.make_batch_fn(256, 8, seed=5)
    full = mb(3, slice(0, 8))
    part = mb(3, slice(4, 8))
    torch.testing.assert_close(full.ids[4:], part.ids)
    assert not torch.equal(mb(4, slice(0, 8)).ids, full.ids)
    assert int((full.where >= 0).sum()) > 8


def test_gwa_read_reaches_every_mqar_answer_at_long_context():
    """For each query the reader offers a window whose id after the anchor is the answer."""
    N = 1 << 18
    s = T.mqar(N, np.random.default_rng(2))
    cfg = M.model_config("recall-gwa").read
    h = History(cfg)
    h.append(s.ids)
    ans = np.array([int(i[0]) for i in s.items])
    r = h.read(ans - 1)
    after = int(np.nonzero(cfg.offsets() == 1)[0][0])
    reach = (r["ids"][:, 1:, after] == s.ids[ans][:, None]) & r["valid"][:, 1:]
    assert reach.any(axis=1).mean() == 1.0
    # ... and the candidate with the longest match is the right one (what the model must learn)
    best = np.argmax(r["match"][:, 1:], axis=1)
    assert reach[np.arange(ans.size), best].mean() > 0.99
    assert h.nbytes() / N < 16


def test_eval_cli_runs_and_reports(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    cfg = M.model_config("recall-gwa")
    M.save_model(Backbone(cfg), path, "tiny")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rc = cli_main(
        [
            "eval",
            "recall",
            "--model",
            str(path),
            "--task",
            "mqar",
            "--context",
            "512",
            "--trials",
            "2",
            "--json",
        ]
    )
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["trials"] == 2 and rep["items"] == 2 * 32
    assert rep["accuracy"] == rep["correct"] / rep["items"]
    assert 0 <= rep["token_accuracy"] <= 1
    # an untrained model is at chance: the suite does not hand out accuracy
    assert rep["accuracy"] < 0.2
    # The fixed state of one stream: per GDN layer, the recurrent state [H, K, V] and the
    # conv history of conv_size - 1 q|k|v inputs, float32; GWA keeps ids, not state.
    H, D = cfg.gdn_heads, cfg.gdn_head_dim
    conv = GatedDeltaNetConfig(d_model=cfg.d_model, n_heads=H, head_dim=D).conv_size
    per_gdn = 4 * (H * D * D + (conv - 1) * 3 * H * D)
    assert rep["state_bytes"] == cfg.layers.count("gdn") * per_gdn
    # The reader's host bytes: at least the 2-byte id per token, plus the index and tables
    # amortised over 512 ids; not kilobytes per token.
    assert 2 <= rep["host_bytes_per_token"] < 1024
    # Speeds a CPU can have (ids per second; milliseconds per id), not zeros or unit slips.
    assert 100 < rep["prefill_tokens_per_s"] < 1e7
    assert 0.01 < rep["decode_ms_per_token"] < 1000
    # The process's peak resident memory, in MB, measured during the run.
    assert rss_before <= rep["peak_rss_mb"] <= rss_after


@pytest.mark.parametrize("task,context,threshold", [("mqar", 4096, 0.99), ("niah", 4096, 0.99)])
def test_shipped_gwa_model_recalls(task, context, threshold):
    """The shipped recall-gwa answers from far back in a context 16x its training length."""
    rep = R.evaluate("recall-gwa", task, context, trials=2, seed=11, asked=4)
    assert rep.items >= 8
    assert rep.accuracy >= threshold, rep


def successors(ids: np.ndarray, x: int) -> list[int]:
    """Ids that follow each occurrence of id x (brute force)."""
    return [int(ids[p + 1]) for p in np.nonzero(ids[:-1] == x)[0]]


def fact_after(ctx: np.ndarray, x: int) -> int:
    """The second id of the one fact "x y" in ctx (facts end where filler begins)."""
    ys = [y for y in successors(ctx, x) if y < T.FILL0]
    assert len(ys) == 1, (x, ys)
    return ys[0]


@pytest.mark.parametrize("n_hops", [2, 3])
@pytest.mark.parametrize("N", [256, 8192])
def test_hop_answers_follow_the_chain_not_the_last_occurrence(n_hops, N):
    s = T.hops(N, np.random.default_rng(n_hops), n_hops=n_hops)
    ctx = s.ids[: s.start]
    assert s.ids.size == N and len(s.items) >= 4
    facts_first = 0
    for item in s.items:
        a = int(item[0])
        assert s.ids[a - 2] == (T.HOP2 if n_hops == 2 else T.HOP3)
        x = int(s.ids[a - 1])
        first = fact_after(ctx, x)
        for _ in range(n_hops):
            x = fact_after(ctx, x)
        # the answer is the chain's end, a value; what follows the cue is a key, never it
        assert x == int(s.ids[a]) and T.VAL0 <= x < T.FILL0
        assert first != x and T.KEY0 <= first < T.VAL0
        # the later link sometimes comes first in the sequence (facts are shuffled)
        b = int(s.ids[a - 1])
        pos_ab = int(np.nonzero(ctx == b)[0][0])
        pos_b = np.nonzero(ctx == first)[0]
        facts_first += int(pos_b.min() < pos_ab)
    assert 0 < facts_first < len(s.items) or N == 256


def test_alias_answer_is_reached_through_the_declared_name():
    s = T.alias(4096, np.random.default_rng(3))
    ctx = s.ids[: s.start]
    for item in s.items:
        a = int(item[0])
        assert s.ids[a - 2] == T.QUERY
        x = int(s.ids[a - 1])
        # x occurs once, in "ALIAS x name"; what follows it is the name, not the answer
        (p,) = np.nonzero(ctx == x)[0]
        assert ctx[p - 1] == T.ALIAS
        name = int(ctx[p + 1])
        assert T.KEY0 <= name < T.VAL0
        assert fact_after(ctx, name) == int(s.ids[a])


def test_update_answer_is_the_newest_assignment():
    s = T.update(4096, np.random.default_rng(4))
    ctx = s.ids[: s.start]
    for item in s.items:
        a = int(item[0])
        key = s.ids[a - 1 : a]
        vals = value_after(s.ids, key, s.start)
        assert 2 <= len(vals) <= 3 and len(set(vals)) == len(vals)
        assert vals[-1] == int(s.ids[a]) and vals[0] != int(s.ids[a])
    assert ctx.size == s.start


@pytest.mark.parametrize("task", ["hop2", "hop3", "alias", "update"])
def test_new_tasks_run_at_eval_lengths(task):
    for N in (1024, 65536):
        s = T.make_task(task, N, np.random.default_rng(5))
        assert s.ids.size == N and s.ids.min() >= 0 and s.ids.max() < T.VOCAB
        assert all(int(i[0]) > s.start for i in s.items)


@pytest.mark.parametrize("mix", T.MIXES)
def test_training_mixtures_give_scorable_batches(mix):
    mb = RT.make_batch_fn(256, 6, seed=1, mix=mix, steps=100)
    for step in (0, 99):
        b = mb(step, slice(0, 6))
        assert b.ids.shape == (6, 256) and int(b.ids.max()) < T.VOCAB
        w = b.where[b.where >= 0]
        assert w.numel() > 6 and int(w.min()) >= 1
        rows = torch.nonzero(b.where >= 0)[:, 0]
        assert torch.equal(b.ids[rows, w], b.targets[b.where >= 0])


def test_curriculum_vocabulary_grows_with_progress():
    def values(progress: float) -> set[int]:
        got = set()
        for r in range(40):
            s = T.training_sample(256, np.random.default_rng(r), "mqar-curriculum", progress)
            got |= {int(s.ids[i[0]]) for i in s.items}
        return got

    early, late = values(0.0), values(1.0)
    assert max(early) < T.VAL0 + 16 and len(early) <= 16
    assert len(late) > 200


def test_lookup_model_trains_a_step():
    """recall-gwa-lookup builds, and one suite batch gives a finite loss and gradients in every
    lookup head."""
    torch.manual_seed(0)
    model = Backbone(M.model_config("recall-gwa-lookup"))
    batch = RT.make_batch_fn(256, 2, seed=0, mix="suite")(0, slice(0, 2))
    loss, info = RT.recall_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= info["acc"] <= 1
    heads = [b.lookup for b in model.blocks if getattr(b, "lookup", None) is not None]
    assert len(heads) == 3 and all(h.weight.grad.abs().sum() > 0 for h in heads)


@pytest.mark.parametrize("task", ["hop2", "hop3", "alias"])
def test_lookup_read_reaches_every_chained_answer_when_asked_the_right_key(task):
    """The upper bound recall-gwa-lookup trains under: at 64K ids, the suffix read of the cue
    offers the first link, and a lookup of each next link's id offers a window whose id after
    the anchor is the next link (the last one: the answer). Keys found by brute force here; the
    model must learn to propose them."""
    from duplex.model.gwa_history import KeyFinder

    N = 1 << 16
    s = T.make_task(task, N, np.random.default_rng(7))
    cfg = M.model_config("recall-gwa-lookup").read
    h = History(cfg)
    h.append(s.ids)
    ctx = s.ids[: s.start]
    after = int(np.nonzero(cfg.offsets() == 1)[0][0])
    ans = np.array([int(i[0]) for i in s.items])
    # first hop: the suffix read at the cue (the id before the answer)
    r = h.read(ans - 1)
    first = np.array([fact_after(ctx, int(x)) for x in s.ids[ans - 1]])
    offered = (r["ids"][:, 1:, after] == first[:, None]) & r["valid"][:, 1:]
    assert offered.any(axis=1).all()
    # later hops: a lookup of the id the previous hop found
    link = first
    for _ in range(int(task[-1]) - 1 if task.startswith("hop") else 1):
        nxt = np.array([fact_after(ctx, int(x)) for x in link])
        keys = np.stack([link, np.zeros_like(link)], axis=1)[None]
        got = KeyFinder(cfg, [h], (ans - 1)[None]).find(keys)
        hit = (got["ids"][0, :, :, after] == nxt[:, None]) & got["valid"][0]
        assert hit.any(axis=1).all()
        link = nxt
    np.testing.assert_array_equal(link, s.ids[ans])


def test_warm_started_lookup_head_proposes_the_first_link():
    """The cold start of predicted lookups: recall-gwa-lookup warm-started from the shipped
    recall-gwa (its first four blocks) proposes, with its second read's identity-initialised
    lookup head and no training, the first link b of a hop2 chain among its top 2 keys at the
    cue, so the lookup of b (whose window holds the answer) is offered from the first step.
    The first read's head, before any read, does not."""
    torch.manual_seed(0)
    model = Backbone(M.model_config("recall-gwa-lookup")).eval()
    assert len(RT.warm_start(model, M.load_recall("recall-gwa"))) > 30
    proposed: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        if getattr(block, "lookup", None) is not None:
            orig = block.propose

            def spy(x, emb, i=i, orig=orig):
                out = orig(x, emb)
                proposed[i] = out[0][0]
                return out

            block.propose = spy
    s = T.make_task("hop2", 1024, np.random.default_rng([9, 0]))
    ctx = s.ids[: s.start]
    with torch.no_grad():
        model(torch.from_numpy(s.ids[None]))
    hits = {i: 0 for i in proposed}
    for item in s.items:
        a = int(item[0])
        b = fact_after(ctx, int(s.ids[a - 1]))
        for i, ids in proposed.items():
            hits[i] += int(b in ids[a - 1].tolist())
    first, second = sorted(hits)[:2]
    assert hits[second] >= 0.9 * len(s.items) and hits[first] <= 0.1 * len(s.items)
