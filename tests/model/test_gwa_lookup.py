"""GWA predicted lookups: the id chain finds exactly the newest earlier occurrences, the layer
with lookup heads streams exactly as it runs in parallel, never sees the future, reads the same
from disk, survives snapshots, and its lookup head is trained by the loss (through log p(key))."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from duplex.model.backbone import Backbone, BackboneConfig
from duplex.model.gwa import GuidedWindowAttention, GWAConfig, GWAReadConfig, History
from duplex.model.gwa_history import KeyFinder
from duplex.model.ngram_index import IdChain
from duplex.model.token_log import TokenLog
from tests.model.test_gwa import small_cfg

VOCAB = 40


def lookup_cfg(layers: tuple[str, ...] = ("gdn", "gwa", "mlp", "gwa", "mlp")) -> BackboneConfig:
    cfg = small_cfg(layers)
    return replace(cfg, read=replace(cfg.read, lookup_keys=3, lookup_per_key=2))


def newest_before(ids: np.ndarray, key: int, t: int, R: int) -> list[int]:
    """The R newest positions p < t with ids[p] == key (brute force), padded with -1."""
    found = [int(p) for p in np.nonzero(ids[:t] == key)[0][::-1][:R]]
    return found + [-1] * (R - len(found))


@pytest.mark.parametrize("spill", [False, True])
def test_id_chain_returns_the_newest_earlier_occurrences(tmp_path, spill):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, size=1500)
    log = TokenLog(np.uint16, 128 if spill else 1 << 20, tmp_path if spill else None)
    chain = IdChain(log, 9, 128 if spill else 1 << 20, tmp_path if spill else None)
    i = 0
    while i < ids.size:
        n = min(int(rng.integers(1, 200)), ids.size - i)
        log.append(ids[i : i + n])
        chain.update()
        ts = np.arange(i, i + n)
        # ids 9 and -1 are outside the vocabulary: never found
        keys = rng.integers(-1, 10, size=(n, 3))
        got = chain.lookup(keys, ts, 3)
        for row, t in enumerate(ts):
            for j, key in enumerate(keys[row]):
                want = newest_before(ids, key, t, 3) if 0 <= key < 9 else [-1] * 3
                assert got[row, j].tolist() == want, (t, key)
        i += n
        if i == 900:
            # a snapshot restore: forget the last ids, append different ones
            log.truncate(700)
            chain.truncate(700)
            ids[700:] = rng.integers(0, 9, size=ids.size - 700)
            i = 700
    assert (log.n_disk > 0) == spill
    with pytest.raises(IndexError):
        chain.lookup(np.zeros((1, 1), dtype=np.int64), np.array([0]), 1)


def stream(model: Backbone, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    outs, i = [], 0
    with model.streaming(ids.shape[0]):
        for c in chunks:
            outs.append(model.step(ids[:, i : i + c]))
            i += c
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 64, [7] * 9 + [1], [64], [5, 1, 13, 2, 43]])
def test_lookup_model_streamed_equals_parallel(chunks):
    torch.manual_seed(0)
    model = Backbone(lookup_cfg()).double().eval()
    # few distinct ids: every key has earlier occurrences, many found in earlier chunks
    ids = torch.randint(0, 12, (2, 64))
    with torch.no_grad():
        full = model(ids)
        got = stream(model, ids, chunks)
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)


def test_lookup_reads_are_causal_and_used():
    torch.manual_seed(1)
    model = Backbone(lookup_cfg()).double().eval()
    ids = torch.randint(0, 12, (3, 50))
    other = ids.clone()
    other[:, 30:] = torch.randint(0, 12, (3, 20))
    with torch.no_grad():
        full = model(ids)
        alt = model(other)
    torch.testing.assert_close(alt[:, :30], full[:, :30], rtol=0, atol=0)
    assert not torch.allclose(alt[:, 30:], full[:, 30:])
    # the looked-up windows change the output (the read is not silently empty)
    calls = []
    original = KeyFinder.find

    def counting(self, keys):
        got = original(self, keys)
        calls.append(int(got["valid"].sum()))
        return got

    KeyFinder.find = counting
    try:
        with torch.no_grad():
            model(ids)
    finally:
        KeyFinder.find = original
    assert len(calls) == 2 and min(calls) > 100


def test_lookup_reads_are_the_same_from_disk(tmp_path):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 12, size=2000)
    base = GWAReadConfig(vocab_size=VOCAB, orders=(4, 2, 1), lookup_keys=2, lookup_per_key=3)
    ram = History(base)
    disk = History(GWAReadConfig(**{**base.__dict__, "ram_tokens": 200}), spill_dir=tmp_path)
    i = 0
    while i < ids.size:
        n = min(int(rng.integers(1, 300)), ids.size - i)
        ram.append(ids[i : i + n])
        disk.append(ids[i : i + n])
        ts = np.arange(i, i + n)[None]
        keys = rng.integers(0, 12, size=(1, n, 2))
        a = KeyFinder(base, [ram], ts).find(keys)
        b = KeyFinder(base, [disk], ts).find(keys)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        # every window slot of a found occurrence holds the log's id, never one past t
        pos = a["anchors"][0][..., None] + base.offsets()
        assert not (a["mask"][0] & (pos > ts[0][:, None, None])).any()
        assert (a["ids"][0][a["mask"][0]] == ids[pos[a["mask"][0]]]).all()
        i += n
    assert disk.log.n_disk > 1500 and disk.occurrences.prev.n_disk > 1500
    # host bytes: + 4 per id for the chain, 4 per vocabulary entry for the heads (int32)
    assert disk.occurrences.nbytes() == 4 * ids.size + 4 * VOCAB


def test_lookup_snapshot_restore_and_exec_mask():
    torch.manual_seed(2)
    model = Backbone(lookup_cfg(("gdn", "gwa", "swa", "gwa", "mlp"))).double().eval()
    ids = torch.randint(0, 12, (2, 40))
    junk = torch.randint(0, 12, (2, 5))
    with torch.no_grad():
        ref = model(ids)
        with model.streaming(2):
            model.step(ids[:, :20])
            snap = model.get_state()
            model.step(junk)
            model.set_state(snap)
            tail = model.step(ids[:, 20:])
            torch.testing.assert_close(tail, ref[:, 20:], rtol=1e-9, atol=1e-9)
            model.set_state(snap)
            model.set_exec_mask(torch.tensor([False, True]))
            model.step(junk)
            model.set_exec_mask(torch.tensor([True, True]))
            tail = model.step(ids[:, 20:])
    torch.testing.assert_close(tail[0], ref[0, 20:], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(tail[1], ref[1, 20:])


def test_lookup_head_is_trained_through_its_keys_log_probability():
    """The loss reaches the lookup head only through log p(key) in the window softmax (the ids
    themselves are a discrete choice): detach it and this gradient is gone."""
    torch.manual_seed(3)
    model = Backbone(lookup_cfg()).double().train()
    ids = torch.randint(0, 12, (2, 48))
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(
        model.logits(out[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    heads = [b.lookup for b in model.blocks if isinstance(b, GuidedWindowAttention)]
    assert len(heads) == 2
    for head in heads:
        g = head.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 1e-8
    # the per-key slot features are trained as well
    for b in model.blocks:
        if isinstance(b, GuidedWindowAttention):
            assert b.lookup_slot.grad.abs().sum() > 0


def test_configs_without_lookups_are_unchanged():
    """No lookup head, no extra parameters, no id chain: old weight files still load."""
    read = GWAReadConfig(vocab_size=VOCAB)
    h = History(read)
    assert h.occurrences is None
    cfg = lookup_cfg()
    cfg.read = read
    names = set(Backbone(cfg).state_dict())
    assert not any("lookup" in n for n in names)
    with pytest.raises(ValueError):
        GWAReadConfig(lookup_keys=2, skip_id=0)


def test_lookup_proposals_in_chunks_equal_one_pass():
    """Inference proposes 1024 positions at a time; the keys and log-probabilities are those of
    one pass over all positions."""
    torch.manual_seed(6)
    cfg = lookup_cfg()
    layer = GuidedWindowAttention(GWAConfig(32, 2, 16), cfg.read).double()
    x = torch.randn(1, 2500, 32, dtype=torch.float64)
    emb = torch.randn(VOCAB, 32, dtype=torch.float64)
    whole = layer._propose(x, emb)
    with torch.no_grad():
        parts = layer.propose(x, emb)
    assert torch.equal(parts[0], whole[0])
    torch.testing.assert_close(parts[1], whole[1].detach(), rtol=0, atol=0)
