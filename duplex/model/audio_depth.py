"""The depth model: a frame's codebooks drawn in order, each seeing the ones before it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duplex.model.backbone import RMSNorm, table_offsets


class AudioDepth(nn.Module):
    """Within one step, codebook k is predicted from the backbone's state plus the codes of
    codebooks 0..k-1 of the same step, so the codebooks of a frame agree with each other (the
    residual quantiser's levels depend on each other; independent draws mix voices).

    A cumulative sum of per-codebook code embeddings conditions one shared residual MLP; zero
    initialised, so a model trained without it starts from exactly its old predictions.
    """

    def __init__(self, K: int, card: int, d: int, hidden: int) -> None:
        super().__init__()
        self.K = K
        self.code_emb = nn.Parameter(torch.zeros(K - 1, card + 1, d))
        self.pos = nn.Parameter(torch.zeros(K, d))
        self.norm = RMSNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def _mix(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.down(F.silu(self.up(self.norm(u))))

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: h [..., d], codes [..., K] -> per-codebook states [..., K, d]."""
        n, rows, d = self.code_emb.shape
        offsets = table_offsets(n, rows, codes.device)
        # [..., K - 1, d]: embeddings of codebooks 0..K-2, each conditioning the ones after it
        e = F.embedding(codes[..., :n] + offsets, self.code_emb.reshape(n * rows, d))
        cond = torch.cat([torch.zeros_like(e[..., :1, :]), e.cumsum(-2)], dim=-2)
        return self._mix(h[..., None, :] + cond + self.pos)

    def state(self, h: torch.Tensor, cond: torch.Tensor | None, k: int) -> torch.Tensor:
        """Codebook k's state [B, d] given cond [B, d], the summed embeddings of codes < k
        (None: no codes before, a zero condition)."""
        return self._mix((h if cond is None else h + cond) + self.pos[k])

    def embed(self, k: int, code: torch.Tensor) -> torch.Tensor:
        """Embedding [B, d] of codebook k's code [B], added to the condition of codebooks > k."""
        return self.code_emb[k][code]
