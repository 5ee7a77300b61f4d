"""A pointer over recent text: the model's next byte may be copied from what was just said.

Trained models wrote an answer's template and then a wrong first word of the value ("okay, five
hundred eighty five." after "remember the number eight hundred eighty five"), even with an exact
transcript of the user; teacher-forced, a heard name's first byte got the prior's probability
(1 in 31), with a 64- or 256-frame attention span or an extra attention block over text frames.
Mapping an attended state back to a byte is what such blocks must learn from scarce examples.
This head does not have to: it points at an earlier text frame and proposes the byte that
*followed* it (an induction step built in), so learning to copy is learning where to look.

Output distribution of the model's next byte, mixed by a gate g from the hidden state:

    p(PAD)  = p_text(PAD)
    p(byte) = (1 - g) p_text(byte) + g (1 - p_text(PAD)) sum_j a_j [next(j) == byte]

with p_text the text head's softmax: whether to write now stays the text head's decision (the
timing a warm-started model learnt is kept), the gate only chooses between generating and
copying the byte, which is easy to learn (open at a value, closed in a template). The sum runs
over the last `window` text frames j whose following text frame has been seen, a = softmax of
q_t . k_j. Text frames are those whose merged id is not PAD, whoever said them (a user's byte is
offset by the text vocabulary in the log; the pointer copies the byte). Ranks count text frames,
so the window spans words at any speaking rate. State per stream: `window + 1` keys and ids.

A gate that sees only the hidden state let a copy begun at a wrong place run on ("the number was
doght know your name yet.", its own earlier words): with `pointer_gate` it also sees what the
pointer offers, its peak and the share of it on bytes the user said, and can learn to trust a
sharp pointer into the user's words more than one into its own. With `user_only` the pointer
offers only bytes the user said: the values this model repeats (a name, a number, a word to
spell) are the user's, and a copy can then never run on through the model's own words.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from duplex.streaming import StreamingModule, StreamState, keep_masked, newest_slots


@dataclasses.dataclass
class Pointer:
    """What the pointer offers at each frame: p [B, T, V] its distribution over the bytes it
    proposes, some [B, T] whether any frame could be pointed at, user [B, T] the share of p on
    bytes the user said."""

    p: torch.Tensor
    some: torch.Tensor
    user: torch.Tensor


@dataclasses.dataclass
class CopyState(StreamState):
    """The last `window + 1` text frames, oldest first (empty slots first, rank 0); ids are
    merged ids (a user's byte offset by the text vocabulary), so who said each is kept."""

    k: torch.Tensor
    ids: torch.Tensor
    rank: torch.Tensor
    count: torch.Tensor


class CopyHead(StreamingModule):
    """Mixes a pointer distribution into the text logits; see the module docstring."""

    def __init__(
        self,
        d: int,
        key_dim: int,
        window: int,
        text_vocab: int,
        skip_id: int,
        pointer_gate: bool = False,
        user_only: bool = False,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError("the copy head needs window >= 1")
        self.window, self.key_dim, self.vocab, self.skip_id = window, key_dim, text_vocab, skip_id
        self.user_only = user_only
        self.q = nn.Linear(d, key_dim, bias=False)
        self.k = nn.Linear(d, key_dim, bias=False)
        # A key also says which byte its frame holds, so "find my last byte" is easy to learn.
        self.key_byte = nn.Embedding(text_vocab, key_dim)
        nn.init.normal_(self.key_byte.weight, std=key_dim**-0.5)
        self.gate = nn.Linear(d, 1)
        # Starts nearly closed: a warm-started model keeps its predictions until copying pays.
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -3.0)
        # The pointer's peak, its share on user bytes and their product, into the gate; zero
        # at first so a warm-started gate is unchanged.
        self.gate_in = nn.Linear(3, 1, bias=False) if pointer_gate else None
        if self.gate_in is not None:
            nn.init.zeros_(self.gate_in.weight)

    def init_state(self, batch_size: int) -> CopyState:
        n = self.window + 1
        w = self.q.weight
        return CopyState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool, device=w.device),
            k=torch.zeros(batch_size, n, self.key_dim, device=w.device, dtype=w.dtype),
            ids=torch.zeros(batch_size, n, dtype=torch.long, device=w.device),
            rank=torch.zeros(batch_size, n, dtype=torch.long, device=w.device),
            count=torch.zeros(batch_size, dtype=torch.long, device=w.device),
        )

    def forward(self, h: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] hidden states, ids [B, T] the frames' merged ids, logits [B, T, V] of the
        text head -> log-probabilities [B, T, V] of the mixture; continues the streaming state.
        The skip id is also the text's PAD (a frame without text writes PAD)."""
        return self.mix(h, logits, self.pointer(h, ids))

    def pointer(self, h: torch.Tensor, ids: torch.Tensor) -> Pointer:
        """What the pointer offers at each frame of h [B, T, d] with merged ids [B, T];
        continues the streaming state."""
        B, T, _ = h.shape
        V = self.vocab
        if self.is_streaming and T == 1:
            return self._pointer_step(h, ids)
        st = self._stream_state if self.is_streaming else self.init_state(B)
        is_text = ids != self.skip_id
        byte = ids % V
        k = self.k(h) + self.key_byte(byte)
        q = self.q(h)
        # c: [B, T] rank of the newest text frame at or before t (1-based; 0: none yet)
        c = st.count[:, None] + torch.cumsum(is_text.long(), dim=1)
        all_k = torch.cat([st.k, k.to(st.k.dtype)], dim=1)
        all_ids = torch.cat([st.ids, ids], dim=1)
        all_rank = torch.cat([st.rank, torch.where(is_text, c, torch.zeros_like(c))], dim=1)
        n = all_rank.shape[1]
        # nxt: [B, n] the merged id of the text frame after each one (read only where it exists)
        index = torch.arange(n, device=h.device).expand(B, n)
        pos = torch.where(all_rank > 0, index, torch.full_like(index, n))
        later = torch.cat([pos[:, 1:], torch.full_like(pos[:, :1], n)], dim=1)
        next_pos = later.flip(1).cummin(dim=1).values.flip(1).clamp(max=n - 1)
        nxt = all_ids.gather(1, next_pos)
        keys, ranks = all_k, all_rank
        m = max(1, int((all_rank > 0).sum(1).max()))
        if 2 * m <= n:
            # Only text frames can be pointed at: drop the other columns (most of a long crop;
            # not worth a sort in a one-frame step, whose columns are mostly the cache's).
            cols = torch.where(all_rank > 0, index, index + n).argsort(dim=1)[:, :m]
            keys = all_k.gather(1, cols[:, :, None].expand(-1, -1, self.key_dim))
            nxt, ranks, n = nxt.gather(1, cols), all_rank.gather(1, cols), m
        # valid: [B, T, n] text frames whose successor is seen by t, the last `window` of them
        r, ct = ranks[:, None, :], c[:, :, None]
        valid = (r > 0) & (r < ct) & (r >= ct - self.window)
        if self.user_only:
            valid = valid & (nxt >= V)[:, None, :]
        scores = torch.einsum("btd,bnd->btn", q, keys.to(q.dtype)) * self.key_dim**-0.5
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        attn = scores.softmax(-1) * valid
        # p_copy: [B, T, V] attention summed onto the bytes it proposes
        p_copy = torch.zeros(B, T, V, device=h.device, dtype=attn.dtype)
        p_copy.scatter_add_(2, (nxt % V)[:, None, :].expand(B, T, n), attn)
        user = (attn * (nxt >= V)[:, None, :]).sum(-1)
        if self.is_streaming:
            self._stream_state = self._next_state(st, all_k, all_ids, all_rank, c[:, -1])
        return Pointer(p_copy, valid.any(-1), user)

    def _pointer_step(self, h: torch.Tensor, ids: torch.Tensor) -> Pointer:
        """`pointer` for one frame, h [B, 1, d] and ids [B, 1]. The state holds text frames only,
        oldest first with consecutive ranks, so the byte after each slot is the next slot's (the
        newest's is this frame's, if it is text) and the state moves by one slot on a text
        frame and stays put on the others: no sort or gather over the window (the general form
        cost 1.9 ms of CPU a frame at window 1,024, a fifth of a session's model step)."""
        st = self._stream_state
        B, V = h.shape[0], self.vocab
        is_text = ids[:, 0] != self.skip_id
        byte = ids[:, 0] % V
        # c: [B] rank of the newest text frame at or before this one
        c = (st.count + is_text.long())[:, None]
        # nxt: [B, n] the merged id of the text frame after each slot
        nxt = torch.cat([st.ids[:, 1:], ids], dim=1)
        valid = (st.rank > 0) & (st.rank < c) & (st.rank >= c - self.window)
        if self.user_only:
            valid = valid & (nxt >= V)
        q = self.q(h[:, 0])
        scores = torch.einsum("bd,bnd->bn", q, st.k.to(q.dtype)) * self.key_dim**-0.5
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        attn = scores.softmax(-1) * valid
        p_copy = torch.zeros(B, V, device=h.device, dtype=attn.dtype)
        p_copy.scatter_add_(1, nxt % V, attn)
        user = (attn * (nxt >= V)).sum(-1)
        move = is_text & st.exec_mask
        new_k, new_ids, new_rank = st.k, st.ids, st.rank
        if bool(move.any()):
            k = (self.k(h[:, 0]) + self.key_byte(byte)).to(st.k.dtype)
            new_k = torch.cat([st.k[:, 1:], k[:, None]], dim=1)
            new_ids, new_rank = nxt, torch.cat([st.rank[:, 1:], c], dim=1)
            if not bool(move.all()):
                new_k, new_ids = keep_masked(new_k, st.k, move), keep_masked(nxt, st.ids, move)
                new_rank = keep_masked(new_rank, st.rank, move)
        self._stream_state = CopyState(
            batch_size=st.batch_size,
            exec_mask=st.exec_mask.clone(),
            k=new_k,
            ids=new_ids,
            rank=new_rank,
            count=keep_masked(c[:, 0], st.count, st.exec_mask),
        )
        return Pointer(p_copy[:, None], valid.any(-1)[:, None], user[:, None])

    def gate_logit(self, h: torch.Tensor, ptr: Pointer) -> torch.Tensor:
        """The gate's logit [B, T] from h [B, T, d] and, with `pointer_gate`, what ptr offers."""
        g = self.gate(h).squeeze(-1)
        if self.gate_in is None:
            return g
        peak = ptr.p.amax(-1)
        x = torch.stack([peak, ptr.user, peak * ptr.user], dim=-1).to(g.dtype)
        return g + self.gate_in(x).squeeze(-1)

    def mix(self, h: torch.Tensor, logits: torch.Tensor, ptr: Pointer) -> torch.Tensor:
        """The text head's logits [B, T, V] and the pointer's offer, mixed by the gate of h
        [B, T, d] -> log-probabilities [B, T, V]."""
        V = self.vocab
        p_copy, some = ptr.p, ptr.some
        g = self.gate_logit(h, ptr).to(logits.dtype)
        log_g = torch.where(some, F.logsigmoid(g), torch.full_like(g, float("-inf")))
        log_keep = torch.where(some, F.logsigmoid(-g), torch.zeros_like(g))
        logp = logits.log_softmax(-1)
        pad = self.skip_id
        # log(1 - p(PAD)): the copy shares only the mass of writing a byte now
        log_byte = torch.log1p(-logp[..., pad].exp().clamp(max=1 - 1e-6))
        out = torch.logaddexp(
            log_keep[..., None] + logp,
            (log_g + log_byte)[..., None] + p_copy.to(logits.dtype).clamp_min(1e-30).log(),
        )
        is_pad = torch.arange(V, device=h.device) == pad
        return torch.where(is_pad, logp, out)

    def loss(self, p_copy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p_copy(target) on the frames whose byte target [B, T] the pointer offers: trains
        where to look whatever the gate says (a closed gate passes the pointer no gradient, so
        a pointer not yet sharp would never become so)."""
        p = p_copy.gather(-1, target[..., None])[..., 0]
        use = (target != self.skip_id) & (p > 0)
        if not bool(use.any()):
            return p_copy.sum() * 0.0
        return -p[use].log().mean()

    def gate_loss(
        self, h: torch.Tensor, logits: torch.Tensor, ptr: Pointer, target: torch.Tensor
    ) -> torch.Tensor:
        """The gate of h [B, T, d] against where copying helps: at each written byte of target
        [B, T], the share the pointer gives it, (1 - p_text(PAD)) p_copy(byte), against the text
        head's p_text(byte) (logits [B, T, V]). Their difference is the mixture's derivative in
        g: its sign is the target (open where the pointer's share is larger), its size the
        weight, so template bytes both predict alike count for nothing and the gate learns at
        values and at bytes where the pointer is wrong. A gate taught by sign alone, the two
        classes weighed alike (talk19g), opened near half way on template bytes and its text
        derailed the model's speech."""
        p_copy, some = ptr.p, ptr.some
        with torch.no_grad():
            p_text = logits.float().softmax(-1)
            byte = p_text.gather(-1, target[..., None])[..., 0]
            share = (1 - p_text[..., self.skip_id]) * p_copy.float().gather(-1, target[..., None])[
                ..., 0
            ]
            use = (target != self.skip_id) & some
            weight = ((share - byte).abs() * use).to(h.dtype)
        g = self.gate_logit(h, ptr)
        want = (share > byte).to(g.dtype)
        bce = F.binary_cross_entropy_with_logits(g, want, reduction="none")
        return (bce * weight).sum() / weight.sum().clamp_min(1e-6)

    def _next_state(
        self,
        st: CopyState,
        all_k: torch.Tensor,
        all_ids: torch.Tensor,
        all_rank: torch.Tensor,
        count: torch.Tensor,
    ) -> CopyState:
        """Keep each row's newest `window + 1` text frames, oldest first."""
        keep = newest_slots(all_rank > 0, self.window + 1)
        new_k = all_k.gather(1, keep[:, :, None].expand(-1, -1, self.key_dim))
        new_ids, new_rank = all_ids.gather(1, keep), all_rank.gather(1, keep)
        m = st.exec_mask
        if not bool(m.all()):
            new_k, new_ids = keep_masked(new_k, st.k, m), keep_masked(new_ids, st.ids, m)
            new_rank, count = keep_masked(new_rank, st.rank, m), keep_masked(count, st.count, m)
        return CopyState(
            batch_size=st.batch_size,
            exec_mask=m.clone(),
            k=new_k,
            ids=new_ids,
            rank=new_rank,
            count=count,
        )
