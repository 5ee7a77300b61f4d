"""Tensors a streaming step would otherwise rebuild every frame: constants built once per key,
and tensors derived from weights, rebuilt only when a weight changes.

At batch 1 a step's cost is per-op overhead, so an arange or a projected table rebuilt per frame
costs as much as real work (issue 12's step cost).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

_CONSTANTS: dict[Hashable, torch.Tensor] = {}


def constant(key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()` built once per `key` (outside inference mode, so the tensor can be used by
    training as well as by a step under `torch.inference_mode`)."""
    if key not in _CONSTANTS:
        with torch.inference_mode(False), torch.no_grad():
            _CONSTANTS[key] = make()
    return _CONSTANTS[key]


def weights_key(weights: Iterable[torch.Tensor]) -> tuple:
    """What identifies these weights' values: an in-place update bumps `_version`, a new
    tensor has another storage."""
    return tuple((w._version, w.data_ptr(), w.dtype, w.device) for w in weights)


def derived(
    module: torch.nn.Module, weights: Iterable[torch.Tensor], make: Callable[[], Any]
) -> Any:
    """`make()` kept on `module` until one of `weights` changes (call without gradients)."""
    key = weights_key(weights)
    cached = module.__dict__.get("_derived_cache")
    if cached is None or cached[0] != key:
        cached = (key, make())
        module.__dict__["_derived_cache"] = cached
    return cached[1]
