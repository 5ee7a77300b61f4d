"""DuplexLM: step-by-step equals the parallel forward; delay layout; losses; save and load."""

from __future__ import annotations

import pytest
import torch

from duplex.model.audio_layout import delay_audio, undelay_audio
from duplex.model.backbone import BackboneConfig
from duplex.model.duplex_lm import DuplexConfig, DuplexLM, load, save, warm_start
from duplex.model.tokenizer import PAD, ByteTokenizer


def _tiny() -> DuplexLM:
    torch.manual_seed(0)
    cfg = DuplexConfig(
        num_codebooks=4,
        codebook_size=32,
        acoustic_delay=2,
        backbone=BackboneConfig(
            d_model=32,
            layers=("gdn", "mlp", "gwa", "swa"),
            gdn_heads=2,
            gdn_head_dim=16,
            gwa_heads=2,
            gwa_head_dim=16,
            attn_heads=2,
            attn_head_dim=16,
            swa_window=8,
        ),
    )
    return DuplexLM(cfg).double()


def _batch(B: int, T: int, K: int = 4, card: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 40, (B, T), generator=g)
    text[:, ::3] = PAD
    return {
        "user_audio": torch.randint(0, card, (B, T, K), generator=g),
        "model_audio": torch.randint(0, card, (B, T, K), generator=g),
        "model_text": text,
        "user_text": torch.randint(0, 40, (B, T), generator=g),
    }


def _stream(m: DuplexLM, b: dict[str, torch.Tensor]) -> list:
    """The streaming steps' logits over batch b, frame by frame (teacher-forced inputs)."""
    s = m.shift_inputs(b)
    B, T = b["model_text"].shape
    with m.streaming(B):
        return [
            m.step(
                b["user_audio"][:, t],
                s["prev_audio"][:, t],
                s["prev_text"][:, t],
                s["prev_user_text"][:, t],
            )
            for t in range(T)
        ]


def test_delay_round_trip() -> None:
    a = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    ad = delay_audio(a, 2, pad=-1)
    assert ad[0, 0].tolist() == [0, -1, -1]
    assert ad[0, 2].tolist() == [6, 1, 2]
    assert torch.equal(undelay_audio(ad, 2), a[:, :4])


@pytest.mark.parametrize("T", [1, 7, 40])
def test_step_equals_forward(T: int) -> None:
    m = _tiny()
    b = _batch(2, T)
    logits, _ = m(b)
    outs = _stream(m, b)
    for name in ("text", "audio", "user_text"):
        got = torch.stack([getattr(o, name) for o in outs], 1)
        torch.testing.assert_close(got, getattr(logits, name), rtol=1e-9, atol=1e-9)


def test_prefix_gives_prefix() -> None:
    m = _tiny()
    b = _batch(1, 30)
    full, _ = m(b)
    part, _ = m({k: v[:, :12] for k, v in b.items()})
    torch.testing.assert_close(part.audio, full.audio[:, :12], rtol=1e-9, atol=1e-9)


def test_losses_train() -> None:
    m = _tiny().float()
    b = _batch(2, 24)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, losses = m(b)
        first = first if first is not None else float(losses["loss"])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert float(losses["loss"]) < 0.7 * first
    assert set(losses) == {"loss", "loss_text", "loss_user_text", "loss_audio"}


def test_rows_at_zero_teach_the_model_streams_nothing() -> None:
    """model_weight 0 for a row (a stage where the model is silent by construction) leaves that
    row out of the model's text and audio losses, never out of the user's transcript."""
    m = _tiny()
    b = _batch(3, 20)
    _, plain = m(b)
    _, ones = m(dict(b, model_weight=torch.ones(3)))
    _, frames = m(dict(b, model_weight=torch.ones(3, 20)))
    for k in plain:
        assert torch.allclose(plain[k], ones[k], rtol=1e-12, atol=1e-12), k
        assert torch.allclose(plain[k], frames[k], rtol=1e-12, atol=1e-12), k
    masked = dict(b, model_weight=torch.tensor([0.0, 1.0, 1.0]))
    _, by_frame = m(dict(b, model_weight=torch.tensor([0.0, 1.0, 1.0])[:, None].repeat(1, 20)))
    _, lm = m(masked)
    _, rest = m({k: v[1:] for k, v in b.items()})
    assert torch.allclose(lm["loss_text"], rest["loss_text"], rtol=1e-10)
    assert torch.allclose(lm["loss_audio"], rest["loss_audio"], rtol=1e-10)
    assert not torch.allclose(lm["loss_user_text"], rest["loss_user_text"], rtol=1e-6)
    for k in lm:
        assert torch.allclose(lm[k], by_frame[k], rtol=1e-10), k
    # The masked row's own streams may change at will: its targets are not learned from.
    other = dict(masked, model_text=masked["model_text"].clone())
    other["model_text"][0] = (other["model_text"][0] + 5) % 40
    other["model_audio"] = masked["model_audio"].clone()
    other["model_audio"][0] = (other["model_audio"][0] + 3) % 32
    _, lo = m(other)
    assert torch.allclose(lo["loss_text"], lm["loss_text"], rtol=1e-10)
    assert torch.allclose(lo["loss_audio"], lm["loss_audio"], rtol=1e-10)


def test_frames_at_zero_teach_the_model_streams_nothing() -> None:
    """model_weight [B, T]: frames at 0 (after an unanswered request) leave the model's text and
    audio losses; their targets may be anything, the other frames still count."""
    m = _tiny()
    b = _batch(2, 24)
    weight = torch.ones(2, 24)
    weight[0, 10:] = 0
    _, lm = m(dict(b, model_weight=weight))
    _, plain = m(b)
    assert not torch.allclose(lm["loss_text"], plain["loss_text"], rtol=1e-6)
    other = dict(b, model_text=b["model_text"].clone(), model_audio=b["model_audio"].clone())
    other["model_text"][0, 10:] = (other["model_text"][0, 10:] + 5) % 40
    # The audio target of frame t is the code fed at t + 1 (codebooks delayed further later).
    other["model_audio"][0, 14:] = (other["model_audio"][0, 14:] + 3) % 32
    _, lo = m(dict(other, model_weight=weight))
    assert torch.allclose(lo["loss_text"], lm["loss_text"], rtol=1e-10)
    assert torch.allclose(lo["loss_audio"], lm["loss_audio"], rtol=1e-10)
    other["model_text"][0, 9] = (other["model_text"][0, 9] + 5) % 40
    _, moved = m(dict(other, model_weight=weight))
    assert not torch.allclose(moved["loss_text"], lm["loss_text"], rtol=1e-6)


def test_merged_text_prefers_model_then_user() -> None:
    m = _tiny()
    t = torch.tensor([[65, PAD, PAD]])
    u = torch.tensor([[66, 67, PAD]])
    assert m.merged_text(t, u).tolist() == [[65, 67 + 260, PAD]]


def test_save_load_round_trip(tmp_path) -> None:
    m = load("tiny")
    p = save(m, tmp_path / "m.safetensors")
    m2 = load(p)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="unknown model"):
        load("no-such-model")


def test_tokenizer() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode([*ids, PAD, tok.eot_id]) == "héllo"


def test_one_load_for_every_shipped_model() -> None:
    import duplex.model as M
    from duplex.model.backbone import Backbone

    assert isinstance(M.load("tiny"), DuplexLM)
    assert isinstance(M.load("recall-gwa"), Backbone)
    names = M.available()
    assert {"tiny", "small", "recall-gwa"} <= set(names)
    for name in names:
        M.load(name)


def _deep() -> DuplexLM:
    m = _tiny()
    # The talking model's layout: depth model, text-only log, speaker kept in the window.
    cfg = DuplexConfig.from_dict(
        {
            **m.cfg.to_dict(),
            "depth_hidden": 24,
            "shared_text_ids": True,
            "window_speaker": True,
            "log_text_only": True,
        }
    )
    torch.manual_seed(0)
    m = DuplexLM(cfg).double()
    # Non-zero depth weights, so the codebooks really depend on each other.
    with torch.no_grad():
        for p in m.depth.parameters():
            p.normal_(0, 0.3)
    return m


def test_depth_codebooks_see_the_ones_before() -> None:
    m = _deep()
    h = torch.randn(3, 32, dtype=torch.float64)
    codes = torch.randint(0, 32, (3, 4))
    base = m.audio_logits(h, codes)
    changed = codes.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 32
    moved = m.audio_logits(h, changed)
    # Codebooks 0 and 1 do not see codebook 1; 2 and 3 do.
    torch.testing.assert_close(moved[:, :2], base[:, :2], rtol=0, atol=0)
    assert (moved[:, 2:] - base[:, 2:]).abs().amax() > 1e-3


def test_depth_sampling_equals_teacher_forcing() -> None:
    m = _deep()
    h = torch.randn(3, 32, dtype=torch.float64)
    seen = []

    def greedy(k: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits)
        return logits.argmax(-1)

    codes = m.sample_audio(h, greedy)
    forced = m.audio_logits(h, codes)
    torch.testing.assert_close(torch.stack(seen, 1), forced, rtol=1e-9, atol=1e-9)
    assert torch.equal(forced.argmax(-1), codes)


def test_depth_step_equals_forward() -> None:
    m = _deep()
    b = _batch(2, 9)
    logits, _ = m(b)
    s = m.shift_inputs(b)
    with m.streaming(2):
        for t in range(9):
            o = m.step(
                b["user_audio"][:, t],
                s["prev_audio"][:, t],
                s["prev_text"][:, t],
                s["prev_user_text"][:, t],
            )
            assert o.audio is None
            got = m.audio_logits(o.hidden, s["target_audio"][:, t])
            torch.testing.assert_close(got, logits.audio[:, t], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(o.text, logits.text[:, t], rtol=1e-9, atol=1e-9)


def test_depth_zero_init_keeps_old_predictions() -> None:
    old = _tiny()
    cfg = DuplexConfig.from_dict({**old.cfg.to_dict(), "depth_hidden": 24})
    new = DuplexLM(cfg).double()
    missing = new.load_state_dict(old.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("depth.") for k in missing)
    b = _batch(2, 10)
    a, _ = old(b)
    n, _ = new(b)
    torch.testing.assert_close(n.audio, a.audio, rtol=1e-9, atol=1e-9)


def test_audio_input_noise_only_in_training() -> None:
    m = _tiny()
    m.cfg.audio_input_noise = 0.5
    b = _batch(2, 30)
    m.eval()
    clean = m.shift_inputs(b)["prev_audio"]
    assert torch.equal(clean, m.shift_inputs(b)["prev_audio"])
    m.train()
    noisy = m.shift_inputs(b)["prev_audio"]
    frac = (noisy != clean).double().mean()
    assert 0.3 < frac < 0.6
    assert torch.equal(noisy == m.cfg.audio_pad, clean == m.cfg.audio_pad)


def test_transcript_input_noise_only_in_training_and_only_on_bytes() -> None:
    """A share of the fed-back transcript's bytes become random letters in training; PAD (no
    byte), the targets and the other streams are untouched, and evaluation sees the truth."""
    m = _tiny()
    m.cfg.transcript_input_noise = 0.3
    b = _batch(2, 200)
    b["user_text"][:, 1::4] = PAD
    m.eval()
    clean = m.shift_inputs(b)
    m.train()
    noisy = m.shift_inputs(b)
    assert torch.equal(noisy["prev_text"], clean["prev_text"])
    assert torch.equal(noisy["target_audio"], clean["target_audio"])
    was, now = clean["prev_user_text"], noisy["prev_user_text"]
    assert torch.equal(now == PAD, was == PAD)
    changed = now != was
    frac = changed.double().sum() / (was != PAD).sum()
    assert 0.15 < frac < 0.35
    allowed = set(range(ord("a"), ord("z") + 1)) | {ord(" "), ord("'")}
    assert set(now[changed].tolist()) <= allowed
    m.cfg.transcript_input_noise = 0.0
    assert torch.equal(m.shift_inputs(b)["prev_user_text"], was)
    with pytest.raises(ValueError, match="input noise"):
        DuplexConfig.from_dict({**m.cfg.to_dict(), "transcript_input_noise": 1.0})


def test_a_byte_read_back_early_is_not_written_again() -> None:
    """The corpus writes "nick" at frames 3, 5, 7, 9. A read-back that wrote the 'n' one or
    two frames early already holds it: the corpus's 'n' frame becomes PAD, nothing else moves.
    On time, late, from the truth, across a byte written between, beyond `reach`, or a word's
    real double letter: unchanged."""
    from duplex.model.exposure import written_early

    def row(frames: dict[int, str], T: int = 12) -> list[int]:
        out = [PAD] * T
        for t, ch in frames.items():
            out[t] = ord(ch)
        return out

    target = torch.tensor([row({3: "n", 5: "i", 7: "c", 9: "k"})])

    def fed_of(writes: dict[int, str]) -> torch.Tensor:
        # fed[t] is the byte written at t - 1
        return torch.tensor([row({t + 1: ch for t, ch in writes.items()})])

    def fired(writes: dict[int, str], reach: int = 4) -> list[int]:
        return written_early(target, fed_of(writes), reach)[0].nonzero().flatten().tolist()

    assert fired({2: "n", 5: "i"}) == [3]
    assert fired({1: "n", 5: "i"}) == [3]
    assert fired({1: "n"}, reach=1) == []
    assert fired({3: "n", 5: "i", 7: "c", 9: "k"}) == []
    assert fired({4: "n"}) == []
    assert fired({1: "n", 2: "x"}) == []
    assert fired({2: "m"}) == []
    assert fired({4: "i"}) == [5]
    double = torch.tensor([row({3: "l", 6: "l"})])
    truth = torch.cat([torch.full((1, 1), PAD), double[:, :-1]], dim=1)
    assert not written_early(double, truth).any()
    assert written_early(double, torch.tensor([row({3: "l"})])).nonzero().tolist() == [[0, 3]]


def test_training_with_read_back_takes_early_bytes_out_of_the_targets(monkeypatch) -> None:
    """forward's transcript loss uses `written_early`'s PAD targets when it reads back its own
    bytes (training with transcript_sampling), never otherwise."""
    from duplex.model import duplex_lm

    m = _tiny()
    b = _batch(2, 40)
    m.train()
    calls = []

    def every_byte(target, fed):
        calls.append(1)
        return target != PAD

    def loss(share: float) -> torch.Tensor:
        m.cfg.transcript_sampling = share
        torch.manual_seed(5)
        return m(b)[1]["loss_user_text"]

    plain = loss(0.5)
    monkeypatch.setattr(duplex_lm, "written_early", every_byte)
    assert not torch.allclose(loss(0.5), plain) and calls
    calls.clear()
    off = loss(0.0)
    monkeypatch.undo()
    assert not calls and torch.equal(off, loss(0.0))


def test_transcript_sampling_passes_compound_to_a_free_running_session() -> None:
    """With share 1, `passes` passes read back exactly what a free-running session (its own
    greedy transcript fed back) wrote over the first `passes` frames; one pass does not."""
    from duplex.model.exposure import read_back_own

    m = _tiny()
    m.cfg.text_pad_weight = 0.25
    m.cfg.calibrate_pad = True
    b = _batch(2, 12)
    m.eval()
    s = m.shift_inputs(b)
    B, T = b["user_text"].shape
    fed = torch.full((B,), PAD)
    free = []
    with torch.no_grad(), m.streaming(B):
        for t in range(T):
            out = m.step(b["user_audio"][:, t], s["prev_audio"][:, t], s["prev_text"][:, t], fed)
            fed = out.user_text.argmax(-1)
            free.append(fed)
    session = torch.cat([torch.full((B, 1), PAD), torch.stack(free, 1)[:, :-1]], dim=1)
    assert torch.equal(read_back_own(m, b["user_audio"], s, 1.0, passes=T), session)
    five = read_back_own(m, b["user_audio"], s, 1.0, passes=5)
    assert torch.equal(five[:, :5], session[:, :5])
    assert not torch.equal(read_back_own(m, b["user_audio"], s, 1.0, passes=1), session)


def test_transcript_sampling_reads_back_the_bytes_a_session_would_have_written() -> None:
    """With transcript_sampling = 1 every fed-back transcript frame is the byte the model wrote
    at the frame before, as a streaming session decides it (argmax of the calibrated step given
    the true past); with a share, about that share; in evaluation and at 0, the truth."""
    from duplex.model.exposure import read_back_own

    m = _tiny()
    m.cfg.text_pad_weight = 0.25
    m.cfg.calibrate_pad = True
    b = _batch(2, 60)
    m.eval()
    with torch.no_grad():
        wrote = torch.stack([o.user_text.argmax(-1) for o in _stream(m, b)], dim=1)
    s = m.shift_inputs(b)
    own = read_back_own(m, b["user_audio"], s, 1.0)
    assert own[:, 0].eq(PAD).all()
    assert torch.equal(own[:, 1:], wrote[:, :-1])
    assert not torch.equal(own, s["prev_user_text"])
    assert read_back_own(m, b["user_audio"], s, 0.0) is s["prev_user_text"]
    torch.manual_seed(3)
    half = read_back_own(m, b["user_audio"], s, 0.5)
    differ = own != s["prev_user_text"]
    took = (half == own) & differ
    assert 0.3 < took.sum() / differ.sum() < 0.7
    assert ((half == own) | (half == s["prev_user_text"])).all()
    # The loss sees it in training only; the targets stay the corpus's.
    m.cfg.transcript_sampling = 0.9
    with torch.no_grad():
        m.eval()
        ev = m(b)[1]["loss_user_text"]
        m.cfg.transcript_sampling = 0.0
        assert torch.equal(m(b)[1]["loss_user_text"], ev)
        m.train()
        m.cfg.transcript_sampling = 0.9
        sampled = m(b)[1]["loss_user_text"]
        m.cfg.transcript_sampling = 0.0
        assert not torch.equal(sampled, m(b)[1]["loss_user_text"])
    with pytest.raises(ValueError, match="input noise"):
        DuplexConfig.from_dict({**m.cfg.to_dict(), "transcript_sampling": 1.0})


def test_window_speaker_keeps_who_said_it_and_matches_across_speakers() -> None:
    m = _tiny()
    cfg = DuplexConfig.from_dict(
        {**m.cfg.to_dict(), "shared_text_ids": True, "window_speaker": True, "log_text_only": True}
    )
    assert cfg.backbone.read.key_modulo == cfg.text_vocab
    assert cfg.backbone.read.skip_id == PAD
    m = DuplexLM(cfg)
    t = torch.tensor([[65, PAD, PAD]])
    u = torch.tensor([[66, 67, PAD]])
    assert m.merged_text(t, u).tolist() == [[65, 67 + cfg.text_vocab, PAD]]
    with pytest.raises(ValueError, match="shared_text_ids"):
        DuplexConfig(window_speaker=True)


def test_warm_start_copies_shared_user_rows(tmp_path) -> None:
    old = _tiny().float()
    old.cfg.shared_text_ids = True
    p = save(old, tmp_path / "old.safetensors")
    cfg = DuplexConfig.from_dict({**old.cfg.to_dict(), "window_speaker": True})
    new = DuplexLM(cfg)
    assert warm_start(new, p) == []
    e = new.backbone.embed.weight
    vt = cfg.text_vocab
    assert torch.equal(e[vt:], e[:vt])
    assert torch.equal(e[:vt], old.backbone.embed.weight[:vt])
    other = DuplexLM(DuplexConfig.from_dict({**cfg.to_dict(), "num_codebooks": 2}))
    with pytest.raises(ValueError, match="do not fit"):
        warm_start(other, p)


def test_calibrated_pad_gives_the_data_odds_of_speaking() -> None:
    """Trained with PAD weighted by w, the raw odds of PAD are w times the data's; a calibrated
    step draws from the data's odds. Targets here are unpredictable (PAD with probability 0.8,
    else one letter), so the best the model can learn is that marginal."""
    torch.manual_seed(0)
    m = _tiny().float()
    m.cfg.text_pad_weight = 0.25
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    letter = 97
    for i in range(200):
        if i == 150:
            opt.param_groups[0]["lr"] = 1e-3
        b = _batch(4, 16)
        for key in ("model_text", "user_text"):
            pad = torch.rand(b[key].shape, generator=g) < 0.8
            b[key] = torch.where(pad, torch.full_like(b[key], PAD), torch.full_like(b[key], letter))
        _, losses = m(b)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    m.eval()
    b = _batch(2, 6)

    def p_pad(calibrate: bool) -> tuple[float, float]:
        m.cfg.calibrate_pad = calibrate
        with torch.no_grad():
            outs = _stream(m, b)
        return tuple(
            float(torch.stack([getattr(o, name) for o in outs]).softmax(-1)[..., PAD].mean())
            for name in ("text", "user_text")
        )

    raw, cal = p_pad(False), p_pad(True)
    for r, c in zip(raw, cal, strict=True):
        assert abs(r - 0.5) < 0.1, raw
        assert abs(c - 0.8) < 0.05, cal
