"""Attention over the last N frames that carry text: a copy path for heard values.

At 50 frames a second most frames of both text streams are PAD, so a sliding window of frames
holds few words, and a value the model must repeat ("okay, seven hundred ninety six." after
"remember the number seven hundred ninety six") lies 70-150 frames back. This layer's keys are
only the frames whose id is text (the backbone's merged id is not PAD), the last `window` of
them, and positions count text frames, not time: the relative position of the byte to copy is
the same at any speaking rate. A frame without text still queries (its own key included) but
is not remembered. State per stream: `window - 1` keys, fixed, as the sliding window's.
"""

from __future__ import annotations

import torch

from duplex.model.backbone import Attention, AttentionState, rope, rope_angles
from duplex.streaming import keep_masked, newest_slots


class TextAttention(Attention):
    """Causal multi-head attention with RoPE over the last `window` text frames (the sliding
    window's projections and state, other keys)."""

    def __init__(self, d: int, n_heads: int, head_dim: int, window: int, base: float) -> None:
        if window < 1:
            raise ValueError("text attention needs window >= 1")
        super().__init__(d, n_heads, head_dim, window, base)

    def forward(self, x: torch.Tensor, is_text: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], is_text [B, T] bool -> [B, T, d]; continues from the streaming state.

        State `pos` counts the text frames seen; a text frame's position is its rank among
        them, a frame without text takes the rank the next text frame will have."""
        B, T, _ = x.shape
        H, D, L = self.n_heads, self.head_dim, self.window - 1
        st = self._stream_state if self.is_streaming else self.init_state(B)
        is_text = is_text.to(torch.bool)
        # rank: [B, T] text frames before each frame (plus those of earlier calls)
        before = torch.cumsum(is_text.long(), dim=1) - is_text.long()
        rank = st.pos[:, None] + before
        q, k, v = self.qkv(x).reshape(B, T, 3, H, D).unbind(dim=2)
        angles = rope_angles(rank, D, self.base, q.dtype)
        q, k = rope(q, rank, self.base, angles), rope(k, rank, self.base, angles)
        all_k = torch.cat([st.k, k], dim=1)
        all_v = torch.cat([st.v, v], dim=1)
        # kpos: [B, L + T] rank of each key; -1 for empty slots and frames without text
        new_pos = torch.where(is_text, rank, torch.full_like(rank, -1))
        all_pos = torch.cat([st.kpos, new_pos], dim=1)
        # allowed: [B, T, L + T] earlier text frames within the window, and the frame itself
        rel = rank[:, :, None] - all_pos[:, None, :]
        idx = torch.arange(T, device=x.device)
        kidx = torch.cat([torch.full((L,), -1, device=x.device), idx])
        causal = kidx[None, :] <= idx[:, None]
        allowed = causal[None] & (all_pos[:, None, :] >= 0) & (rel < self.window)
        allowed |= (kidx[None, :] == idx[:, None])[None]
        y = self.attend(q, all_k, all_v, allowed)
        if self.is_streaming:
            self._stream_state = self._next_state(st, all_k, all_v, all_pos, is_text)
        return y

    def _next_state(
        self,
        st: AttentionState,
        all_k: torch.Tensor,
        all_v: torch.Tensor,
        all_pos: torch.Tensor,
        is_text: torch.Tensor,
    ) -> AttentionState:
        """Keep each row's last `window - 1` text keys, oldest first (empty slots first)."""
        keep = newest_slots(all_pos >= 0, self.window - 1)
        gather = keep[:, :, None, None].expand(-1, -1, self.n_heads, self.head_dim)
        new_k, new_v = all_k.gather(1, gather), all_v.gather(1, gather)
        new_p = all_pos.gather(1, keep)
        pos = st.pos + is_text.long().sum(dim=1)
        m = st.exec_mask
        if not bool(m.all()):
            new_k, new_v = keep_masked(new_k, st.k, m), keep_masked(new_v, st.v, m)
            new_p, pos = keep_masked(new_p, st.kpos, m), keep_masked(pos, st.pos, m)
        return AttentionState(
            batch_size=st.batch_size,
            exec_mask=m.clone(),
            k=new_k,
            v=new_v,
            kpos=new_p,
            pos=pos,
        )
