"""The scripted stand-in models of `duplex eval talk`: `oracle` and `silent`.

The evaluator must be judged before it judges a model: a stand-in that says exactly the reference
answers (the model voice's codes and the script's text) has to score near the ceiling, and one
that says nothing near zero. They are DuplexLMs with a fixed script per batch row, so the engine
steps them exactly as it steps a trained model and the whole loop (codec in, step, codec out) is
what gets checked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from duplex.data import dialogue as G
from duplex.data.conversations import text_stream
from duplex.model.audio_layout import delay_audio
from duplex.model.duplex_lm import CONFIGS, DuplexConfig, DuplexLM, StepLogits
from duplex.model.tokenizer import PAD

if TYPE_CHECKING:
    from duplex.codecs.base import StreamingCodec

SCRIPTED = ("oracle", "silent")


class ScriptedLM(DuplexLM):
    """A stand-in model that emits a fixed script of tokens, one frame per step, whatever it
    hears: the evaluator's known answer. Each batch row has its own script. It has a DuplexLM's
    streaming state (unused), so the engine runs it exactly as it runs a real model."""

    def __init__(self, cfg: DuplexConfig | None = None) -> None:
        super().__init__(cfg or DuplexConfig.from_dict(CONFIGS["tiny"].to_dict()))
        self.scripts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.silence = np.zeros(self.cfg.num_codebooks, np.int64)
        self.t: dict[int, int] = {}

    def set_script(
        self, row: int, text: np.ndarray, user: np.ndarray, audio: np.ndarray, silence: np.ndarray
    ) -> None:
        """Row `row` will emit text, user [F] ids and audio [F, K] (plain frames, delayed
        here), then PAD and `silence` [K] codes."""
        a = torch.as_tensor(np.asarray(audio, np.int64))[None]
        delayed = delay_audio(a, self.cfg.acoustic_delay, -1)[0].numpy()
        self.scripts[row] = (np.asarray(text, np.int64), np.asarray(user, np.int64), delayed)
        self.silence = np.asarray(silence, np.int64)
        self.t[row] = 0

    def restream(self, rows: torch.Tensor, batch_size: int) -> None:
        """Sessions left or joined: new row i continues old row rows[i], with its script."""
        super().restream(rows, batch_size)
        old_s, old_t = self.scripts, self.t
        keep = [int(r) for r in rows]
        self.scripts = {i: old_s[r] for i, r in enumerate(keep) if r in old_s}
        self.t = {i: old_t[r] for i, r in enumerate(keep) if r in old_t}

    def step(self, user_audio, prev_audio, prev_text, prev_user_text) -> StepLogits:
        B, K, card = user_audio.shape[0], self.cfg.num_codebooks, self.cfg.codebook_size
        vt = self.cfg.text_vocab
        lt = torch.full((B, vt), -1e4)
        lu = torch.full((B, vt), -1e4)
        la = torch.full((B, K, card), -1e4)
        st = self.stream_state
        mask = getattr(st, "exec_mask", None) if st is not None else None
        for r in range(B):
            text, user, codes = PAD, PAD, self.silence
            if r in self.scripts and (mask is None or bool(mask[r])):
                t = self.t[r]
                self.t[r] += 1
                tx, us, au = self.scripts[r]
                text = int(tx[t]) if t < len(tx) else PAD
                user = int(us[t]) if t < len(us) else PAD
                codes = au[t] if t < len(au) else self.silence
                codes = np.where(codes < 0, self.silence, codes)
            lt[r, text] = 0
            lu[r, user] = 0
            la[r, torch.arange(K), torch.as_tensor(codes)] = 0
        return StepLogits(lt, la, lu, torch.zeros(B, self.cfg.backbone.d_model))


def script_for(
    model: ScriptedLM, row: int, d: G.Dialogue, codec: StreamingCodec, kind: str
) -> None:
    """Load the oracle's (or the silent model's) script for dialogue `d` into batch row `row`."""
    from duplex.data.conversations import dialogue_record, encode_tracks

    fs = codec.frame_size
    F = math.ceil(len(d.user) / fs)
    silence = encode_tracks(codec, np.zeros((1, fs * 4), np.float32))[0, -1]
    if kind == "silent":
        pad = np.full(F, PAD)
        model.set_script(row, pad, pad, np.tile(silence, (F, 1)), silence)
        return
    words = dialogue_record(d, codec.frame_rate)["words"]
    audio = encode_tracks(codec, d.model[None])[0]
    model.set_script(
        row,
        text_stream(words, 1, F, 0),
        text_stream(words, 0, F, model.cfg.transcript_delay),
        audio,
        silence,
    )
