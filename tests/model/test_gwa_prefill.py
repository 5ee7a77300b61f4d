"""The bulk (prefill) path of a GWA history equals the step-by-step (decode) path, bit for bit.

A prefill appends a whole chunk at once: the index chains it with one sort, the id chain with
another, and the read of every position is one batched call. A decode step appends one id and
reads it. Sizes are chosen to be awkward: across the index's table doublings (4 entries per
bucket from 4 buckets: 16, 32, 64, ... ids), across the log's RAM buffer spilling to disk at an
odd length, and one id either side of each.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from duplex.model.backbone import Backbone
from duplex.model.gwa_history import GWAReadConfig, History, read_histories

VOCAB = 40
NAMES = ("ids", "mask", "match", "digits", "valid", "anchors")


def awkward_cfg(**kw) -> GWAReadConfig:
    return GWAReadConfig(
        vocab_size=VOCAB,
        orders=(4, 2, 1),
        # Walks long enough never to stop early. With a short walk the read depends on the
        # table size when it was made (a bucket of 4 vs 32 holds different colliders), so one
        # prefill chunk and id-by-id decoding differ where a walk hits its limit: found here
        # at 300 ids of 6 distinct values with max_walk 8 (docs/gwa.md, weak points).
        max_walk=512,
        index_init_bits=2,
        index_max_load=4,
        lookup_keys=2,
        lookup_per_key=3,
        **kw,
    )


def index_state(h: History) -> list[np.ndarray]:
    """Everything the index and id chain hold: tables and every chain link."""
    out = [np.array(h.index.bits)]
    for oi in range(len(h.index.cfg.orders)):
        out.append(h.index.head[oi].astype(np.int64))
        if h.index.prev[oi] is not None:
            out.append(h.index.prev[oi].read(0, h.index.n).astype(np.int64))
    out.append(h.occurrences.head.astype(np.int64))
    out.append(h.occurrences.prev.read(0, h.occurrences.n).astype(np.int64))
    return out


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 64, 65, 129, 300])
def test_bulk_history_equals_one_id_at_a_time(tmp_path, n):
    rng = np.random.default_rng(n)
    # few distinct ids: long chains and repeats of every order
    ids = rng.integers(0, 6, size=n)
    cfg = awkward_cfg(ram_tokens=37)
    bulk = History(cfg, tmp_path / "bulk")
    bulk.append(ids)
    got = read_histories([bulk], np.arange(n)[None])
    keys = rng.integers(0, 8, size=(n, 2))
    found = bulk.occurrences.lookup(keys, np.arange(n), 3)
    step = History(cfg, tmp_path / "step")
    for t in range(n):
        step.append(ids[t : t + 1])
        one = read_histories([step], np.array([[t]]))
        for name in NAMES:
            np.testing.assert_array_equal(one[name][0, 0], got[name][0, t], err_msg=name)
        np.testing.assert_array_equal(step.occurrences.lookup(keys[t : t + 1], [t], 3)[0], found[t])
    for a, b in zip(index_state(bulk), index_state(step), strict=True):
        np.testing.assert_array_equal(a, b)
    assert bulk.log.n_disk == step.log.n_disk == (n // 37) * 37
    # the hashed orders' tables doubled past 16 ids (the awkward part), the same both ways
    assert max(bulk.index.bits) == max(step.index.bits) == bulk.index.bits_for(n)
    assert (bulk.index.bits_for(n) > 2) == (n > 16)


@pytest.mark.parametrize("chunks", [[17, 1, 15, 33, 1, 62], [64, 1, 1, 63], [129]])
def test_any_chunking_of_the_prefill_gives_the_same_reads(chunks):
    rng = np.random.default_rng(len(chunks))
    ids = rng.integers(0, 6, size=sum(chunks))
    cfg = awkward_cfg()
    whole = History(cfg)
    whole.append(ids)
    want = read_histories([whole], np.arange(ids.size)[None])
    h = History(cfg)
    i = 0
    for c in chunks:
        h.append(ids[i : i + c])
        got = read_histories([h], np.arange(i, i + c)[None])
        for name in NAMES:
            np.testing.assert_array_equal(got[name][0], want[name][0, i : i + c], err_msg=name)
        i += c
    for a, b in zip(index_state(whole), index_state(h), strict=True):
        np.testing.assert_array_equal(a, b)


def test_model_prefill_in_one_chunk_equals_decoding_id_by_id():
    """The whole model: one prefill chunk (bulk history, reads in blocks of 7 positions) equals
    stepping one id at a time across the index's table doublings, lookups included."""
    from tests.model.test_gwa import small_cfg

    torch.manual_seed(3)
    cfg = small_cfg(("gdn", "gwa", "mlp", "gwa"))
    cfg.read = dataclasses.replace(awkward_cfg(), win_before=3, win_after=3, orders=(3, 2, 1))
    model = Backbone(cfg).double().eval()
    for block in model.blocks:
        if hasattr(block, "infer_block"):
            block.infer_block = 7
    ids = torch.randint(0, 6, (2, 70))
    with torch.no_grad(), model.streaming(2):
        prefill = model.step(ids)
    with torch.no_grad(), model.streaming(2):
        steps = torch.cat([model.step(ids[:, t : t + 1]) for t in range(ids.shape[1])], dim=1)
        assert max(model.reader._require_streaming().rows[0].history.index.bits) > 2
    torch.testing.assert_close(prefill, steps, rtol=1e-9, atol=1e-9)
