"""Text attention: keys are the last N text frames, positions count text, not time."""

from __future__ import annotations

import pytest
import torch

from duplex.model.backbone import Backbone, BackboneConfig
from duplex.model.text_attention import TextAttention

D_MODEL = 32


def layer(window: int = 5) -> TextAttention:
    torch.manual_seed(0)
    return TextAttention(D_MODEL, n_heads=2, head_dim=8, window=window, base=10000.0).double()


def inputs(B: int = 2, T: int = 40, p_text: float = 0.4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_MODEL, generator=g, dtype=torch.float64)
    is_text = torch.rand(B, T, generator=g) < p_text
    return x, is_text


def naive(m: TextAttention, x: torch.Tensor, is_text: torch.Tensor) -> torch.Tensor:
    """Each frame, one at a time: its own key and the keys of the last `window - 1` earlier text
    frames, each token projected as if alone at its text rank."""
    from duplex.model.backbone import rope

    B, T, _ = x.shape
    H, Dh = m.n_heads, m.head_dim
    out = torch.zeros_like(x)
    for b in range(B):
        texts: list[int] = []
        for t in range(T):
            rank = len(texts)
            keys = texts[-(m.window - 1) :] if m.window > 1 else []
            frames = [*keys, t]
            ranks = [texts.index(j) if j != t else rank for j in frames]
            qkv = m.qkv(x[b, frames]).reshape(len(frames), 3, H, Dh)
            pos = torch.tensor(ranks)
            q = rope(qkv[:, 0][None], pos[None], m.base)[0][-1]
            k = rope(qkv[:, 1][None], pos[None], m.base)[0]
            v = qkv[:, 2]
            att = torch.einsum("hd,nhd->hn", q, k) / Dh**0.5
            o = torch.einsum("hn,nhd->hd", att.softmax(-1), v)
            out[b, t] = m.out(o.reshape(H * Dh))
            if is_text[b, t]:
                texts.append(t)
    return out


def test_parallel_equals_the_naive_definition():
    m = layer(window=5)
    x, is_text = inputs()
    torch.testing.assert_close(m(x, is_text), naive(m, x, is_text))


@pytest.mark.parametrize("chunks", [[1] * 40, [7] * 5 + [5], [3, 11, 1, 19, 6]])
def test_streamed_equals_parallel(chunks):
    m = layer(window=6)
    x, is_text = inputs()
    full = m(x, is_text)
    outs, t = [], 0
    with m.streaming(x.shape[0]):
        for n in chunks:
            outs.append(m(x[:, t : t + n], is_text[:, t : t + n]))
            t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_a_prefix_gives_a_prefix():
    m = layer()
    x, is_text = inputs()
    full = m(x, is_text)
    torch.testing.assert_close(m(x[:, :17], is_text[:, :17]), full[:, :17])


def test_frames_without_text_are_invisible_and_rate_does_not_matter():
    """Inserting frames without text between text frames leaves the text frames' outputs as
    they were: positions count text, so a slower speaker is read the same."""
    m = layer(window=4)
    x, _ = inputs(B=1, T=12)
    dense = m(x, torch.ones(1, 12, dtype=torch.bool))
    spread = torch.zeros(1, 36, D_MODEL, dtype=torch.float64)
    spread_text = torch.zeros(1, 36, dtype=torch.bool)
    spread[:, 2::3] = x
    spread_text[:, 2::3] = True
    spread[:, 0::3] = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    out = m(spread, spread_text)
    torch.testing.assert_close(out[:, 2::3], dense)


def test_only_the_last_window_text_frames_are_read():
    m = layer(window=3)
    x, _ = inputs(B=1, T=10)
    every = torch.ones(1, 10, dtype=torch.bool)
    base = m(x, every)
    far, near = x.clone(), x.clone()
    # Frame 9 reads frames 7, 8 and itself: frame 6 is outside, frame 7 inside.
    far[:, 6] += 1.0
    near[:, 7] += 1.0
    torch.testing.assert_close(m(far, every)[:, 9], base[:, 9])
    assert not torch.allclose(m(near, every)[:, 9], base[:, 9])


def test_exec_mask_freezes_a_row_and_gradients_reach_the_weights():
    m = layer()
    x, is_text = inputs()
    with m.streaming(2):
        m(x[:, :10], is_text[:, :10])
        before = m._stream_state
        m.set_exec_mask(torch.tensor([True, False]))
        m(x[:, 10:15], torch.ones(2, 5, dtype=torch.bool))
        after = m._stream_state
        assert after.k[1].equal(before.k[1]) and after.pos[1] == before.pos[1]
        assert not after.k[0].equal(before.k[0]) and after.pos[0] == before.pos[0] + 5
    y = m(x, is_text)
    y.square().sum().backward()
    assert m.qkv.weight.grad.abs().sum() > 0


def test_backbone_with_a_text_attention_block_streams_like_its_parallel_form():
    cfg = BackboneConfig(vocab_size=20, d_model=D_MODEL, layers=("gdn", "txa", "mlp"))
    cfg.swa_window = 4
    with pytest.raises(ValueError, match="skip_id"):
        Backbone(cfg)
    cfg.read.skip_id = 0
    torch.manual_seed(0)
    bb = Backbone(cfg).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 20, (2, 30), generator=g)
    ids[torch.rand(2, 30, generator=g) < 0.6] = 0
    full = bb(ids)
    with bb.streaming(2):
        steps = [bb.step(ids[:, t : t + 1]) for t in range(30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_duplex_model_with_text_attention_streams_and_saves_its_rows():
    """In the talking model (text-only log: PAD frames carry no text), streamed steps equal
    the parallel form, and a row's state saved mid-stream continues identically elsewhere."""
    from duplex.model.duplex_lm import DuplexConfig, DuplexLM
    from tests.model.duplex_streams import assert_steps_equal_forward, random_batch

    torch.manual_seed(0)
    cfg = DuplexConfig(
        num_codebooks=2,
        codebook_size=16,
        shared_text_ids=True,
        window_speaker=True,
        log_text_only=True,
        backbone=BackboneConfig(
            d_model=32,
            layers=("gdn", "txa", "mlp"),
            gdn_heads=2,
            gdn_head_dim=16,
            attn_heads=2,
            attn_head_dim=16,
            swa_window=5,
        ),
    )
    m = DuplexLM(cfg).double().eval()
    assert_steps_equal_forward(m, random_batch())


def test_talk_copy_warm_starts_from_talk_with_only_its_new_blocks_fresh(tmp_path):
    from duplex.model import duplex_lm

    talk = duplex_lm.load("talk")
    duplex_lm.save(talk, tmp_path / "talk.safetensors")
    cfg = duplex_lm.DuplexConfig.from_dict(duplex_lm.CONFIGS["talk-copy"].to_dict())
    model = duplex_lm.DuplexLM(cfg)
    fresh = duplex_lm.warm_start(model, tmp_path / "talk.safetensors")
    n = len(talk.cfg.backbone.layers)
    assert fresh and all(k.startswith(("backbone.blocks.", "backbone.norms.")) for k in fresh)
    assert {k.split(".")[2] for k in fresh} == {str(n), str(n + 1)}
    assert cfg.backbone.read.skip_id >= 0 and cfg.backbone.layers[n] == "txa"
