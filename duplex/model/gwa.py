"""Guided window attention (GWA): read a few windows of the whole history at constant cost.

Three nouns, three files (the method, with equations, is in docs/gwa.md):

- `gwa_history`: `History` keeps one stream's ids as a `TokenLog` plus an `NgramIndex`;
  `read_histories` finds, for every position t, k candidate places to read (the local window
  and, per indexed n-gram order, the most recent earlier places where the n-gram ending at t
  occurred), each with its window of W ids (never past t), matched suffix length and anchor
  position digits. Work per position: O(k·(W + max_walk·m)), independent of the history length.
- `gwa_reader`: `WindowReader`, the streaming module that owns every stream's history, in a
  parallel form (whole sequences) and a streaming form (chunks appended to each stream).
- here, `GuidedWindowAttention`, the layer (one per GWA read in the backbone): re-embeds the
  window ids with the model's token embedding plus window-relative position and candidate
  features, and attends from the current hidden state over all k·W window slots plus a "read
  nothing" slot, with an output gate. Candidate features enter the keys, so the softmax mixes
  windows by learned scores and the loss trains the choice of window.

Training runs the reader over a whole sequence at once (its lookups only ever see earlier
positions), so all T reads are one batched tensor: no recurrence. Streaming appends each chunk to
the log and reads exactly the same windows, so both forms give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from duplex.kernels.gwa import window_attend_tables
from duplex.model.gwa_history import GWAReadConfig, History, WindowRead, read_histories
from duplex.model.gwa_reader import WindowReader, WindowReaderState
from duplex.model.tensor_cache import derived

__all__ = [
    "GWAConfig",
    "GWAReadConfig",
    "GuidedWindowAttention",
    "History",
    "WindowRead",
    "WindowReader",
    "WindowReaderState",
    "read_histories",
]


@dataclass
class GWAConfig:
    """Sizes of one GWA layer."""

    d_model: int
    n_heads: int = 2
    head_dim: int = 32


class GuidedWindowAttention(nn.Module):
    """One GWA read: x [B, T, d] and the reader's windows -> y [B, T, d].

    Stateless: everything it needs across steps is in the reader's history, so its streaming form
    is its parallel form applied to the new positions' windows.

    With `read.lookup_keys` = K > 0 the layer also has a lookup head: a distribution over the
    vocabulary from the hidden state, `log p(x | h) = log_softmax((h W_l) E^T)` through the tied
    token table E (W_l starts as the identity: "the ids my state looks like", which after a
    first read includes the id that read found). Its K most likely ids are looked up in the
    history (the R newest earlier occurrences of each) and their windows join the candidates,
    each window's logits raised by its key's log-probability. The keys are a latent choice
    marginalised over the top K inside the one softmax, so the loss reaches the head through
    log p: no label says which key was right.
    """

    # Positions read at once without gradients (prefill); a class default, tests shrink it.
    infer_block = 512

    def __init__(self, cfg: GWAConfig, read: GWAReadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.read_cfg = read
        d, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, H * D, bias=False)
        self.v_proj = nn.Linear(d, H * D, bias=False)
        self.gate_proj = nn.Linear(d, H * D)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # Window features: window-relative offset, candidate slot, matched length, anchor digits.
        self.rel = nn.Parameter(torch.randn(read.window, d) * 0.02)
        self.slot = nn.Parameter(torch.randn(read.n_candidates, d) * 0.02)
        self.match = nn.Parameter(torch.randn(read.max_match + 1, d) * 0.02)
        self.digits = nn.Parameter(torch.randn(read.pos_digits, read.pos_base, d) * 0.02)
        self.null_k = nn.Parameter(torch.zeros(H, D))
        self.null_v = nn.Parameter(torch.zeros(H, D))
        # Created only with predicted lookups, so configs without them keep their parameters,
        # their weight files and their random initialisation.
        self.lookup: nn.Linear | None = None
        if read.lookup_keys:
            self.lookup = nn.Linear(d, d, bias=False)
            nn.init.eye_(self.lookup.weight)
            self.lookup_slot = nn.Parameter(torch.randn(read.n_lookups, d) * 0.02)

    def propose(self, x: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The lookup head: x [B, T, d] -> (ids [B, T, K], their log-probabilities [B, T, K]).

        Costs d² + d·V multiply-adds and a top-K over V per position (V = 8192, d = 64: 0.5M,
        the size of an output softmax), whatever the history length. Without gradients (a
        prefill chunk of 8192 ids) it runs 1024 positions at a time, so the [T, V] logits never
        exist at once (256 MB per layer at T = V = 8192).
        """
        if torch.is_grad_enabled() or x.shape[1] <= 1024:
            return self._propose(x, embedding)
        parts = [self._propose(c, embedding) for c in x.split(1024, dim=1)]
        return tuple(torch.cat(p, dim=1) for p in zip(*parts, strict=True))

    def _propose(self, x: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # logp: [B, T, V]
        z = self.lookup(x) @ embedding.T
        # half-precision logits over V lose the ranking of close keys: softmax in float32 then
        logp = torch.log_softmax(z.float() if z.element_size() < 4 else z, dim=-1)
        lp, ids = logp.topk(self.read_cfg.lookup_keys, dim=-1)
        return ids, lp.to(x.dtype)

    def _with_lookups(
        self, x: torch.Tensor, read: WindowRead, embedding: torch.Tensor
    ) -> tuple[WindowRead, torch.Tensor, torch.Tensor]:
        """The read plus the windows of this layer's predicted keys; their per-candidate logit
        bias [B, T, k'] (0 for suffix candidates, log p(key) for looked-up ones) and slots."""
        ids, lp = self.propose(x, embedding)
        found = read.finder.find(ids.detach().cpu().numpy())
        extra = {name: torch.from_numpy(v).to(x.device) for name, v in found.items()}
        R = self.read_cfg.lookup_per_key
        # bias: [B, T, k + K·R]; each key's R occurrences share its log-probability
        bias = torch.cat(
            [torch.zeros_like(read.match, dtype=x.dtype), lp.repeat_interleave(R, -1)], -1
        )
        merged = WindowRead(
            **{
                name: torch.cat([getattr(read, name), extra[name]], dim=2)
                for name in ("ids", "mask", "match", "digits", "valid")
            }
        )
        return merged, bias, torch.cat([self.slot, self.lookup_slot], dim=0)

    def _tables(self, slot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keys and values are linear in (token + offset + slot + matched length + digit), so
        each feature table is projected once and the read picks rows of the projections:
        (rel, slot, match, digit) keys and values, [N, H, D] ([P, base, H, D] for digits).
        Without gradients they are kept until a weight changes (a decode step reuses them)."""
        H, D = self.cfg.n_heads, self.cfg.head_dim
        srcs = (self.rel, slot, self.match, self.digits)

        def make() -> tuple[torch.Tensor, ...]:
            tables = [(self.k_proj(t), self.v_proj(t)) for t in (*srcs[:3], srcs[3].flatten(0, 1))]
            (rel_k, rel_v), (slot_k, slot_v), (match_k, match_v), (dig_k, dig_v) = (
                (k.reshape(-1, H, D), v.reshape(-1, H, D)) for k, v in tables
            )
            P = self.read_cfg.pos_digits
            dig_k, dig_v = dig_k.reshape(P, -1, H, D), dig_v.reshape(P, -1, H, D)
            return (rel_k, rel_v, slot_k, slot_v, match_k, match_v, dig_k, dig_v)

        if torch.is_grad_enabled():
            return make()
        return derived(self, (self.k_proj.weight, self.v_proj.weight, *srcs), make)

    def forward(self, x: torch.Tensor, read: WindowRead, embedding: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; read from the WindowReader; embedding [V, d] the model's token table."""
        bias, slot = None, self.slot
        if self.lookup is not None:
            if read.finder is None:
                raise ValueError("a GWA layer with a lookup head needs a read with a key finder")
            read, bias, slot = self._with_lookups(x, read, embedding)
        B, T, _ = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        rel_k, rel_v, slot_k, slot_v, match_k, match_v, dig_k, dig_v = self._tables(slot)
        # The token table is projected whole when the read holds more ids than it has rows
        # (training, prefill); a decode step projects only the few ids it read. Either way the
        # projections are head-major [H, N, D] tables and `idx` picks their rows.
        if read.ids.numel() >= embedding.shape[0]:
            src, idx = embedding, read.ids
        else:
            src = embedding[read.ids.reshape(-1)]
            idx = torch.arange(src.shape[0], device=x.device).reshape(read.ids.shape)
        tok_k, tok_v = (
            (src @ w.T).reshape(-1, H, D).transpose(0, 1).contiguous()
            for w in (self.k_proj.weight, self.v_proj.weight)
        )
        q = self.q_proj(x).reshape(B, T, H, D)

        def attend(s: int, e: int) -> torch.Tensor:
            return window_attend_tables(
                q[:, s:e],
                idx[:, s:e],
                tok_k,
                tok_v,
                rel_k,
                rel_v,
                read.mask[:, s:e],
                read.valid[:, s:e],
                slot_k,
                slot_v,
                match_k,
                match_v,
                read.match[:, s:e],
                dig_k,
                dig_v,
                read.digits[:, s:e],
                self.null_k,
                self.null_v,
                None if bias is None else bias[:, s:e],
            )

        # Without gradients (a prefill chunk) the positions are read a block at a time: the
        # read's intermediates ([block, k, W, H·D] gathers) stay a few MB whatever the chunk.
        step = T if torch.is_grad_enabled() else max(1, self.infer_block)
        o = torch.cat([attend(s, min(T, s + step)) for s in range(0, T, step)], dim=1)
        o = o.reshape(B, T, H * D) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(o)
