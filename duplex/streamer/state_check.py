"""Checks of a saved state against a model before it may enter a slot.

A state file is untrusted input (`duplex.streamer.statefile` checks its layout and signature);
these checks go through every value it holds against the model and codec that are to continue
it: types, ranges, shapes, the history length, the sampling settings. A refused state is a
`StateFileError` saying why, and nothing has changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from duplex.model.duplex_lm import DuplexConfig
from duplex.streamer.sampling import SamplingConfig, check_sampling
from duplex.streamer.statefile import StateFileError

# Largest frame count, position or position offset a loaded state may hold (2**40 frames is
# 700 years at 50 frames a second): far from any integer overflow in later steps.
MAX_POSITION = 1 << 40
# Largest magnitude of any value in a loaded state's float tensors.
MAX_STATE_VALUE = 1e6


@dataclass
class CheckedState:
    """A state file read and checked by `Engine.check_state_file`, ready to load."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sampling: SamplingConfig | None
    label: str


@dataclass
class StateLimits:
    """What a state may hold for one engine: its model's config, its codebooks and acoustic
    delay, and the engine's limits on history and waiting typed text."""

    cfg: DuplexConfig
    K: int
    delay: int
    max_state_tokens: int
    max_typed_bytes: int

    def check(self, tensors: dict[str, torch.Tensor], meta: Any, label: str) -> CheckedState:
        """Every value of a read state file against the model, or a StateFileError."""

        def bad(what: str) -> StateFileError:
            return StateFileError(f"{label}: {what}")

        def is_int(x: Any, lo: int, hi: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi

        def int_list(x: Any, lo: int, hi: int, most: int) -> bool:
            return isinstance(x, list) and len(x) <= most and all(is_int(v, lo, hi) for v in x)

        cfg = self.cfg
        if not isinstance(meta, dict):
            raise bad("meta is not an object")
        for key in ("frame", "prev_text", "prev_user_text", "pending_c0", "model_plain"):
            if key not in meta:
                raise bad(f"state file lacks {key!r}")
        if not is_int(meta["frame"], 0, MAX_POSITION):
            raise bad(f"frame must be an integer in [0, {MAX_POSITION}]")
        for key in ("prev_text", "prev_user_text"):
            if not is_int(meta[key], 0, cfg.text_vocab - 1):
                raise bad(f"{key} must be a text token in [0, {cfg.text_vocab})")
        if not int_list(meta["pending_c0"], 0, cfg.codebook_size - 1, self.delay):
            raise bad(
                f"pending_c0 must hold at most {self.delay} codes in [0, {cfg.codebook_size})"
            )
        typed = meta.get("typed", [])
        if not int_list(typed, 0, 255, self.max_typed_bytes):
            raise bad(f"typed must be at most {self.max_typed_bytes} bytes (integers 0..255)")
        for key in ("text_bytes", "user_bytes"):
            if not int_list(meta.get(key, []), 0, 255, 3):
                raise bad(f"{key} must be at most 3 bytes (integers 0..255)")
        for key in ("transcript", "user_transcript"):
            v = meta.get(key, "")
            if not isinstance(v, str) or len(v) > 4 * self.max_state_tokens + 64:
                raise bad(f"{key} must be a string of at most {4 * self.max_state_tokens} chars")
        sampling = meta.get("sampling")
        if sampling is not None:
            sampling = check_sampling(sampling, bad)
        for key in ("model_plain", "codec_plain"):
            plain = meta.get(key, {})
            if not isinstance(plain, dict):
                raise bad(f"{key} is not an object")
            for name, v in plain.items():
                if name.endswith(("/lengths", "/offsets")):
                    ok = int_list(v, 0, MAX_POSITION, 1)
                else:
                    ok = (
                        v is None
                        or isinstance(v, bool | int | float)
                        or (isinstance(v, str) and len(v) <= 256)
                    )
                if not ok:
                    raise bad(f"{key} field {safe(name)!r} is malformed or out of range")
        history = 0
        for name, t in tensors.items():
            if name in ("session/prev_audio", "session/rng"):
                continue
            if not name.startswith(("model/", "codec/")):
                raise bad(f"unknown tensor {safe(name)!r}")
            if t.dtype.is_floating_point:
                if t.numel() and not bool(torch.isfinite(t).all()):
                    raise bad(f"tensor {name!r} holds NaN or infinite values")
                if t.numel() and float(t.abs().max()) > MAX_STATE_VALUE:
                    raise bad(f"tensor {name!r} holds values beyond +-{MAX_STATE_VALUE:g}")
            elif t.dtype != torch.bool and t.numel():
                if "/ids." in name:
                    history += t.numel()
                elif int(t.min()) < -1 or int(t.max()) > MAX_POSITION:
                    raise bad(f"tensor {name!r} holds values outside [-1, {MAX_POSITION}]")
        if history > self.max_state_tokens:
            raise bad(
                f"history of {history} tokens is longer than this engine allows "
                f"({self.max_state_tokens})"
            )
        prev_audio = tensors.get("session/prev_audio")
        if prev_audio is None or tensors.get("session/rng") is None:
            raise bad("state file lacks the session's tokens or random generator")
        if prev_audio.shape != (self.K,) or prev_audio.dtype != torch.int64:
            raise bad(f"saved audio tokens have shape {tuple(prev_audio.shape)}, not ({self.K},)")
        if int(prev_audio.min()) < 0 or int(prev_audio.max()) > cfg.audio_pad:
            raise bad(f"saved audio tokens fall outside [0, {cfg.audio_pad}]")
        rng = tensors["session/rng"]
        try:
            torch.Generator().set_state(rng)
        except (RuntimeError, TypeError) as e:
            raise bad(f"the saved random generator state is unusable: {e}") from None
        return CheckedState(tensors, meta, sampling, label)


def safe(x: Any) -> str:
    """Text from a state file, fit to show: only plain characters, at most 160."""
    return "".join(c if c.isalnum() or c in " _./:-,()'=<>+" else "?" for c in str(x)[:160])
