"""A token backbone that mixes Gated DeltaNet layers, GWA reads, attention and MLPs.

`BackboneConfig.layers` lists the blocks in order, each a pre-norm residual block:
"gdn" (Gated DeltaNet, fixed state), "gwa" (guided window attention read over the id history),
"swa" (sliding-window attention, fixed KV ring), "attn" (full causal attention, growing KV cache;
a baseline), "mlp". The recall models and the duplex LM build on it.

Two forms with the same outputs: `forward(ids)` over whole sequences (training, parallel: chunked
delta rule, batched window reads, masked attention) and, inside `with model.streaming(B):`,
`step(ids)` over the next chunk of any length (one token for decoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from duplex.model.gwa import GuidedWindowAttention, GWAConfig, GWAReadConfig, WindowReader
from duplex.model.tensor_cache import constant
from duplex.streaming import StreamingModule, StreamState, keep_masked

BLOCK_KINDS = ("gdn", "gwa", "swa", "attn", "txa", "mlp")


@dataclass
class BackboneConfig:
    """Widths and the block list of a backbone."""

    vocab_size: int = 8192
    d_model: int = 64
    layers: tuple[str, ...] = ("gdn", "mlp", "gwa", "mlp")
    mlp_mult: int = 4
    gdn_heads: int = 2
    gdn_head_dim: int = 32
    gwa_heads: int = 2
    gwa_head_dim: int = 32
    attn_heads: int = 2
    attn_head_dim: int = 32
    # Sliding windows: "swa" over the last swa_window frames, "txa" over the last swa_window
    # frames whose id is text (not read.skip_id).
    swa_window: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    read: GWAReadConfig = field(default_factory=GWAReadConfig)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        bad = [k for k in self.layers if k not in BLOCK_KINDS]
        if bad:
            raise ValueError(f"unknown block kinds {bad}; choose from {BLOCK_KINDS}")
        if isinstance(self.read, dict):
            self.read = GWAReadConfig(**self.read)
        self.read.vocab_size = self.vocab_size


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    def __init__(self, d: int, mult: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, mult * d)
        self.down = nn.Linear(mult * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


def _inv_freq(D: int, base: float, device: torch.device) -> torch.Tensor:
    """base ** (-2i / D), float64, computed once per (D, base, device)."""

    def make() -> torch.Tensor:
        return base ** (-torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)

    return constant(("rope_inv_freq", D, base, device), make)


def rope_angles(
    pos: torch.Tensor, D: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, T, 1, D / 2] in `dtype` of the rotary angles at positions pos [B, T].

    Angles are computed in float64 so positions in the millions keep their precision.
    """
    ang = pos.to(torch.float64)[..., None] * _inv_freq(D, base, pos.device)
    return ang.cos().to(dtype)[:, :, None, :], ang.sin().to(dtype)[:, :, None, :]


def rope(
    x: torch.Tensor,
    pos: torch.Tensor,
    base: float,
    angles: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotary position embedding of x [B, T, H, D] at integer positions pos [B, T]
    (`angles`: `rope_angles` of them, when several tensors share the positions)."""
    cos, sin = angles if angles is not None else rope_angles(pos, x.shape[-1], base, x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


def table_offsets(K: int, rows: int, device: torch.device) -> torch.Tensor:
    """[K] row offsets k * rows of K stacked tables, built once per shape and device."""
    return constant(
        ("table_offsets", K, rows, device), lambda: torch.arange(K, device=device) * rows
    )


@dataclass
class AttentionState(StreamState):
    """k, v: [B, L, H, D] cached keys/values; kpos: [B, L] their positions (-1 empty);
    pos: [B] the position of each row's next token."""

    k: torch.Tensor
    v: torch.Tensor
    kpos: torch.Tensor
    pos: torch.Tensor


class Attention(StreamingModule):
    """Causal multi-head attention with RoPE; `window` None = full, else sliding window.

    The sliding form keeps window - 1 cached keys (fixed state); the full form keeps them all.
    """

    def __init__(
        self, d: int, n_heads: int, head_dim: int, window: int | None, base: float
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window, self.base = n_heads, head_dim, window, base
        self.qkv = nn.Linear(d, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d, bias=False)

    def init_state(self, batch_size: int) -> AttentionState:
        w = self.qkv.weight
        L = 0 if self.window is None else self.window - 1
        H, D = self.n_heads, self.head_dim
        return AttentionState(
            batch_size=batch_size,
            exec_mask=torch.ones(batch_size, dtype=torch.bool),
            k=torch.zeros(batch_size, L, H, D, dtype=w.dtype, device=w.device),
            v=torch.zeros(batch_size, L, H, D, dtype=w.dtype, device=w.device),
            kpos=torch.full((batch_size, L), -1, dtype=torch.long, device=w.device),
            pos=torch.zeros(batch_size, dtype=torch.long, device=w.device),
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """q [B, T, H, D], k and v [B, S, H, D], allowed [B, T, S] -> output [B, T, d]."""
        B, T, H, D = q.shape
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None]
        ).transpose(1, 2)
        return self.out(o.reshape(B, T, H * D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; continues from the streaming state when streaming."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        st = self._stream_state if self.is_streaming else self.init_state(B)
        # qpos: [B, T] absolute positions of the new tokens
        qpos = st.pos[:, None] + torch.arange(T, device=x.device)[None]
        q, k, v = self.qkv(x).reshape(B, T, 3, H, D).unbind(dim=2)
        angles = rope_angles(qpos, D, self.base, q.dtype)
        q, k = rope(q, qpos, self.base, angles), rope(k, qpos, self.base, angles)
        # all_*: [B, L + T, ...] cached then new
        all_k = torch.cat([st.k, k], dim=1)
        all_v = torch.cat([st.v, v], dim=1)
        all_pos = torch.cat([st.kpos, qpos], dim=1)
        # allowed: [B, T, L + T]
        rel = qpos[:, :, None] - all_pos[:, None, :]
        allowed = (all_pos[:, None, :] >= 0) & (rel >= 0)
        if self.window is not None:
            allowed &= rel < self.window
        y = self.attend(q, all_k, all_v, allowed)
        if self.is_streaming:
            keep = all_k.shape[1] if self.window is None else self.window - 1
            if self.window is None and not bool(st.exec_mask.all()):
                raise ValueError("full attention streams every row together (no exec mask)")
            m = st.exec_mask
            new_k, new_v = all_k[:, all_k.shape[1] - keep :], all_v[:, all_v.shape[1] - keep :]
            new_p = all_pos[:, all_pos.shape[1] - keep :]
            every = bool(m.all())
            if self.window is not None and not every:
                new_k, new_v = keep_masked(new_k, st.k, m), keep_masked(new_v, st.v, m)
                new_p = keep_masked(new_p, st.kpos, m)
            self._stream_state = AttentionState(
                batch_size=B,
                exec_mask=m.clone(),
                k=new_k,
                v=new_v,
                kpos=new_p,
                pos=st.pos + T if every else keep_masked(st.pos + T, st.pos, m),
            )
        return y


class GDNBlock(nn.Module):
    """Adapter: the Gated DeltaNet layer returns (y, state); blocks return y."""

    def __init__(self, d: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        from duplex.model.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig

        self.layer = GatedDeltaNet(
            GatedDeltaNetConfig(d_model=d, n_heads=n_heads, head_dim=head_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


class Backbone(StreamingModule):
    """Token ids -> hidden states (and logits through the tied embedding)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.reader = WindowReader(cfg.read) if "gwa" in cfg.layers else None
        if "txa" in cfg.layers and cfg.read.skip_id < 0:
            raise ValueError("txa blocks need read.skip_id, the id of frames without text")
        self.norms = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for kind in cfg.layers:
            self.norms.append(RMSNorm(d, cfg.norm_eps))
            if kind == "gdn":
                self.blocks.append(GDNBlock(d, cfg.gdn_heads, cfg.gdn_head_dim))
            elif kind == "gwa":
                self.blocks.append(
                    GuidedWindowAttention(GWAConfig(d, cfg.gwa_heads, cfg.gwa_head_dim), cfg.read)
                )
            elif kind == "txa":
                from duplex.model.text_attention import TextAttention

                self.blocks.append(
                    TextAttention(
                        d, cfg.attn_heads, cfg.attn_head_dim, cfg.swa_window, cfg.rope_base
                    )
                )
            elif kind in ("swa", "attn"):
                win = cfg.swa_window if kind == "swa" else None
                self.blocks.append(
                    Attention(d, cfg.attn_heads, cfg.attn_head_dim, win, cfg.rope_base)
                )
            else:
                self.blocks.append(MLP(d, cfg.mlp_mult))
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        for name, p in self.named_parameters():
            if name.endswith("out.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(cfg.layers)))

    def _run(self, ids: torch.Tensor, read: object, extra: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(ids)
        if extra is not None:
            # Other streams' embeddings (the duplex model's audio), summed per position.
            x = x + extra
        # Only txa blocks need it: no extra op in every other model's step.
        is_text = ids != self.cfg.read.skip_id if "txa" in self.cfg.layers else None
        for kind, norm, block in zip(self.cfg.layers, self.norms, self.blocks, strict=True):
            h = norm(x)
            if kind == "gwa":
                x = x + block(h, read, self.embed.weight)
            elif kind == "txa":
                x = x + block(h, is_text)
            else:
                x = x + block(h)
        return self.final_norm(x)

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Parallel form: ids [B, T] -> hidden [B, T, d]. `offsets` [B]: absolute position of
        each row's first id (only GWA position features use it). `extra` [B, T, d]: added to
        the id embeddings (embeddings of streams that are not in the id log)."""
        if self.is_streaming:
            raise RuntimeError("use step() inside streaming(); forward() is the offline form")
        read = self.reader.parallel(ids, offsets) if self.reader is not None else None
        return self._run(ids, read, extra)

    def step(self, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Streaming form: the next ids [B, T] of each stream -> hidden [B, T, d]."""
        self._require_streaming()
        read = self.reader.step(ids) if self.reader is not None else None
        return self._run(ids, read, extra)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., V] through the tied embedding."""
        return hidden @ self.embed.weight.T

    def state_bytes(self) -> int:
        """Bytes of fixed model state for one stream (GDN states, sliding-window caches); full
        attention's cache grows and is counted at its current size when streaming."""
        total = 0
        for m in self.modules():
            if m is self or not isinstance(m, StreamingModule) or isinstance(m, WindowReader):
                continue
            st = m._stream_state if m.is_streaming else m.init_state(1)
            if st is None:
                continue
            total += st.row_bytes()
        return total
