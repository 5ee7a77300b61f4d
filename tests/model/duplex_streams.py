"""Shared check for DuplexLM variants: streamed steps equal the parallel form, and a row's state
saved mid-stream continues identically in another session."""

from __future__ import annotations

import torch

from duplex.model.duplex_lm import DuplexLM
from duplex.model.tokenizer import PAD


def random_batch(B: int = 2, T: int = 24, K: int = 2, card: int = 16, seed: int = 4) -> dict:
    """Random streams of a small model: 60% of each text stream PAD."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 40, (B, T), generator=g)
    text[torch.rand(B, T, generator=g) < 0.6] = PAD
    user = torch.randint(0, 40, (B, T), generator=g)
    user[torch.rand(B, T, generator=g) < 0.6] = PAD
    return {
        "user_audio": torch.randint(0, card, (B, T, K), generator=g),
        "model_audio": torch.randint(0, card, (B, T, K), generator=g),
        "model_text": text,
        "user_text": user,
    }


def assert_steps_equal_forward(m: DuplexLM, b: dict, split: int = 10) -> None:
    """m (double, eval) stepped over batch b gives forward's text logits; row 1 saved after
    `split` steps and loaded into a new session continues with the same logits."""
    logits, _ = m(b)
    s = m.shift_inputs(b)
    B, T = b["model_text"].shape

    def step(t: int, rows=slice(None)):
        return m.step(
            b["user_audio"][rows, t],
            s["prev_audio"][rows, t],
            s["prev_text"][rows, t],
            s["prev_user_text"][rows, t],
        )

    with m.streaming(B):
        first = [step(t) for t in range(split)]
        saved = m.save_rows(torch.tensor([1]))
        rest = [step(t) for t in range(split, T)]
    got = torch.stack([o.text for o in first + rest], 1)
    torch.testing.assert_close(got, logits.text, rtol=1e-9, atol=1e-9)
    with m.streaming(1):
        m.load_rows(torch.tensor([0]), *saved)
        again = [step(t, slice(1, 2)) for t in range(split, T)]
    torch.testing.assert_close(
        torch.stack([o.text for o in again], 1), logits.text[1:, split:], rtol=1e-9, atol=1e-9
    )
