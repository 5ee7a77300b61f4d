"""GWA: the streaming form equals the parallel form, reads are causal, and the read is exact.

Every streaming module is checked two ways: streamed in chunks equals offline (several chunk
sizes), and prefix causality (outputs for a prefix do not depend on what follows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex.model.backbone import Backbone, BackboneConfig
from duplex.model.gwa import GWAReadConfig, History, read_histories

VOCAB = 40


def small_cfg(layers: tuple[str, ...]) -> BackboneConfig:
    read = GWAReadConfig(orders=(3, 2, 1), per_order=2, max_walk=64, win_before=3, win_after=3)
    return BackboneConfig(
        vocab_size=VOCAB,
        d_model=32,
        layers=layers,
        gdn_heads=2,
        gdn_head_dim=16,
        gwa_heads=2,
        gwa_head_dim=16,
        attn_heads=2,
        attn_head_dim=16,
        swa_window=8,
        read=read,
    )


def stream(model: Backbone, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    outs = []
    with model.streaming(ids.shape[0]):
        i = 0
        for c in chunks:
            outs.append(model.step(ids[:, i : i + c]))
            i += c
    return torch.cat(outs, dim=1)


def chunking(T: int, size: int) -> list[int]:
    return [min(size, T - i) for i in range(0, T, size)]


@pytest.mark.parametrize("layers", [("gwa", "mlp"), ("gdn", "mlp", "gwa", "mlp", "swa")])
@pytest.mark.parametrize("size", [1, 7, 64])
def test_streamed_equals_parallel(layers, size):
    torch.manual_seed(0)
    model = Backbone(small_cfg(layers)).double().eval()
    ids = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        full = model(ids)
        got = stream(model, ids, chunking(64, size))
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)


def test_uneven_chunks_and_prefix_causality():
    torch.manual_seed(1)
    model = Backbone(small_cfg(("gdn", "gwa", "mlp", "swa"))).double().eval()
    ids = torch.randint(0, VOCAB, (3, 50))
    other = ids.clone()
    other[:, 30:] = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        full = model(ids)
        got = stream(model, ids, [5, 1, 13, 2, 29])
        alt = model(other)
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(alt[:, :30], full[:, :30], rtol=0, atol=0)
    assert not torch.allclose(alt[:, 30:], full[:, 30:])


def test_reads_never_see_the_future():
    cfg = GWAReadConfig(vocab_size=VOCAB, orders=(2, 1), win_before=3, win_after=5)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=200)
    h = History(cfg)
    h.append(ids)
    r = h.read(np.arange(200))
    assert r["valid"][:, 1:].sum() > 100
    offs = cfg.offsets()
    for t in range(200):
        for j in range(cfg.n_candidates):
            if not r["valid"][t, j]:
                assert not r["mask"][t, j].any()
                continue
            a = r["anchors"][t, j]
            assert (a == t) if j == 0 else (a < t)
            for w, o in enumerate(offs):
                p = a + o
                assert r["mask"][t, j, w] == (0 <= p <= t)
                if r["mask"][t, j, w]:
                    assert r["ids"][t, j, w] == ids[p]
    # reading a prefix gives the same windows: nothing depends on ids after t
    h2 = History(cfg)
    h2.append(ids[:120])
    r2 = h2.read(np.arange(120))
    for name in ("ids", "mask", "match", "valid", "anchors"):
        np.testing.assert_array_equal(r2[name], r[name][:120])


def test_candidates_are_earlier_occurrences_with_windows_from_the_log():
    cfg = GWAReadConfig(vocab_size=100, orders=(2,), per_order=1, win_before=1, win_after=2)
    # ... 7 8 9 ... 7 8 -> the read of the second "8" must point at the first "8" (position 1)
    ids = np.array([7, 8, 9, 50, 51, 52, 7, 8])
    h = History(cfg)
    h.append(ids)
    r = h.read(np.array([7]))
    assert r["valid"][0, 1]
    # window around anchor 1: offsets 0, +1, +2 -> ids 8, 9, 50
    np.testing.assert_array_equal(r["ids"][0, 1], [8, 9, 50])
    assert r["match"][0, 1] == 2
    # the local slot reads only up to t: offsets +1, +2 are masked
    np.testing.assert_array_equal(r["mask"][0, 0], [True, False, False])


@pytest.mark.parametrize("skip", [False, True])
def test_exec_mask_and_snapshot_restore(skip):
    torch.manual_seed(2)
    layers = ("gdn", "gwa", "swa", "mlp")
    model = Backbone(skip_cfg(layers) if skip else small_cfg(layers)).double().eval()
    ids = sparse_ids(2, 40, seed=5) if skip else torch.randint(0, VOCAB, (2, 40))
    junk = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        ref = model(ids)
        with model.streaming(2):
            model.step(ids[:, :20])
            snap = model.get_state()
            # Row 1 is masked for the junk: it must come out of it untouched (no restore), so
            # its continuation with the true tail matches the offline run; row 0 stepped the
            # junk and does not.
            model.set_exec_mask(torch.tensor([True, False]))
            model.step(junk)
            model.set_exec_mask(torch.tensor([True, True]))
            tail = model.step(ids[:, 20:])
            torch.testing.assert_close(tail[1], ref[1, 20:], rtol=1e-9, atol=1e-9)
            assert not torch.allclose(tail[0], ref[0, 20:])
            # The same with the mask on row 0 instead: now row 0 matches.
            model.set_state(snap)
            model.set_exec_mask(torch.tensor([False, True]))
            model.step(junk)
            model.set_exec_mask(torch.tensor([True, True]))
            tail = model.step(ids[:, 20:])
            torch.testing.assert_close(tail[0], ref[0, 20:], rtol=1e-9, atol=1e-9)
            assert not torch.allclose(tail[1], ref[1, 20:])
            # Restoring the snapshot undoes the junk for both rows.
            model.set_state(snap)
            tail = model.step(ids[:, 20:])
            torch.testing.assert_close(tail, ref[:, 20:], rtol=1e-9, atol=1e-9)
            model.set_state(snap)
            model.set_exec_mask(torch.tensor([False, True]))
            model.step(junk)
            model.set_exec_mask(torch.tensor([True, True]))
            model.reset_rows(torch.tensor([True, False]))
            tail1 = model.step(ids[1:2].expand(2, -1)[:, 20:])
    torch.testing.assert_close(tail1[0], model(ids[1:2, 20:])[0], rtol=1e-9, atol=1e-9)


def test_masked_rows_leave_the_gwa_history_untouched():
    """The GWA layer alone: a masked row appends nothing to its history and its reads go on
    exactly as if the masked step never happened."""
    torch.manual_seed(3)
    model = Backbone(small_cfg(("gwa", "mlp"))).double().eval()
    ids = torch.randint(0, VOCAB, (2, 40))
    junk = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        ref = model(ids)
        with model.streaming(2):
            model.step(ids[:, :25])
            model.set_exec_mask(torch.tensor([False, True]))
            model.step(junk)
            model.set_exec_mask(torch.tensor([True, True]))
            tail = model.step(ids[:, 25:])
    torch.testing.assert_close(tail[0], ref[0, 25:], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(tail[1], ref[1, 25:])


def test_factored_attend_equals_summed_keys():
    from duplex.kernels.gwa import window_attend, window_attend_factored

    torch.manual_seed(4)
    B, T, k, W, H, D = 2, 5, 3, 4, 2, 8
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    tok_k, tok_v = (torch.randn(B, T, k, W, H, D, dtype=torch.float64) for _ in range(2))
    rel_k, rel_v = (torch.randn(W, H, D, dtype=torch.float64) for _ in range(2))
    meta_k, meta_v = (torch.randn(B, T, k, H, D, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, T, k, W) > 0.3
    mask[0, 0] = False
    nk, nv = torch.randn(H, D, dtype=torch.float64), torch.randn(H, D, dtype=torch.float64)
    got = window_attend_factored(q, tok_k, tok_v, rel_k, rel_v, meta_k, meta_v, mask, nk, nv)
    keys = (tok_k + rel_k[None, None, None] + meta_k[:, :, :, None]).reshape(B, T, k * W, H, D)
    vals = (tok_v + rel_v[None, None, None] + meta_v[:, :, :, None]).reshape(B, T, k * W, H, D)
    want = window_attend(q, keys, vals, mask.reshape(B, T, k * W), nk, nv)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a fully masked position reads only the null slot
    torch.testing.assert_close(got[0, 0], nv.expand(H, D), rtol=1e-12, atol=1e-12)


def test_table_attend_equals_summed_keys():
    """The read's op, with tokens, slots, matched lengths and digits as tables picked by index,
    equals plain attention over the keys and values summed slot by slot."""
    from duplex.kernels.gwa import window_attend, window_attend_tables

    torch.manual_seed(4)
    B, T, k, W, H, D, N, M, P, base = 2, 5, 3, 4, 2, 8, 11, 5, 3, 4
    f64 = {"dtype": torch.float64}
    q = torch.randn(B, T, H, D, **f64)
    ids = torch.randint(0, N, (B, T, k, W))
    match = torch.randint(0, M, (B, T, k))
    digits = torch.randint(0, base, (B, T, k, P))
    tok_k, tok_v = (torch.randn(H, N, D, **f64) for _ in range(2))
    rel_k, rel_v = (torch.randn(W, H, D, **f64) for _ in range(2))
    slot_k, slot_v = (torch.randn(k, H, D, **f64) for _ in range(2))
    match_k, match_v = (torch.randn(M, H, D, **f64) for _ in range(2))
    dig_k, dig_v = (torch.randn(P, base, H, D, **f64) for _ in range(2))
    mask = torch.rand(B, T, k, W) > 0.3
    valid = torch.rand(B, T, k) > 0.2
    valid[0, 0] = False
    bias = torch.randn(B, T, k, **f64)
    nk, nv = torch.randn(H, D, **f64), torch.randn(H, D, **f64)
    got = window_attend_tables(
        q, ids, tok_k, tok_v, rel_k, rel_v, mask, valid, slot_k, slot_v, match_k, match_v,
        match, dig_k, dig_v, digits, nk, nv, bias,
    )  # fmt: skip
    # the reference: every slot's key and value summed from its parts, one loop per slot
    S = k * (W + P)
    keys = torch.zeros(B, T, S, H, D, **f64)
    vals = torch.zeros(B, T, S, H, D, **f64)
    readable = torch.zeros(B, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for j in range(k):
                cand_k = slot_k[j] + match_k[match[b, t, j]]
                cand_v = slot_v[j] + match_v[match[b, t, j]]
                for o in range(W):
                    s = j * (W + P) + o
                    keys[b, t, s] = tok_k[:, ids[b, t, j, o]] + rel_k[o] + cand_k
                    vals[b, t, s] = tok_v[:, ids[b, t, j, o]] + rel_v[o] + cand_v
                    readable[b, t, s] = mask[b, t, j, o] and valid[b, t, j]
                for p in range(P):
                    s = j * (W + P) + W + p
                    keys[b, t, s] = dig_k[p, digits[b, t, j, p]] + cand_k
                    vals[b, t, s] = dig_v[p, digits[b, t, j, p]] + cand_v
                    readable[b, t, s] = valid[b, t, j]
    # the bias enters as a key component along q: q·(b q / (|q|² scale)) · scale = b
    scale = D**-0.5
    slot_bias = bias.repeat_interleave(W + P, dim=2)[..., None, None]
    keys = keys + slot_bias * q[:, :, None] / (q * q).sum(-1, keepdim=True)[:, :, None] / scale
    want = window_attend(q, keys, vals, readable, nk, nv)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a position with no valid candidate reads only the null slot
    torch.testing.assert_close(got[0, 0], nv, rtol=1e-12, atol=1e-12)


def test_prefill_read_in_blocks_equals_one_block():
    """Without gradients the layer reads a prefill chunk a block of positions at a time; the
    outputs are those of one block, at block sizes that do not divide the chunk."""
    torch.manual_seed(8)
    model = Backbone(small_cfg(("gdn", "gwa", "mlp"))).double().eval()
    ids = torch.randint(0, VOCAB, (2, 61))
    layer = model.blocks[1]
    with torch.no_grad():
        layer.infer_block = 1 << 20
        whole = model(ids)
        for block in (1, 7, 60):
            layer.infer_block = block
            torch.testing.assert_close(model(ids), whole, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(stream(model, ids, [13, 1, 47]), whole, rtol=1e-9, atol=1e-9)
    del layer.infer_block
    assert layer.infer_block == type(layer).infer_block


def test_reads_are_the_same_when_the_history_spills_to_disk(tmp_path):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 12, size=3000)
    base = GWAReadConfig(vocab_size=VOCAB, orders=(4, 2, 1), max_walk=64)
    ram = History(base)
    disk = History(GWAReadConfig(**{**base.__dict__, "ram_tokens": 256}), spill_dir=tmp_path)
    i = 0
    while i < ids.size:
        n = min(int(rng.integers(1, 400)), ids.size - i)
        ram.append(ids[i : i + n])
        disk.append(ids[i : i + n])
        a, b = ram.read(np.arange(i, i + n)), disk.read(np.arange(i, i + n))
        for name in ("ids", "mask", "match", "digits", "valid", "anchors"):
            np.testing.assert_array_equal(a[name], b[name])
        i += n
    assert disk.log.n_disk > 2000 and ram.log.n_disk == 0


def match_by_loop(ids: np.ndarray, t: int, anchor: int, max_match: int) -> int:
    """The matched suffix length, one id at a time (what the vectorised read must count)."""
    n = 0
    while n < max_match and anchor - n >= 0 and t - n >= 0 and ids[anchor - n] == ids[t - n]:
        n += 1
    return n


@pytest.mark.parametrize("spill", [False, True])
def test_match_and_candidates_equal_a_plain_loop(tmp_path, spill):
    rng = np.random.default_rng(6)
    # few distinct ids and long repeats, so matches run up to (and past) max_match
    ids = np.concatenate([rng.integers(0, 3, 300), np.tile(rng.integers(0, 3, 9), 20)])
    cfg = GWAReadConfig(vocab_size=VOCAB, orders=(3, 2, 1), max_match=6, max_walk=16)
    if spill:
        cfg = GWAReadConfig(**{**cfg.__dict__, "ram_tokens": 64})
    h = History(cfg, tmp_path if spill else None)
    i = 0
    while i < ids.size:
        n = min(int(rng.integers(1, 40)), ids.size - i)
        h.append(ids[i : i + n])
        r = h.read(np.arange(i, i + n))
        for row, t in enumerate(range(i, i + n)):
            anchors = r["anchors"][row]
            for j, a in enumerate(anchors):
                want = 0 if j == 0 or a < 0 else match_by_loop(ids, t, a, cfg.max_match)
                assert r["match"][row, j] == want
            # a candidate slot never repeats an earlier candidate's anchor
            kept = anchors[1:][anchors[1:] >= 0]
            assert np.unique(kept).size == kept.size
        i += n
    assert (h.log.n_disk > 0) == spill
    assert r["match"].max() == cfg.max_match


def test_batched_read_of_several_streams_equals_each_read():
    rng = np.random.default_rng(7)
    cfg = GWAReadConfig(vocab_size=VOCAB, orders=(4, 2, 1), max_walk=16)
    histories = []
    for b in range(3):
        h = History(cfg)
        h.offset = 1000 * b
        h.append(rng.integers(0, 4 + 3 * b, 50 + 20 * b))
        histories.append(h)
    ts = np.array([[len(h) - 3, len(h) - 2, len(h) - 1] for h in histories])
    got = read_histories(histories, ts)
    for b, h in enumerate(histories):
        one = h.read(ts[b])
        for name, v in one.items():
            np.testing.assert_array_equal(got[name][b], v)


def skip_cfg(layers: tuple[str, ...]) -> BackboneConfig:
    cfg = small_cfg(layers)
    cfg.read.skip_id = 0
    return cfg


def sparse_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Mostly the skipped id 0, as a 50 Hz text stream is mostly PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 6, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < 0.7] = 0
    ids[:, :3] = 0
    return ids


@pytest.mark.parametrize("size", [1, 5, 64])
def test_skipping_reader_streamed_equals_parallel(size):
    torch.manual_seed(0)
    model = Backbone(skip_cfg(("gdn", "gwa", "mlp"))).double().eval()
    ids = sparse_ids(2, 64)
    with torch.no_grad():
        full = model(ids)
        got = stream(model, ids, chunking(64, size))
        prefix = model(ids[:, :23])
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(prefix, full[:, :23], rtol=1e-9, atol=1e-9)


def test_skipped_ids_never_enter_the_windows():
    from duplex.model.gwa import WindowReader

    cfg = skip_cfg(("gwa",)).read
    reader = WindowReader(cfg)
    ids = sparse_ids(1, 80, seed=3)
    read = reader.parallel(ids)
    text = ids[0][ids[0] != 0]
    # Every readable window slot holds a stored (non-skipped) id.
    assert bool((read.ids[read.mask] != 0).all())
    # A step on a skipped id reads exactly what the newest stored id read.
    t = int(torch.nonzero(ids[0] != 0)[-1])
    for u in range(t + 1, 80):
        assert torch.equal(read.ids[0, u], read.ids[0, t])
    # The local window at the last stored id is the last W stored ids (not frames).
    local = read.ids[0, t, 0][read.mask[0, t, 0]]
    assert torch.equal(local, text[-len(local) :])
    assert len(local) == cfg.win_before
    # Before any stored id there is nothing to read.
    assert not bool(read.valid[0, :3].any())


def test_a_history_extended_without_steps_reads_as_one_stepped():
    """`extend_history` (how `bench engine` grows a log to an hour) leaves a stream reading
    what it would have read had the ids been stepped: skipped ids left out, and a step on a
    skipped id right after reads the newest extended id (it crashed the bench before)."""
    from duplex.model.gwa import WindowReader

    cfg = skip_cfg(("gwa",)).read
    ids = sparse_ids(1, 90, seed=5)
    ids[0, 60:63] = 0
    stepped, extended = WindowReader(cfg), WindowReader(cfg)
    with stepped.streaming(1), extended.streaming(1):
        stepped.step(ids[:, :30])
        extended.step(ids[:, :30])
        stepped.step(ids[:, 30:60])
        extended.extend_history(0, ids[0, 30:60].numpy())
        assert extended.lengths() == stepped.lengths()
        for t in range(60, 90):
            a, b = stepped.step(ids[:, t : t + 1]), extended.step(ids[:, t : t + 1])
            for name in ("ids", "mask", "match", "digits", "valid"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (t, name)


def test_skipping_reader_state_saved_and_loaded():
    """A state saved mid-stream (after a skipped id) and loaded into a fresh stream continues
    exactly as the stream it came from."""
    torch.manual_seed(4)
    model = Backbone(skip_cfg(("gdn", "gwa", "mlp"))).double().eval()
    ids = sparse_ids(1, 50, seed=7)
    ids[0, 29] = 0
    with torch.no_grad():
        ref = model(ids)
        with model.streaming(1):
            model.step(ids[:, :30])
            tensors, plain = model.save_rows(torch.tensor([0]))
        with model.streaming(1):
            model.load_rows(torch.tensor([0]), tensors, plain)
            tail = model.step(ids[:, 30:])
    torch.testing.assert_close(tail, ref[:, 30:], rtol=1e-9, atol=1e-9)


def test_key_modulo_matches_by_key_and_windows_keep_the_side_feature():
    """Ids key + 10 * speaker: places are found as if the speaker were not there (same anchors
    and match lengths as a plain reader of the keys), and the windows hold the full ids."""
    rng = np.random.default_rng(8)
    keys = np.concatenate([rng.integers(0, 4, 200), np.tile(rng.integers(0, 4, 7), 10)])
    ids = keys + 10 * rng.integers(0, 2, keys.size)
    base = dict(vocab_size=VOCAB, orders=(3, 2, 1), max_walk=16)
    side = History(GWAReadConfig(**base, key_modulo=10))
    plain = History(GWAReadConfig(**base))
    side.append(ids)
    plain.append(keys)
    ts = np.arange(ids.size)
    a, b = side.read(ts), plain.read(ts)
    assert np.array_equal(a["anchors"], b["anchors"])
    assert np.array_equal(a["match"], b["match"])
    assert np.array_equal(a["ids"] % 10, b["ids"])
    assert np.array_equal(a["ids"][a["mask"]] >= 10, (a["ids"] // 10)[a["mask"]] == 1)
    assert (a["ids"][a["mask"]] >= 10).any()
    # Without the modulo the speaker splits the matches: some anchors differ.
    split = History(GWAReadConfig(**base))
    split.append(ids)
    assert not np.array_equal(split.read(ts)["anchors"], b["anchors"])
