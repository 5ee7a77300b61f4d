"""DuplexLM: one model step per codec frame, hearing the user and speaking, with text alongside.

Streams at frame t (layout in docs/streams.md):

- user audio   u[t, k], k < K: codes of what the user said in frame t (input only)
- model audio  a[t, k]: the model's own speech codes, in the *delayed* layout ad[t, 0] = a[t, 0],
               ad[t, k] = a[t - D, k] for k >= 1, so one step predicts all K codebooks at once:
               the acoustic codebooks of frame t - D are predicted knowing its semantic one
- model text   m[t]: the inner monologue, bytes of the model's words aligned with its speech
- user text    x[t]: a transcript of the user, lagging their speech by a few frames; the model
               predicts it, or the user types it (then the typed bytes are the input)

Step t inputs u[t] and the model's previous tokens (ad[t-1], m[t-1], x[t-1]), embeddings
summed; it outputs logits for ad[t], m[t], x[t]. A depth model draws the K codebooks in order,
each seeing those drawn before. The backbone's id stream (its guided-window log) is the frame's
merged text: the model's byte, else the user's (+ Vt unless `shared_text_ids`), else PAD.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duplex.model.audio_depth import AudioDepth
from duplex.model.audio_layout import delay_audio
from duplex.model.backbone import Backbone, BackboneConfig, table_offsets
from duplex.model.copy_head import CopyHead
from duplex.model.exposure import TRANSCRIPT_BYTES, corrupt, delayed, read_back_own, written_early
from duplex.model.losses import frame_weight, weighted_ce
from duplex.model.tokenizer import PAD, VOCAB_SIZE
from duplex.streaming import StreamingModule


@dataclass
class DuplexConfig:
    """Streams and widths of a DuplexLM; `backbone.vocab_size` is set from the text vocabulary."""

    num_codebooks: int = 8
    codebook_size: int = 256
    text_vocab: int = VOCAB_SIZE
    acoustic_delay: int = 1
    transcript_delay: int = 3
    text_pad_weight: float = 0.5
    # Streaming steps add -log(text_pad_weight) to the PAD logit of both text streams. Training
    # with PAD weighted by w makes the model's odds of PAD w times the data's; this undoes that,
    # so a session draws "speak now or wait" from the odds the corpus implies, not inflated ones.
    calibrate_pad: bool = False
    audio_weight: float = 1.0
    # Frames by which the model's text precedes its speech in training data (it writes a word
    # before it says it).
    text_lead: int = 0
    # The backbone's id log holds the same id for the same byte whoever said it, so a suffix
    # the model writes can match what the user said earlier (recall across speakers).
    shared_text_ids: bool = False
    # With shared ids: the log keeps who said each byte (the user's offset by the text
    # vocabulary) and the read matches bytes whoever said them (key_modulo), so a window
    # found by the model's words shows whose words it holds.
    window_speaker: bool = False
    # The log stores text only: frames without a byte (PAD, most of a 50 Hz stream) are not
    # logged, so a window's W ids span words rather than W frames.
    log_text_only: bool = False
    # Hidden width of the per-codebook depth model (0: the K codebooks are independent heads).
    depth_hidden: int = 0
    # Weight of codebook 0 (the first, most informative one) in the audio loss, against 1 for
    # each acoustic codebook.
    first_codebook_weight: float = 1.0
    # Training only: the share of the model's fed-back audio codes, and of the bytes of its
    # transcript of the user, replaced by random ones (exposure bias: duplex/model/exposure.py).
    audio_input_noise: float = 0.0
    transcript_input_noise: float = 0.0
    # Training only: the share of transcript frames that read back the model's own byte.
    transcript_sampling: float = 0.0
    # Passes of that read-back (exposure.read_back_own): more is nearer a free-running session.
    transcript_sampling_passes: int = 1
    # Text frames a copy head points over (0: none): the next byte may be the one that followed
    # an earlier byte, so heard values are repeated rather than guessed (duplex/model/copy_head.py).
    copy_window: int = 0
    # Weight of the pointer's own loss (CopyHead.loss) in training: it learns where to look at
    # every byte it could copy, not only where the gate already trusts it.
    copy_loss: float = 0.0
    # Weight of the gate's own loss (CopyHead.gate_loss): open where copying beats the text head.
    copy_gate_loss: float = 0.0
    # The copy head's gate also sees the pointer's peak and its share on the user's bytes.
    copy_gate_pointer: bool = False
    # The copy head offers only the user's bytes (needs the speaker kept in the merged ids).
    copy_user_only: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        self.backbone.vocab_size = 2 * self.text_vocab
        if self.log_text_only:
            self.backbone.read.skip_id = PAD
        if self.window_speaker:
            if not self.shared_text_ids:
                raise ValueError("window_speaker needs shared_text_ids")
            self.backbone.read.key_modulo = self.text_vocab
        if self.acoustic_delay < 0 or self.transcript_delay < 0 or self.text_lead < 0:
            raise ValueError("delays must be >= 0")
        if self.copy_window < 0 or self.transcript_sampling_passes < 1:
            raise ValueError("copy_window must be >= 0 and transcript_sampling_passes >= 1")
        noise = (self.audio_input_noise, self.transcript_input_noise, self.transcript_sampling)
        if self.depth_hidden < 0 or not all(0.0 <= x < 1.0 for x in noise):
            raise ValueError("depth_hidden must be >= 0 and input noise in [0, 1)")

    @property
    def audio_pad(self) -> int:
        """Audio code used before the first frame and in delay gaps."""
        return self.codebook_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DuplexConfig:
        d = dict(d)
        bb = dict(d.pop("backbone", {}))
        if "read" in bb and isinstance(bb["read"], dict):
            from duplex.model.gwa import GWAReadConfig

            bb["read"] = GWAReadConfig(**bb["read"])
        return cls(**d, backbone=BackboneConfig(**bb))


CONFIGS: dict[str, DuplexConfig] = {}
CONFIGS["tiny"] = DuplexConfig(
    backbone=BackboneConfig(
        d_model=128,
        layers=("gdn", "mlp", "gwa", "mlp", "gdn", "mlp", "swa", "mlp"),
        gdn_heads=2,
        gdn_head_dim=64,
        gwa_heads=2,
        gwa_head_dim=32,
        attn_heads=2,
        attn_head_dim=32,
        swa_window=32,
    )
)
CONFIGS["small"] = DuplexConfig(
    backbone=BackboneConfig(
        d_model=256,
        layers=("gdn", "mlp", "gdn", "mlp", "gwa", "mlp", "gdn", "mlp", "swa", "mlp"),
        gdn_heads=4,
        gdn_head_dim=64,
        gwa_heads=4,
        gwa_head_dim=32,
        attn_heads=4,
        attn_head_dim=32,
        swa_window=64,
    )
)


# The talking model: `small`'s backbone with the layout the conversation corpus trains.
CONFIGS["talk"] = DuplexConfig(
    text_pad_weight=0.25,
    text_lead=2,
    shared_text_ids=True,
    window_speaker=True,
    log_text_only=True,
    depth_hidden=256,
    first_codebook_weight=3.0,
    audio_input_noise=0.1,
    backbone=copy.deepcopy(CONFIGS["small"].backbone),
)


# `talk` + a copy path appended (attention over 64 text frames): `talk` warm-starts it.
CONFIGS["talk-copy"] = copy.deepcopy(CONFIGS["talk"])
CONFIGS["talk-copy"].backbone.layers += ("txa", "mlp")
# `talk` + a pointer over the last 64 text frames mixed into the text head.
CONFIGS["talk-point"] = dataclasses.replace(
    copy.deepcopy(CONFIGS["talk"]), copy_window=64, copy_loss=0.2
)


@dataclass
class StepLogits:
    """Logits of one step or sequence: text [B, (T,) Vt], user_text [B, (T,) Vt], hidden
    [B, (T,) d]; audio [B, (T,) K, card] when the codebooks are independent or teacher-forced,
    None from a streaming step of a depth model (draw them with `DuplexLM.sample_audio`)."""

    text: torch.Tensor
    audio: torch.Tensor | None
    user_text: torch.Tensor
    hidden: torch.Tensor


class DuplexLM(StreamingModule):
    """The multi-stream model: summed stream embeddings -> backbone -> one head per stream."""

    def __init__(self, cfg: DuplexConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.backbone.d_model
        K, card = cfg.num_codebooks, cfg.codebook_size
        self.backbone = Backbone(cfg.backbone)
        # One table per (stream, codebook); row `card` is the pad code.
        self.user_audio_emb = nn.Parameter(torch.randn(K, card + 1, d) * d**-0.5)
        self.model_audio_emb = nn.Parameter(torch.randn(K, card + 1, d) * d**-0.5)
        self.text_emb = nn.Embedding(cfg.text_vocab, d)
        self.user_text_emb = nn.Embedding(cfg.text_vocab, d)
        for e in (self.text_emb, self.user_text_emb):
            nn.init.normal_(e.weight, std=d**-0.5)
        self.text_head = nn.Linear(d, cfg.text_vocab, bias=False)
        self.user_text_head = nn.Linear(d, cfg.text_vocab, bias=False)
        self.audio_head = nn.Linear(d, K * card, bias=False)
        self.depth = AudioDepth(K, card, d, cfg.depth_hidden) if cfg.depth_hidden > 0 else None
        self.copy = None
        if cfg.copy_window:
            flags = (cfg.copy_gate_pointer, cfg.copy_user_only)
            self.copy = CopyHead(d, 64, cfg.copy_window, cfg.text_vocab, PAD, *flags)

    def merged_text(self, text: torch.Tensor, user_text: torch.Tensor) -> torch.Tensor:
        """The backbone's id per frame: model byte, else user byte (+ Vt unless the config
        shares ids between speakers without keeping the speaker), else PAD."""
        shared = self.cfg.shared_text_ids and not self.cfg.window_speaker
        vt = 0 if shared else self.cfg.text_vocab
        user = torch.where(user_text != PAD, user_text + vt, torch.full_like(user_text, PAD))
        return torch.where(text != PAD, text, user)

    def _audio_embed(self, table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        # codes [B, T, K] -> sum over k of table[k, codes[..., k]] : [B, T, d], as one gather
        # from the flattened [K * (card + 1), d] table.
        K, rows, d = table.shape
        return F.embedding(
            codes + table_offsets(K, rows, codes.device), table.reshape(K * rows, d)
        ).sum(-2)

    def _inputs(
        self,
        user_audio: torch.Tensor,
        prev_audio: torch.Tensor,
        prev_text: torch.Tensor,
        prev_user_text: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, T], extra [B, T, d]) for the backbone."""
        extra = (
            self._audio_embed(self.user_audio_emb, user_audio)
            + self._audio_embed(self.model_audio_emb, prev_audio)
            + self.text_emb(prev_text)
            + self.user_text_emb(prev_user_text)
        )
        return self.merged_text(prev_text, prev_user_text), extra

    def _heads(self, h: torch.Tensor, audio_codes: torch.Tensor | None) -> StepLogits:
        """Logits from hidden states h [..., d]; a depth model needs the step's audio codes
        [..., K] (teacher forcing) to give audio logits, else audio is None."""
        K, card = self.cfg.num_codebooks, self.cfg.codebook_size
        if self.depth is None:
            audio = self.audio_head(h).unflatten(-1, (K, card))
        elif audio_codes is not None:
            z = self.depth(h, audio_codes)
            w = self.audio_head.weight.view(K, card, -1)
            audio = torch.einsum("...kd,kcd->...kc", z, w)
        else:
            audio = None
        return StepLogits(self.text_head(h), audio, self.user_text_head(h), h)

    def audio_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced audio logits [..., K, card] of hidden [..., d] given the step's codes."""
        out = self._heads(hidden, codes).audio
        assert out is not None
        return out

    def sample_audio(
        self, hidden: torch.Tensor, draw: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Draw one step's K codes [B, K] from hidden [B, d], codebook by codebook:
        `draw(k, logits [B, card])` returns codebook k's codes [B]."""
        K, card = self.cfg.num_codebooks, self.cfg.codebook_size
        if self.depth is None:
            logits = self.audio_head(hidden).unflatten(-1, (K, card))
            return torch.stack([draw(k, logits[:, k]) for k in range(K)], dim=1)
        w = self.audio_head.weight.view(K, card, -1)
        # Codebook 0 has nothing before it: its condition is zero, and h + 0 is h.
        cond, codes = None, []
        for k in range(K):
            state = self.depth.state(hidden, cond, k)
            code = draw(k, state @ w[k].T)
            codes.append(code)
            if k + 1 < K:
                e = self.depth.embed(k, code)
                cond = e if cond is None else cond + e
        return torch.stack(codes, dim=1)

    def shift_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher forcing: the previous step's tokens of each own stream (pad at t = 0)."""
        cfg = self.cfg
        ad = delay_audio(batch["model_audio"], cfg.acoustic_delay, cfg.audio_pad)
        prev_audio = delayed(ad, 1, cfg.audio_pad)
        prev_user = delayed(batch["user_text"], 1, PAD)
        if self.training:
            prev_audio = corrupt(
                prev_audio, cfg.audio_input_noise, cfg.codebook_size, cfg.audio_pad
            )
            prev_user = corrupt(prev_user, cfg.transcript_input_noise, TRANSCRIPT_BYTES, PAD)
        return {
            "target_audio": ad,
            "prev_audio": prev_audio,
            "prev_text": delayed(batch["model_text"], 1, PAD),
            "prev_user_text": prev_user,
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[StepLogits, dict[str, torch.Tensor]]:
        """Parallel (training) form.

        batch: user_audio [B, T, K], model_audio [B, T, K] (frames, not delayed), model_text
        [B, T], user_text [B, T] (already aligned: the transcript lags the speech), and
        optionally model_weight [B] or [B, T]: 0 for rows or frames whose model streams teach
        nothing (silent by construction), left out of its text and audio losses. Returns the
        logits of every step and the losses per stream (and their weighted sum, "loss").
        """
        cfg = self.cfg
        s = self.shift_inputs(batch)
        share = cfg.transcript_sampling if self.training else 0.0
        s["prev_user_text"] = read_back_own(
            self, batch["user_audio"], s, share, cfg.transcript_sampling_passes
        )
        ids, extra = self._inputs(
            batch["user_audio"], s["prev_audio"], s["prev_text"], s["prev_user_text"]
        )
        tgt = s["target_audio"]
        logits = self._heads(self.backbone(ids, extra=extra), tgt)
        loss_copy = loss_gate = torch.zeros((), device=ids.device)
        if self.copy is not None:
            ptr = self.copy.pointer(logits.hidden, ids)
            head, target = logits.text, batch["model_text"]
            logits.text = self.copy.mix(logits.hidden, head, ptr)
            loss_copy = self.copy.loss(ptr.p, target)
            loss_gate = self.copy.gate_loss(logits.hidden, head, ptr, target)
        w = torch.ones(cfg.text_vocab, device=ids.device, dtype=logits.text.dtype)
        w[PAD] = cfg.text_pad_weight
        weight = frame_weight(batch.get("model_weight"), batch["model_text"])
        loss_text = weighted_ce(logits.text, batch["model_text"], w, weight)
        user_target = batch["user_text"]
        if share > 0:
            early = written_early(user_target, s["prev_user_text"])
            user_target = user_target.masked_fill(early, PAD)
        loss_user = weighted_ce(logits.user_text, user_target, w, None)
        # Delay gaps hold the pad code, which no head predicts: leave them out of the loss.
        loss_audio = F.cross_entropy(
            logits.audio.flatten(0, 2),
            tgt.flatten().clamp(max=cfg.codebook_size - 1),
            reduction="none",
        )
        keep = (tgt != cfg.audio_pad).to(loss_audio.dtype)
        keep[..., 0] *= cfg.first_codebook_weight
        if weight is not None:
            keep = keep * weight.to(keep.dtype)[:, :, None]
        keep = keep.flatten()
        loss_audio = (loss_audio * keep).sum() / keep.sum().clamp(min=1)
        total = loss_text + loss_user + cfg.audio_weight * loss_audio + cfg.copy_loss * loss_copy
        total = total + cfg.copy_gate_loss * loss_gate
        losses = dict(loss=total, loss_text=loss_text, loss_user_text=loss_user)
        losses["loss_audio"] = loss_audio
        if self.copy is not None:
            losses.update(loss_copy=loss_copy, loss_gate=loss_gate)
        return logits, losses

    def step(
        self,
        user_audio: torch.Tensor,
        prev_audio: torch.Tensor,
        prev_text: torch.Tensor,
        prev_user_text: torch.Tensor,
    ) -> StepLogits:
        """Streaming form, one frame: user_audio [B, K] (this frame), prev_audio [B, K] (the
        model's delayed-layout codes of the previous step), prev_text [B], prev_user_text [B].
        A depth model's audio logits are None here: draw its codes with `sample_audio`."""
        self._require_streaming()
        ids, extra = self._inputs(
            user_audio[:, None], prev_audio[:, None], prev_text[:, None], prev_user_text[:, None]
        )
        h = self.backbone.step(ids, extra=extra)
        out = self._heads(h[:, 0], None)
        if self.copy is not None:
            out.text = self.copy(h, ids, out.text[:, None])[:, 0]
        out.text[:, PAD] += self.pad_shift()
        out.user_text[:, PAD] += self.pad_shift()
        return out

    def pad_shift(self) -> float:
        """What decoding adds to PAD's logit: the loss weighted PAD by text_pad_weight, and
        `calibrate_pad` takes that back so PAD is written as often as the corpus writes it."""
        if self.cfg.calibrate_pad and self.cfg.text_pad_weight != 1.0:
            return -math.log(self.cfg.text_pad_weight)
        return 0.0

    def transcript_logits(
        self,
        user_audio: torch.Tensor,
        prev_audio: torch.Tensor,
        prev_text: torch.Tensor,
        prev_user_text: torch.Tensor,
    ) -> torch.Tensor:
        """The transcript's logits [B, T, V] of every frame at once (inputs as `step`'s, with a
        time axis), PAD calibrated as `step` gives them: what a session would write."""
        ids, extra = self._inputs(user_audio, prev_audio, prev_text, prev_user_text)
        logits = self.user_text_head(self.backbone(ids, extra=extra)).float()
        logits[..., PAD] += self.pad_shift()
        return logits

    def state_bytes(self) -> int:
        """Fixed streaming state bytes per session (excludes the host-side id log)."""
        c = self.copy
        if c is None:
            return self.backbone.state_bytes()
        st = c.stream_state if c.is_streaming else c.init_state(1)
        return self.backbone.state_bytes() + st.row_bytes()

    def host_bytes(self) -> int:
        reader = self.backbone.reader
        return reader.host_bytes() if reader is not None and reader.is_streaming else 0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


WEIGHTS_DIR = Path(__file__).parent / "weights"


def load(name_or_path: str | Path, device: str | torch.device = "cpu") -> DuplexLM:
    """A DuplexLM by config name (random init, seed 0, until a trained model ships under that
    name in duplex/model/weights/) or from a safetensors file saved by `save`."""
    path = Path(name_or_path)
    shipped = WEIGHTS_DIR / f"duplex_{name_or_path}.safetensors"
    if not path.suffix and shipped.is_file():
        path = shipped
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"model weights not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "duplex_config" not in meta:
            raise ValueError(f"{path} is not a DuplexLM checkpoint (no duplex_config metadata)")
        model = DuplexLM(DuplexConfig.from_dict(json.loads(meta["duplex_config"])))
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()
    if str(name_or_path) not in CONFIGS:
        raise ValueError(
            f"unknown model {name_or_path!r}: choose one of {sorted(CONFIGS)} "
            "or a .safetensors path"
        )
    torch.manual_seed(0)
    cfg = DuplexConfig.from_dict(CONFIGS[str(name_or_path)].to_dict())
    return DuplexLM(cfg).to(device).eval()


def warm_start(model: DuplexLM, path: str | Path) -> list[str]:
    """Load the weights of `path` into `model` where names and shapes match; tensors the file
    lacks keep their initialisation (returned). A file with tensors the model lacks, or of
    other shapes, is refused: it is not an ancestor of this model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    sd = load_file(str(path))
    own = model.state_dict()
    extra = sorted(set(sd) - set(own))
    shapes = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    if extra or shapes:
        raise ValueError(
            f"weights do not fit this model: unknown tensors {extra[:5]}, other shapes {shapes[:5]}"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("duplex_config", "{}"))
    if model.cfg.window_speaker and meta.get("shared_text_ids") and not meta.get("window_speaker"):
        # Its user bytes shared the model's ids: they start as copies of those rows.
        vt = model.cfg.text_vocab
        emb = sd["backbone.embed.weight"].clone()
        emb[vt : 2 * vt] = emb[:vt]
        sd["backbone.embed.weight"] = emb
    missing = model.load_state_dict(sd, strict=False).missing_keys
    return sorted(missing)


def save(model: DuplexLM, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"duplex_config": json.dumps(model.cfg.to_dict())})
    return path
