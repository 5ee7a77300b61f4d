"""A tiny regression problem for the training-loop tests (float64, so sums agree exactly)."""

from __future__ import annotations

import torch
from torch import nn

DIM = 8


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 1)).double()


def make_batch(step: int, rows: slice) -> dict[str, torch.Tensor]:
    """Rows of a global batch of 8 that depends only on the step."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, DIM, generator=g, dtype=torch.float64)
    w = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    y = torch.sin(x @ w)[:, None]
    return {"x": x[rows], "y": y[rows]}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    pred = model(batch["x"])
    loss = ((pred - batch["y"]) ** 2).mean()
    return loss, {"tokens": float(batch["x"].shape[0])}
