"""How a session draws its tokens: its sampling settings and the batched draw itself.

Every session of a batch samples in one call per stream, yet its tokens depend only on its own
settings and its own random generator, never on its batch-mates: the draw is Gumbel-max with
each row's noise taken from its session's generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from duplex.model.tensor_cache import constant


@dataclass
class SamplingConfig:
    """How a session samples its tokens; temperature 0 means greedy.

    The transcript of the user is a recognition, not a choice: it is greedy by default, since a
    byte drawn at random is read back at the next frame and derails the rest of its word.
    Sessions saved before it had its own setting drew it at the text's temperature
    (`from_saved` keeps that, so their recordings replay exactly)."""

    temperature: float = 0.8
    top_k: int = 50
    text_temperature: float = 0.7
    text_top_k: int = 25
    seed: int = 0
    transcript_temperature: float = 0.0
    # Temperature of the choice whether to write a text byte at all this frame (PAD or not),
    # apart from which byte (drawn at `text_temperature`): 1 keeps the model's own odds of
    # speaking; 0.7, the default, the shipped model's best (at 1 it spoke into silences). None
    # draws PAD among the bytes at `text_temperature`, as sessions saved before did: then a
    # reply whose first byte is uncertain is silenced by the sharpening toward PAD.
    speak_temperature: float | None = 0.7

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> SamplingConfig:
        """A config saved by any version: one without `transcript_temperature` drew the
        transcript at `text_temperature`, one without `speak_temperature` drew PAD among the
        bytes."""
        d = dict(d)
        d.setdefault("transcript_temperature", d.get("text_temperature", 0.7))
        d.setdefault("speak_temperature", None)
        return cls(**d)


def add_arguments(p: Any) -> None:
    """The sampling flags of `talk` and `serve` (all but --seed, whose meaning differs), with
    the defaults of `SamplingConfig`."""
    d = SamplingConfig()
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help="audio sampling temperature"
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"audio top-k (default {d.top_k})")
    p.add_argument(
        "--text-temperature", type=float, default=d.text_temperature, help="text temperature"
    )
    p.add_argument(
        "--text-top-k", type=int, default=d.text_top_k, help=f"text top-k (default {d.text_top_k})"
    )
    p.add_argument(
        "--transcript-temperature",
        type=float,
        default=d.transcript_temperature,
        help="temperature of the transcript of the user (default 0: greedy; a byte drawn at "
        "random is read back and derails its word)",
    )
    p.add_argument(
        "--speak-temperature",
        type=float,
        default=d.speak_temperature,
        help="temperature of the choice whether to write a text byte at all (default 0.7; 1: "
        "the model's own odds of speaking), the byte itself at --text-temperature",
    )


def from_args(args: Any) -> SamplingConfig:
    """The `SamplingConfig` of parsed `add_arguments` flags and --seed."""
    return SamplingConfig(
        args.temperature,
        args.top_k,
        args.text_temperature,
        args.text_top_k,
        args.seed,
        args.transcript_temperature,
        args.speak_temperature,
    )


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One id per row of logits [N, V], row n from its top_k[n] entries at temperature[n].

    Gumbel-max: argmax(logit / T + G) with G = -log(-log(U)) draws from softmax(logit / T), so
    all rows sample in one batched call while each row's randomness `uniform` [N, V] comes from
    its own session's generator (a session's tokens never depend on its batch-mates).
    Temperature <= 0 is greedy; top_k <= 0 keeps every entry.
    """
    V = logits.shape[-1]
    if logits.shape[0] == 1 and temperature.dtype == torch.float32:
        return _sample_one(logits, float(temperature[0]), int(top_k[0]), uniform)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    n = int(k.max())
    values, idx = logits.float().topk(n, dim=-1)
    scores = _perturbed(values, temperature.clamp(min=1e-6)[:, None], uniform)
    # rows whose own k is below the batch's largest drop the entries past their k
    scores.masked_fill_(_arange(n, k.device)[None, :] >= k[:, None], -torch.inf)
    choice = torch.where(temperature > 0, scores.argmax(-1), 0)
    return idx.gather(-1, choice[:, None])[:, 0]


def sample_text(
    logits: torch.Tensor,
    pad: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    speak: torch.Tensor,
    uniform: torch.Tensor,
    decide: torch.Tensor,
) -> torch.Tensor:
    """One text id per row of logits [N, V] in two choices: write a byte or PAD, with the
    log-odds of writing (logsumexp of the bytes against PAD) at temperature speak[n] (0: write
    iff more likely than not) against the uniform decide[n]; then which byte, drawn from the
    bytes alone as `sample` draws (temperature[n], top_k[n], `uniform` [N, V])."""
    lg = logits.float()
    odds = torch.cat([lg[:, :pad], lg[:, pad + 1 :]], dim=-1).logsumexp(-1) - lg[:, pad]
    p_write = torch.sigmoid(odds / speak.clamp(min=1e-6))
    write = torch.where(speak > 0, decide < p_write, odds > 0)
    bytes_only = lg.clone()
    bytes_only[:, pad] = -torch.inf
    byte = sample(bytes_only, temperature, top_k, uniform)
    return torch.where(write, byte, torch.full_like(byte, pad))


def _sample_one(
    logits: torch.Tensor, temp: float, top_k: int, uniform: torch.Tensor
) -> torch.Tensor:
    """`sample` of one row (one session stepping alone) with its settings as numbers: the
    same ops on the same values, less the masks and the per-row selections."""
    V = logits.shape[-1]
    values, idx = logits.float().topk(min(top_k, V) if top_k > 0 else V, dim=-1)
    if temp <= 0:
        return idx[:, 0]
    scores = _perturbed(values, max(temp, 1e-6), uniform)
    return idx.gather(-1, scores.argmax(-1, keepdim=True))[:, 0]


def _perturbed(
    values: torch.Tensor, temp: torch.Tensor | float, uniform: torch.Tensor
) -> torch.Tensor:
    """values / temp + Gumbel noise -log(-log(u)) from the first entries of `uniform`
    (the noise built in place on the clamped copy)."""
    u = uniform[:, : values.shape[-1]].clamp(1e-20, 1.0 - 1e-7)
    return values / temp + u.log_().neg_().log_().neg_()


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """arange(n) on `device`, built once per size (a per-draw allocation otherwise)."""
    return constant(("arange", n, device), lambda: torch.arange(n, device=device))


def check_sampling(x: Any, bad: Callable[[str], Exception]) -> SamplingConfig:
    """A saved sampling config (from an untrusted state file), every field of the right type
    and in range; anything else is `bad(why)`."""
    names = {f.name for f in fields(SamplingConfig)}
    later = {"transcript_temperature", "speak_temperature"}
    if not isinstance(x, dict) or not names - later <= set(x) <= names:
        raise bad(f"sampling must be an object with the fields {sorted(names)}")
    x = dict(x)
    x.setdefault("transcript_temperature", x["text_temperature"])
    x.setdefault("speak_temperature", None)
    for key in ("temperature", "text_temperature", "transcript_temperature", "speak_temperature"):
        v = x[key]
        if key == "speak_temperature" and v is None:
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 <= v <= 100.0:
            raise bad(f"sampling {key} must be a number in [0, 100]")
    for key in ("top_k", "text_top_k"):
        v = x[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 31:
            raise bad(f"sampling {key} must be an integer in [0, 2**31)")
    seed = x["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 63:
        raise bad("sampling seed must be an integer in [0, 2**63)")
    return SamplingConfig(**x)
