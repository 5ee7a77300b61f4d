"""The held-out suite of `duplex eval talk`: which conversations a model is judged on.

Voices, numbers and arithmetic problems come from the "eval" split that training never uses.
Every conversation holds each duplex event at least once (a pause, a barge-in, an acknowledgement,
a silence) so no score is an average over nothing; one more dialogue tells facts and asks them
`minutes` later; and a pair of dialogues checks a saved state as a system prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from duplex.data import dialogue as G

if TYPE_CHECKING:
    from duplex.apps.eval_talk import EvalConfig


def suite(cfg: EvalConfig, bank: G.WordBank) -> list[tuple[str, G.Dialogue]]:
    """The held-out dialogues: conversations with every duplex event, and one fact-distance
    dialogue (facts told `minutes` before they are asked)."""
    rng = np.random.default_rng(cfg.seed + 1000)
    out = []
    rates = {"pause": 0.4, "barge": 0.25, "ack": 0.3, "silence": 0.15}
    for i in range(cfg.conversations):
        # Every conversation holds each kind of event at least once.
        while True:
            d = G.generate("duplex", rng, bank, "eval", cfg.turns, rates, cfg.turns // 2)
            kinds = {e["kind"] for e in d.events}
            cut = any("cut_at" in e for e in d.events)
            if cut and {"ack", "silence"} <= kinds and any(e.get("pause") for e in d.events):
                break
        out.append((f"conversation{i}", d))
    if cfg.minutes:
        out.append(("facts", G.fact_distance_dialogue(bank, rng, tuple(cfg.minutes))))
    return out


def state_prompt_dialogues(bank: G.WordBank, seed: int) -> tuple[G.Dialogue, G.Dialogue]:
    """Facts told in one session; the same facts asked in a session started from its state."""
    rng = np.random.default_rng(seed + 2000)
    voice = G.user_voice(rng, "eval")
    tl = G.Timeline(bank, rng, voice, "eval", "state", G.Augment.random(rng, "eval"))
    tl.request("tell_name")
    tl.request("store_number")
    tl.request("tell_favorite", kind="color")
    first = tl.render()
    memory = tl.memory.copy()
    tl2 = G.Timeline(bank, rng, voice, "eval", "state", G.Augment.random(rng, "eval"))
    tl2.memory = memory
    tl2.told_at = {k: -1.0 for k in ("name", "number", "color")}
    tl2.request("ask_name")
    tl2.request("ask_number")
    tl2.request("ask_favorite", kind="color")
    return first, tl2.render()
