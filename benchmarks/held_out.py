"""Held-out crops for the probes of a trained model (`listener.py`, `value_copy.py`): the model
and the corpus's eval split laid out as that model's config says, so both probes read the same
streams a training run would."""

from __future__ import annotations

from pathlib import Path


def model_and_crops(path: str, corpus: Path, seq_len: int, seed: int, from_start: float = 0.0):
    """(model in eval mode, `ConversationBatches` of `corpus`'s eval split, every stage equally
    likely) for the weights at `path` (a name `duplex.model.load` knows or a .safetensors)."""
    from duplex.data.batches import ConversationBatches, Curriculum
    from duplex.model import duplex_lm

    model = duplex_lm.load(path).eval()
    data = ConversationBatches(
        corpus,
        seq_len,
        split="eval",
        text_lead=model.cfg.text_lead,
        transcript_delay=model.cfg.transcript_delay,
        curriculum=Curriculum(steps=1),
        seed=seed,
        from_start=from_start,
    )
    return model, data
