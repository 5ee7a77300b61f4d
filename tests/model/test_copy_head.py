"""The copy head: a pointer over recent text frames proposing the byte that followed each."""

from __future__ import annotations

import pytest
import torch

from duplex.model.copy_head import CopyHead, Pointer

D, V, SKIP = 24, 50, 0
FLAGS = [{}, {"pointer_gate": True}, {"user_only": True}]


def head(
    window: int = 5, gate: float = 0.0, pointer_gate: bool = False, user_only: bool = False
) -> CopyHead:
    torch.manual_seed(0)
    m = CopyHead(D, 8, window, V, SKIP, pointer_gate=pointer_gate, user_only=user_only).double()
    torch.nn.init.normal_(m.gate.weight, std=0.3)
    torch.nn.init.constant_(m.gate.bias, gate)
    if pointer_gate:
        torch.nn.init.normal_(m.gate_in.weight, std=2.0)
    return m


def inputs(B: int = 2, T: int = 40, p_text: float = 0.5, seed: int = 1):
    """Hidden states, merged ids (some offset by V like a user's byte), text-head logits."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 2 * V, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) >= p_text] = SKIP
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    return h, ids, logits


def naive(m: CopyHead, h: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Frame by frame: the text frames seen so far, all but the newest are candidates (the
    newest `window` of them), each proposing the byte of the text frame after it; PAD (0, the
    skip id) keeps the text head's probability, the bytes share the rest. A pointer gate adds
    to the gate's logit what the pointer offers: its peak, its share on user bytes (ids >= V)
    and their product. A user-only pointer's candidates are those followed by a user byte."""
    B, T, _ = h.shape
    out = torch.zeros_like(logits)
    for b in range(B):
        texts: list[int] = []
        for t in range(T):
            if ids[b, t] != SKIP:
                texts.append(t)
            cand = texts[:-1][-m.window :]
            if m.user_only:
                cand = [j for j in cand if ids[b, texts[texts.index(j) + 1]] >= V]
            p = logits[b, t].softmax(-1)
            if cand:
                k = m.k(h[b, cand]) + m.key_byte(ids[b, cand] % V)
                a = (k @ m.q(h[b, t]) / m.key_dim**0.5).softmax(-1)
                copy = torch.zeros(V, dtype=h.dtype)
                user = torch.zeros((), dtype=h.dtype)
                for i, j in enumerate(cand):
                    nxt = texts[texts.index(j) + 1]
                    copy[ids[b, nxt] % V] += a[i]
                    user = user + a[i] * (ids[b, nxt] >= V)
                logit = m.gate(h[b, t])[0]
                if m.gate_in is not None:
                    w = m.gate_in.weight[0]
                    peak = copy.max()
                    logit = logit + w[0] * peak + w[1] * user + w[2] * peak * user
                g = torch.sigmoid(logit)
                p = torch.cat([p[:1], (1 - g) * p[1:] + g * (1 - p[0]) * copy[1:]])
            out[b, t] = p.clamp_min(1e-300).log()
    return out


@pytest.mark.parametrize("flags", FLAGS)
def test_parallel_equals_the_naive_definition(flags):
    m = head(**flags)
    h, ids, logits = inputs()
    got = m(h, ids, logits)
    torch.testing.assert_close(got.exp(), naive(m, h, ids, logits).exp())
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2, 40, dtype=torch.float64))


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("chunks", [[1] * 40, [7] * 5 + [5], [3, 11, 1, 19, 6]])
def test_streamed_equals_parallel(chunks, flags):
    m = head(**flags)
    h, ids, logits = inputs()
    full = m(h, ids, logits)
    outs, t = [], 0
    with m.streaming(2):
        for n in chunks:
            outs.append(m(h[:, t : t + n], ids[:, t : t + n], logits[:, t : t + n]))
            t += n
    torch.testing.assert_close(torch.cat(outs, 1), full)


@pytest.mark.parametrize("flags", FLAGS)
def test_a_prefix_gives_a_prefix(flags):
    m = head(**flags)
    h, ids, logits = inputs()
    torch.testing.assert_close(m(h[:, :17], ids[:, :17], logits[:, :17]), m(h, ids, logits)[:, :17])


def test_it_copies_the_byte_after_a_matching_one():
    """Keys that are only their byte, a query that asks for the current byte and an open gate:
    after "...a b c ... a" the next byte is "b", whatever the text logits say."""
    m = head(window=16, gate=20.0)
    with torch.no_grad():
        m.k.weight.zero_()
        m.q.weight.zero_()
        m.gate.weight.zero_()
        m.key_byte.weight.copy_(torch.eye(V, 8, dtype=torch.float64) * 0)
    seq = [7, 8, 9, 11, 12, 7]
    T = len(seq)
    ids = torch.tensor([seq])
    # The query is the embedding of the frame's own byte, scaled: it matches earlier 7s only.
    emb = torch.randn(V, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.key_byte.weight.copy_(emb)
    h = torch.zeros(1, T, D, dtype=torch.float64)
    h[0, :, :8] = emb[ids[0]] * 30.0
    with torch.no_grad():
        m.q.weight[:, :8] = torch.eye(8, dtype=torch.float64)
    logits = torch.zeros(1, T, V, dtype=torch.float64)
    logits[..., 40] = 10.0
    logits[..., SKIP] = 10.0
    out = m(h, ids, logits)
    # Writing now or not stays the text head's choice (PAD 0.5); the byte written is copied.
    torch.testing.assert_close(out[0, -1, SKIP], logits[0, -1].log_softmax(-1)[SKIP])
    assert out[0, -1][1:].argmax() + 1 == 8
    assert out[0, -1].exp()[8] > 0.49
    # The user's bytes (offset by the vocabulary in the log) are copied as bytes, and the
    # pointer says whose bytes it offers.
    user_ids = ids + torch.tensor([[V, V, V, 0, 0, 0]])
    out_user = m(h, user_ids, logits)
    assert out_user[0, -1][1:].argmax() + 1 == 8
    with torch.no_grad():
        assert float(m.pointer(h, ids).user[0, -1]) < 1e-6
        assert float(m.pointer(h, user_ids).user[0, -1]) > 1 - 1e-6


def test_a_user_only_pointer_never_offers_the_models_own_bytes():
    """After the model's "7 8" and the user's "7 9", a 7 is followed by the user's 9 only;
    with no user byte yet it is the text head alone."""
    m = head(window=16, gate=20.0, user_only=True)
    with torch.no_grad():
        m.gate.weight.zero_()
    ids = torch.tensor([[7, 8, 7 + V, 9 + V, 7]])
    h, _, logits = inputs(B=1, T=5, p_text=1.0)
    ptr = m.pointer(h, ids)
    assert float(ptr.p[0, -1, 8]) == 0.0 and float(ptr.p[0, -1, 9]) > 0.0
    assert float(ptr.user[0, -1]) == pytest.approx(1.0)
    own = torch.tensor([[7, 8, 7, 8, 7]])
    out = m(h, own, logits)
    torch.testing.assert_close(out, logits.log_softmax(-1))


def test_before_any_candidate_it_is_the_text_head():
    m = head(gate=5.0)
    h, ids, logits = inputs(T=6, p_text=1.0)
    out = m(h, ids, logits)
    torch.testing.assert_close(out[:, 0], logits[:, 0].log_softmax(-1))
    assert not torch.allclose(out[:, 1], logits[:, 1].log_softmax(-1))


def test_only_the_last_window_text_frames_are_pointed_at():
    m = head(window=3)
    h, ids, logits = inputs(B=1, T=30, p_text=1.0)
    out = m(h, ids, logits)
    h2 = h.clone()
    h2[:, :26] += torch.randn_like(h2[:, :26])
    out2 = m(h2, ids, logits)
    # Frame 29's candidates are frames 26..28 (the newest, 29, has no successor yet): h of
    # older frames changes only older rows.
    torch.testing.assert_close(out[:, 29], out2[:, 29])
    assert not torch.allclose(out[:, 28], out2[:, 28])


def test_exec_mask_freezes_a_row_and_gradients_reach_the_weights():
    m = head()
    h, ids, logits = inputs()
    with m.streaming(2):
        m(h[:, :10], ids[:, :10], logits[:, :10])
        before = m.stream_state.clone()
        m.set_exec_mask(torch.tensor([True, False]))
        m(h[:, 10:20], ids[:, 10:20], logits[:, 10:20])
        after = m.stream_state
        for name, v in after.tensor_fields():
            torch.testing.assert_close(v[1], getattr(before, name)[1])
        assert not torch.equal(after.count[0], before.count[0])
    logits.requires_grad_(True)
    out = m(h, ids, logits)
    w = torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (out.exp() * w).sum().backward()
    for p in (m.q.weight, m.k.weight, m.key_byte.weight, m.gate.weight, logits):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("flags", FLAGS)
def test_one_frame_steps_mask_rows_as_chunks_do(flags):
    """The one-frame path (a session's step) keeps a masked row's state and gives the same
    outputs and state as chunks of 6, while the row is masked and after it resumes."""
    m = head(**flags)
    h, ids, logits = inputs(T=60)

    def run(step: int):
        def feed(a: int, b: int) -> list:
            return [
                m(h[:, t : t + step], ids[:, t : t + step], logits[:, t : t + step])
                for t in range(a, b, step)
            ]

        with m.streaming(2):
            m(h[:, :12], ids[:, :12], logits[:, :12])
            frozen = m.stream_state.clone()
            m.set_exec_mask(torch.tensor([True, False]))
            outs = feed(12, 30)
            for name, v in m.stream_state.tensor_fields():
                torch.testing.assert_close(v[1], getattr(frozen, name)[1])
            m.set_exec_mask(torch.tensor([True, True]))
            outs += feed(30, 60)
            out = torch.cat(outs, 1)
            return out[0], out[1, 18:], m.stream_state.clone()

    one, chunk = run(1), run(6)
    torch.testing.assert_close(one[0], chunk[0])
    torch.testing.assert_close(one[1], chunk[1])
    for name, v in one[2].tensor_fields():
        torch.testing.assert_close(v, getattr(chunk[2], name))


@pytest.mark.parametrize("pointer_gate", [False, True])
def test_duplex_model_with_a_copy_head_streams_and_saves_its_rows(pointer_gate):
    from duplex.model.backbone import BackboneConfig
    from duplex.model.duplex_lm import DuplexConfig, DuplexLM
    from tests.model.duplex_streams import assert_steps_equal_forward, random_batch

    torch.manual_seed(0)
    cfg = DuplexConfig(
        num_codebooks=2,
        codebook_size=16,
        shared_text_ids=True,
        window_speaker=True,
        log_text_only=True,
        copy_window=4,
        copy_gate_pointer=pointer_gate,
        backbone=BackboneConfig(
            d_model=32, layers=("gdn", "mlp"), gdn_heads=2, gdn_head_dim=16, swa_window=5
        ),
    )
    m = DuplexLM(cfg).double().eval()
    torch.nn.init.constant_(m.copy.gate.bias, 0.0)
    if pointer_gate:
        torch.nn.init.normal_(m.copy.gate_in.weight, std=2.0)
    b = random_batch()
    assert torch.isfinite(m(b)[1]["loss"])
    assert_steps_equal_forward(m, b)
    with m.streaming(2):
        assert m.state_bytes() > m.backbone.state_bytes()


def test_talk_point_warm_starts_from_talk_with_only_the_copy_head_fresh(tmp_path):
    from duplex.model import duplex_lm

    talk = duplex_lm.load("talk")
    duplex_lm.save(talk, tmp_path / "talk.safetensors")
    cfg = duplex_lm.DuplexConfig.from_dict(duplex_lm.CONFIGS["talk-point"].to_dict())
    model = duplex_lm.DuplexLM(cfg)
    fresh = duplex_lm.warm_start(model, tmp_path / "talk.safetensors")
    assert fresh and all(k.startswith("copy.") for k in fresh)
    assert cfg.copy_window == 64 and duplex_lm.CONFIGS["talk"].copy_window == 0


def test_the_pointer_loss_trains_where_to_look_even_with_a_closed_gate():
    """With the gate shut the mixture passes the pointer no gradient; its own loss does, and
    counts only frames whose byte the pointer offers."""
    m = head(gate=-40.0)
    with torch.no_grad():
        m.gate.weight.zero_()
    h, ids, logits = inputs()
    target = torch.randint(1, V, (2, 40), generator=torch.Generator().manual_seed(7))
    target[:, ::3] = SKIP
    m(h, ids, logits)[..., 1:].exp().sum().backward()
    assert m.q.weight.grad.abs().max() < 1e-12
    m.zero_grad()
    p_copy = m.pointer(h, ids).p
    loss = m.loss(p_copy, target)
    loss.backward()
    assert m.q.weight.grad.abs().sum() > 0 and m.k.weight.grad.abs().sum() > 0
    p = p_copy.gather(-1, target[..., None])[..., 0]
    use = (target != SKIP) & (p > 0)
    assert 0 < int(use.sum()) < int((target != SKIP).sum())
    torch.testing.assert_close(loss, -p[use].log().mean())


def duplex_losses(**weights: float) -> tuple[dict, torch.Tensor]:
    """A small DuplexLM with a copy head over 6 text frames, its loss weights set by `weights`:
    its losses on one fixed random batch after a backward pass, and the gate's gradient."""
    from duplex.model.backbone import BackboneConfig
    from duplex.model.duplex_lm import DuplexConfig, DuplexLM
    from duplex.model.tokenizer import PAD

    torch.manual_seed(0)
    cfg = DuplexConfig(
        num_codebooks=2,
        codebook_size=16,
        copy_window=6,
        backbone=BackboneConfig(d_model=32, layers=("gdn", "mlp"), gdn_heads=2, gdn_head_dim=16),
        **weights,
    )
    g = torch.Generator().manual_seed(4)
    text = torch.randint(0, 40, (2, 30), generator=g)
    text[torch.rand(2, 30, generator=g) < 0.5] = PAD
    b = {
        "user_audio": torch.randint(0, 16, (2, 30, 2), generator=g),
        "model_audio": torch.randint(0, 16, (2, 30, 2), generator=g),
        "model_text": text,
        "user_text": torch.full((2, 30), PAD),
    }
    model = DuplexLM(cfg).eval()
    out = model(b)[1]
    out["loss"].backward()
    return out, model.copy.gate.weight.grad.abs().sum()


def test_the_duplex_loss_adds_the_pointer_loss_by_its_weight():
    a, b = duplex_losses(copy_loss=0.0)[0], duplex_losses(copy_loss=0.5)[0]
    assert float(a["loss_copy"]) > 0
    torch.testing.assert_close(b["loss"], a["loss"] + 0.5 * a["loss_copy"])


def test_the_gate_loss_is_weighted_by_how_much_copying_changes_the_byte():
    """Target 1 where the pointer's share (1 - p_text(PAD)) p_copy(byte) beats p_text(byte),
    0 elsewhere, each frame weighted by the gap between the two; PAD targets and frames with
    nothing to point at are left out."""
    m = head()
    T = 7
    h = torch.randn(1, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits = torch.zeros(1, T, V, dtype=torch.float64)
    p_copy = torch.zeros(1, T, V, dtype=torch.float64)
    target = torch.tensor([[5, 5, 6, 7, SKIP, 9, 4]])
    some = torch.tensor([[True, True, True, True, True, False, True]])
    # the text head is uniform (1 / V) where not set
    # 0: the pointer gives the byte 0.9: share 0.9 (1 - 1/V) against 1/V (want 1)
    # 1 and 6: it offers another byte: 0 against 1/V (want 0)
    p_copy[0, 0, 5] = 0.9
    p_copy[0, 1, 8] = p_copy[0, 6, 3] = 1.0
    # 2: the pointer's 0.6 beats the text head's 0.4, but only 0.6 of its mass is shared
    # (PAD 0.4): 0.36 against 0.4 (want 0)
    p_copy[0, 2, 6] = 0.6
    logits[0, 2, 6] = logits[0, 2, SKIP] = torch.log(torch.tensor(0.4 * (V - 2) / 0.2))
    # 3: half sure, against a text head at 0.3 for the byte and 0.3 for PAD: 0.35 against 0.3
    p_copy[0, 3, 7] = 0.5
    logits[0, 3, 7] = logits[0, 3, SKIP] = torch.log(torch.tensor(0.3 * (V - 2) / 0.4))
    # 4: a PAD target and 5: nothing to point at are left out, whatever the pointer says
    p_copy[0, 4, 3] = p_copy[0, 5, 9] = 1.0
    loss = m.gate_loss(h, logits, Pointer(p_copy, some, torch.zeros_like(h[..., 0])), target)
    g = m.gate(h)[0, :, 0]
    frames = [0, 1, 2, 3, 6]
    want = torch.tensor([1.0, 0, 0, 1, 0], dtype=torch.float64)
    u = 1 / V
    weight = torch.tensor([0.9 * (1 - u) - u, u, 0.4 - 0.36, 0.35 - 0.3, u], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(g[frames], want, reduction="none")
    torch.testing.assert_close(loss, (bce * weight).sum() / weight.sum())
    # nothing to learn from: zero, with a graph
    nothing = Pointer(p_copy, torch.zeros_like(some), torch.zeros_like(h[..., 0]))
    none = m.gate_loss(h, logits, nothing, target)
    assert float(none) == 0.0 and none.requires_grad


def test_trained_by_its_loss_the_gate_opens_at_values_and_stays_shut_elsewhere():
    """A few frames (a tenth) where the pointer is right among many where the text head is:
    the balanced loss alone opens the gate at the few and keeps it shut at the rest."""
    m = head(gate=-3.0)
    g = torch.Generator().manual_seed(9)
    B, T = 4, 200
    h = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    value = torch.rand(B, T, generator=g) < 0.1
    # the hidden state says whether a value comes (a feature the gate can read)
    h[..., 0] = torch.where(value, 1.0, -1.0)
    target = torch.randint(1, V, (B, T), generator=g)
    logits = torch.zeros(B, T, V, dtype=torch.float64)
    p_copy = torch.full((B, T, V), 1.0 / V, dtype=torch.float64)
    text_right = logits.scatter(-1, target[..., None], 8.0)
    copy_right = p_copy.scatter(-1, target[..., None], 0.9)
    logits = torch.where(value[..., None], logits, text_right)
    p_copy = torch.where(value[..., None], copy_right, p_copy)
    ptr = Pointer(p_copy, torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T))
    opt = torch.optim.Adam(m.gate.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        m.gate_loss(h, logits, ptr, target).backward()
        opt.step()
    gate = torch.sigmoid(m.gate(h)[..., 0]).detach()
    assert float(gate[value].min()) > 0.9
    assert float(gate[~value].max()) < 0.1


def test_the_duplex_loss_adds_the_gate_loss_by_its_weight():
    (a, grad_a), (b, grad_b) = duplex_losses(copy_gate_loss=0.0), duplex_losses(copy_gate_loss=0.5)
    assert float(a["loss_gate"]) > 0
    torch.testing.assert_close(b["loss"], a["loss"] + 0.5 * a["loss_gate"])
    assert not torch.allclose(grad_a, grad_b)


@pytest.mark.parametrize("pointer_gate", [False, True])
def test_a_pointer_gate_learns_to_trust_copies_of_the_users_words_only(pointer_gate):
    """The hidden state says nothing; the pointer is as sure at every frame, right where it
    points into the user's words and wrong where it points into the model's own (where the
    text head knows the byte, as in a template). Only a gate that sees whose bytes the pointer
    offers can open at the first and shut at the second."""
    m = head(gate=-3.0, pointer_gate=pointer_gate)
    g = torch.Generator().manual_seed(11)
    B, T = 4, 200
    h = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    user = torch.rand(B, T, generator=g) < 0.3
    target = torch.randint(1, V, (B, T), generator=g)
    wrong = (target + 1) % (V - 1) + 1
    p_copy = torch.zeros(B, T, V, dtype=torch.float64)
    p_copy.scatter_(-1, torch.where(user, target, wrong)[..., None], 0.9)
    logits = torch.zeros(B, T, V, dtype=torch.float64)
    logits = torch.where(user[..., None], logits, logits.scatter(-1, target[..., None], 4.0))
    ptr = Pointer(p_copy, torch.ones(B, T, dtype=torch.bool), user.double())
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        m.gate_loss(h, logits, ptr, target).backward()
        opt.step()
    gate = torch.sigmoid(m.gate_logit(h, ptr)).detach()
    separated = float(gate[user].min()) > 0.9 and float(gate[~user].max()) < 0.1
    assert separated == pointer_gate


def test_a_pointer_gate_warm_starts_with_the_same_outputs(tmp_path):
    """Added to a trained copy head, the pointer gate starts at zero: the model predicts what
    it did, and only the new weights are fresh."""
    from duplex.model import duplex_lm

    cfg = duplex_lm.DuplexConfig.from_dict(duplex_lm.CONFIGS["tiny"].to_dict())
    cfg.copy_window = 8
    torch.manual_seed(0)
    base = duplex_lm.DuplexLM(cfg).eval()
    with torch.no_grad():
        base.copy.gate.bias.fill_(0.0)
    duplex_lm.save(base, tmp_path / "base.safetensors")
    cfg.copy_gate_pointer = True
    model = duplex_lm.DuplexLM(cfg).eval()
    assert duplex_lm.warm_start(model, tmp_path / "base.safetensors") == ["copy.gate_in.weight"]
    from tests.model.duplex_streams import random_batch

    b = random_batch(K=8, card=256)
    torch.testing.assert_close(model(b)[0].text, base(b)[0].text)
