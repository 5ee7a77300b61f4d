"""The full-duplex engine: one batched codec + model step per frame for every live session.

Per frame and session: the user's audio frame is encoded (codec.encode_step), the model takes
one step on it plus its own previous tokens, its tokens are sampled with the session's own
generator, and its audio frame is decoded (codec.decode_step). All sessions share one batched
call of each stage; a session that has no input this frame sits out through the exec mask, and a
session that joins takes a free slot whose state is reset. A session's tokens depend only on its
own input and seed, never on who else is in the batch.

Acoustic delay: the model emits codebook 0 of frame t together with codebooks >= 1 of frame
t - D, so the frame it can decode at step t is t - D; the first D output frames are silence.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duplex.model.duplex_lm import DuplexLM
from duplex.model.tokenizer import PAD, ByteTokenizer
from duplex.streamer.recording import Recorder
from duplex.streamer.statefile import (
    StateFileError,
    StateKeys,
    fingerprint,
    load_state,
    save_state,
)
from duplex.streamer.stats import Stats

# Largest frame count, position or position offset a loaded state may hold (2**40 frames is
# 700 years at 50 frames a second): far from any integer overflow in later steps.
MAX_POSITION = 1 << 40
# Largest magnitude of any value in a loaded state's float tensors.
MAX_STATE_VALUE = 1e6


@dataclass
class SamplingConfig:
    """How a session samples its tokens; temperature 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 50
    text_temperature: float = 0.7
    text_top_k: int = 25
    seed: int = 0


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
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    values, idx = logits.float().topk(int(k.max()), dim=-1)
    keep = torch.arange(values.shape[-1])[None, :] < k[:, None]
    gumbel = -torch.log(-torch.log(uniform[:, : values.shape[-1]].clamp(1e-20, 1.0 - 1e-7)))
    temp = temperature.clamp(min=1e-6)[:, None]
    scores = torch.where(keep, values / temp + gumbel, torch.full_like(values, -torch.inf))
    choice = torch.where(temperature > 0, scores.argmax(-1), torch.zeros_like(k))
    return idx.gather(-1, choice[:, None])[:, 0]


def quantize16(x: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and round to the 16-bit grid (k / 32767), as float32."""
    return (np.round(np.clip(x, -1.0, 1.0) * 32767.0) / 32767.0).astype(np.float32)


@dataclass
class CheckedState:
    """A state file read and checked by `Engine.check_state_file`, ready to load."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sampling: SamplingConfig | None
    label: str


@dataclass
class FrameResult:
    """What one session got from one step."""

    frame: int
    pcm: np.ndarray
    text: str
    user_text: str
    tokens_in: list[int]
    tokens_out: list[int]


@dataclass(eq=False)
class Session:
    """One conversation in one slot of the engine."""

    id: int
    slot: int
    sampling: SamplingConfig
    generator: torch.Generator
    prev_audio: torch.Tensor
    prev_text: int = PAD
    prev_user_text: int = PAD
    frame: int = 0
    pending_c0: collections.deque = field(default_factory=collections.deque)
    typed: collections.deque = field(default_factory=collections.deque)
    recorder: Recorder | None = None
    explicit_sampling: bool = True
    transcript: list[str] = field(default_factory=list)
    user_transcript: list[str] = field(default_factory=list)
    _text_bytes: bytearray = field(default_factory=bytearray)
    _user_bytes: bytearray = field(default_factory=bytearray)

    def type_text(self, text: str) -> None:
        """Queue typed text: it enters the user's text stream one byte per frame."""
        if self.recorder is not None and text:
            self.recorder.control(self.frame, "type", text=text)
        self.typed.extend(text.encode("utf-8"))


def _utf8_piece(buf: bytearray, token: int) -> str:
    """Append a byte token; return whatever complete UTF-8 text it finishes."""
    if not 0 <= token < 256:
        return ""
    buf.append(token)
    try:
        s = buf.decode("utf-8")
    except UnicodeDecodeError:
        if len(buf) >= 4:
            s = buf.decode("utf-8", errors="replace")
        else:
            return ""
    buf.clear()
    return s


class Engine:
    """Steps up to `slots` sessions together. Use as a context manager (it owns streaming).

    Every step computes every row of the batch, so the batch is kept exactly as large as the
    sessions: a join adds a row, a leave removes one (the sessions after it move down a row, so
    `Session.slot` can change). Resizing moves state rows rather than copying histories.
    """

    def __init__(self, model: DuplexLM, codec: Any, slots: int = 1) -> None:
        if model.cfg.num_codebooks != codec.num_codebooks:
            raise ValueError(
                f"model predicts {model.cfg.num_codebooks} codebooks, codec has "
                f"{codec.num_codebooks}"
            )
        if model.cfg.codebook_size != codec.cardinality:
            raise ValueError(
                f"model codebooks have {model.cfg.codebook_size} entries, codec {codec.cardinality}"
            )
        self.model = model.eval()
        self.codec = codec.eval()
        self.slots = slots
        self.frame_size = codec.frame_size
        self.sample_rate = codec.sample_rate
        self.frame_rate = codec.frame_rate
        self.K = model.cfg.num_codebooks
        self.delay = model.cfg.acoustic_delay
        self.stats = Stats(frame_ms=1000.0 / codec.frame_rate)
        self.sessions: dict[int, Session] = {}
        self.rows = 1
        self._ids = itertools.count()
        self._tok = ByteTokenizer()
        self._open = False
        # Limits on what a loaded state may hold (see `check_state_file`).
        self.max_state_tokens = 1 << 22
        self.max_typed_bytes = 1 << 16
        # A server's secrets: saved states are signed with them, and with
        # `require_signed_states` only states they signed load.
        self.state_keys: StateKeys | None = None
        self.require_signed_states = False
        self.model_fingerprint = fingerprint(model, model.cfg.to_dict())
        self.codec_fingerprint = fingerprint(codec, getattr(codec, "name", type(codec).__name__))

    def __enter__(self) -> Engine:
        self.rows = 1
        self.model.start_streaming(self.rows)
        self.codec.start_streaming(self.rows)
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sessions.values():
            if s.recorder is not None:
                s.recorder.close()
                s.recorder = None
        self.sessions.clear()
        self.model.stop_streaming()
        self.codec.stop_streaming()
        self._open = False

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.sessions)

    def join(
        self,
        sampling: SamplingConfig | None = None,
        state: str | Path | CheckedState | None = None,
        recorder: Recorder | None = None,
    ) -> Session:
        """Start a session in a free slot: fresh, or continuing a saved state file.

        With a state and no `sampling`, the session samples as the saved one did."""
        if not self._open:
            raise RuntimeError("use the engine inside `with engine:`")
        slot = len(self.sessions)
        if slot >= self.slots:
            raise RuntimeError(f"all {self.slots} slots are busy")
        explicit = sampling is not None
        sampling = sampling or SamplingConfig()
        # A new row starts fresh; the one row an empty engine keeps may hold an old session.
        fresh = slot >= self.rows
        if fresh:
            self._resize(list(range(slot)), slot + 1)
        session = Session(
            id=next(self._ids),
            slot=slot,
            sampling=sampling,
            generator=torch.Generator().manual_seed(sampling.seed),
            prev_audio=torch.full((self.K,), self.model.cfg.audio_pad, dtype=torch.long),
            recorder=recorder,
            explicit_sampling=explicit,
        )
        if state is not None:
            try:
                self._load_into(session, state if isinstance(state, CheckedState) else Path(state))
            except BaseException:
                # Back to the batch as it was: a refused state changes nothing.
                if self.rows > max(1, slot):
                    self._resize(list(range(slot)), max(1, slot))
                raise
        elif not fresh:
            rows = torch.zeros(self.rows, dtype=torch.bool)
            rows[slot] = True
            self.model.reset_rows(rows)
            self.codec.reset_rows(rows)
        self.sessions[session.id] = session
        return session

    def leave(self, session: Session) -> None:
        """End a session and free its slot at once."""
        if self.sessions.pop(session.id, None) is None:
            return
        if session.recorder is not None:
            session.recorder.close()
            session.recorder = None
        staying = sorted(self.sessions.values(), key=lambda s: s.slot)
        self._resize([s.slot for s in staying], max(1, len(staying)))
        for i, s in enumerate(staying):
            s.slot = i

    def _resize(self, keep: list[int], rows: int) -> None:
        """Restream with `rows` rows: row i continues old row keep[i], the rest start fresh."""
        keep_t = torch.tensor(keep, dtype=torch.long)
        self.model.restream(keep_t, rows)
        self.codec.restream(keep_t, rows)
        self.rows = rows

    def step(
        self,
        frames: dict[Session, np.ndarray],
        codes: dict[Session, list[int]] | None = None,
    ) -> dict[Session, FrameResult]:
        """One frame for every session in `frames` (pcm [frame_size] float32 each) and in
        `codes` (the user's K codec codes for this frame, when the client runs the codec)."""
        S, K, fs = self.rows, self.K, self.frame_size
        codes = codes or {}
        both = set(frames) & set(codes)
        if both:
            raise ValueError(f"sessions {[s.id for s in both]} sent both audio and codes")
        gone = [s.id for s in (*frames, *codes) if self.sessions.get(s.id) is not s]
        if gone:
            raise ValueError(f"sessions {gone} are not in this engine (they left)")
        given = {}
        for s, c in codes.items():
            c = torch.as_tensor(c, dtype=torch.long).reshape(-1)
            if c.numel() != K or int(c.min()) < 0 or int(c.max()) >= self.model.cfg.codebook_size:
                raise ValueError(
                    f"session {s.id}: expected {K} codes in [0, {self.model.cfg.codebook_size})"
                )
            given[s] = c
        t0 = time.perf_counter()
        active = torch.zeros(S, dtype=torch.bool)
        pcm = torch.zeros(S, 1, fs)
        for s, x in frames.items():
            x = np.asarray(x, dtype=np.float32).reshape(-1)
            if x.size != fs:
                raise ValueError(f"session {s.id}: frame has {x.size} samples, expected {fs}")
            if not np.isfinite(x).all():
                raise ValueError(f"session {s.id}: frame contains NaN or infinite samples")
            active[s.slot] = True
            # 16-bit resolution, as every device and wire format carries: recordings then hold
            # exactly what the model heard, and replays are exact.
            pcm[s.slot, 0] = torch.from_numpy(quantize16(x))
        stepping = [*frames, *given]
        with torch.no_grad():
            if frames:
                self.codec.set_exec_mask(active)
                codes_in = self.codec.encode_step(pcm)[..., 0]
            else:
                codes_in = torch.zeros(S, K, dtype=torch.long)
            for s, c in given.items():
                codes_in[s.slot] = c
                active[s.slot] = True
            t1 = time.perf_counter()
            prev_audio = torch.full((S, K), self.model.cfg.audio_pad, dtype=torch.long)
            prev_text = torch.full((S,), PAD, dtype=torch.long)
            prev_user = torch.full((S,), PAD, dtype=torch.long)
            for s in stepping:
                prev_audio[s.slot] = s.prev_audio
                prev_text[s.slot] = s.prev_text
                prev_user[s.slot] = s.typed.popleft() if s.typed else s.prev_user_text
            self.model.set_exec_mask(active)
            logits = self.model.step(codes_in, prev_audio, prev_text, prev_user)
            out_codes = torch.zeros(S, K, 1, dtype=torch.long)
            decoding = torch.zeros(S, dtype=torch.bool)
            texts, audios, users = self._sample(stepping, logits)
            sampled = {}
            for n, s in enumerate(stepping):
                r = s.slot
                text, audio, user = int(texts[n]), audios[n], int(users[n])
                sampled[s] = (text, audio, user)
                s.pending_c0.append(int(audio[0]))
                if len(s.pending_c0) > self.delay:
                    c0 = s.pending_c0.popleft()
                    out_codes[r, 0, 0] = c0
                    out_codes[r, 1:, 0] = audio[1:]
                    decoding[r] = True
            t2 = time.perf_counter()
            self.codec.set_exec_mask(decoding)
            pcm_out = self.codec.decode_step(out_codes)
        t3 = time.perf_counter()
        results = {}
        for s, (text, audio, user) in sampled.items():
            r = s.slot
            s.prev_audio = audio.clone()
            s.prev_text = text
            s.prev_user_text = user
            y = pcm_out[r, 0].numpy().copy() if decoding[r] else np.zeros(fs, np.float32)
            piece = _utf8_piece(s._text_bytes, text)
            upiece = _utf8_piece(s._user_bytes, int(prev_user[r]))
            if piece:
                s.transcript.append(piece)
            if upiece:
                s.user_transcript.append(upiece)
            res = FrameResult(
                frame=s.frame,
                pcm=y,
                text=piece,
                user_text=upiece,
                tokens_in=codes_in[r].tolist(),
                tokens_out=[*audio.tolist(), text, user],
            )
            if s.recorder is not None:
                s.recorder.frame(
                    s.frame,
                    pcm[r, 0].numpy(),
                    y,
                    tokens_in=res.tokens_in,
                    tokens_out=res.tokens_out,
                    codes_in=s in given,
                    user_text_in=int(prev_user[r]),
                    text=piece,
                    ms={
                        "encode": 1000 * (t1 - t0),
                        "model": 1000 * (t2 - t1),
                        "decode": 1000 * (t3 - t2),
                    },
                )
            s.frame += 1
            results[s] = res
        self.stats.record(
            encode=1000 * (t1 - t0),
            model=1000 * (t2 - t1),
            decode=1000 * (t3 - t2),
            total=1000 * (t3 - t0),
        )
        return results

    def _sample(
        self, stepping: list[Session], logits: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text [n], audio [n, K] and user-text [n] tokens for the stepping sessions, in one
        batched draw per stream; each session's noise comes from its own generator."""
        K, card = self.K, self.model.cfg.codebook_size
        vt = logits.text.shape[-1]
        rows = torch.tensor([s.slot for s in stepping])
        # One draw per session per step, in a fixed layout: text | audio (K x card) | user text.
        u = torch.stack([torch.rand(2 * vt + K * card, generator=s.generator) for s in stepping])
        sp = [s.sampling for s in stepping]
        t_temp = torch.tensor([x.text_temperature for x in sp])
        t_k = torch.tensor([x.text_top_k for x in sp])
        texts = sample(logits.text[rows], t_temp, t_k, u[:, :vt])
        ua = u[:, vt : vt + K * card].reshape(-1, K, card)
        a_temp = torch.tensor([x.temperature for x in sp])
        a_k = torch.tensor([x.top_k for x in sp])

        def draw(k: int, lg: torch.Tensor) -> torch.Tensor:
            return sample(lg, a_temp, a_k, ua[:, k])

        if logits.audio is not None:
            la = logits.audio[rows]
            audio = torch.stack([draw(k, la[:, k]) for k in range(K)], dim=1)
        else:
            # Codebook by codebook: a depth model conditions each on the ones drawn before it.
            audio = self.model.sample_audio(logits.hidden[rows], draw)
        users = sample(logits.user_text[rows], t_temp, t_k, u[:, vt + K * card :])
        return texts, audio, users

    def save_session(self, session: Session, path: str | Path) -> Path:
        """Save a session's whole state (model, codec, log, tokens, RNG) to a state file."""
        rows = torch.tensor([session.slot])
        mt, mp = self.model.save_rows(rows)
        ct, cp = self.codec.save_rows(rows)
        tensors = {f"model/{k}": v for k, v in mt.items()}
        tensors.update({f"codec/{k}": v for k, v in ct.items()})
        tensors["session/prev_audio"] = session.prev_audio
        tensors["session/rng"] = session.generator.get_state()
        meta = {
            "model_plain": mp,
            "codec_plain": cp,
            "frame": session.frame,
            "prev_text": session.prev_text,
            "prev_user_text": session.prev_user_text,
            "pending_c0": list(session.pending_c0),
            "typed": list(session.typed),
            "sampling": asdict(session.sampling),
            "transcript": "".join(session.transcript),
            "user_transcript": "".join(session.user_transcript),
            "text_bytes": list(session._text_bytes),
            "user_bytes": list(session._user_bytes),
        }
        return save_state(
            path, tensors, meta, self.model_fingerprint, self.codec_fingerprint, self.state_keys
        )

    def check_state_file(self, path: str | Path, *, label: str | None = None) -> CheckedState:
        """Read a state file and check every value in it against this engine's model and codec
        (types, ranges, shapes, history length <= `max_state_tokens`) without touching any
        slot: a refused file is a StateFileError saying why. Safe to call from any thread.

        With `require_signed_states`, only states signed by one of `state_keys` pass."""
        label = label or str(path)
        tensors, meta = load_state(
            path,
            self.model_fingerprint,
            self.codec_fingerprint,
            keys=self.state_keys,
            require_signature=self.require_signed_states,
            label=label,
        )
        try:
            return self._check_state(tensors, meta, label)
        except StateFileError:
            raise
        except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as e:
            # Belt and braces: whatever the checks above missed is still a refusal, not a crash.
            raise StateFileError(f"{label}: unusable state ({_safe(e)})") from None

    def _check_state(self, tensors: dict[str, torch.Tensor], meta: Any, label: str) -> CheckedState:
        def bad(what: str) -> StateFileError:
            return StateFileError(f"{label}: {what}")

        def is_int(x: Any, lo: int, hi: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi

        def int_list(x: Any, lo: int, hi: int, most: int) -> bool:
            return isinstance(x, list) and len(x) <= most and all(is_int(v, lo, hi) for v in x)

        cfg = self.model.cfg
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
            sampling = _check_sampling(sampling, bad)
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
                    raise bad(f"{key} field {_safe(name)!r} is malformed or out of range")
        history = 0
        for name, t in tensors.items():
            if name in ("session/prev_audio", "session/rng"):
                continue
            if not name.startswith(("model/", "codec/")):
                raise bad(f"unknown tensor {_safe(name)!r}")
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

    def _load_into(self, session: Session, state: Path | CheckedState) -> None:
        """Load a state into a session's slot. Every value is checked first (see
        `check_state_file`); any error leaves everything unchanged."""
        st = state if isinstance(state, CheckedState) else self.check_state_file(state)
        tensors, meta, label = st.tensors, st.meta, st.label
        rows = torch.tensor([session.slot])

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        before_m = self.model.get_rows(rows)
        before_c = self.codec.get_rows(rows)
        try:
            self.model.load_rows(rows, part("model/"), meta["model_plain"])
            self.codec.load_rows(rows, part("codec/"), meta.get("codec_plain", {}))
        except Exception as e:
            self.model.set_rows(rows, before_m)
            self.codec.set_rows(rows, before_c)
            raise StateFileError(f"{label}: {_safe(e)}") from None
        session.generator.set_state(tensors["session/rng"])
        session.prev_audio = tensors["session/prev_audio"].clone()
        session.frame = meta["frame"]
        session.prev_text, session.prev_user_text = meta["prev_text"], meta["prev_user_text"]
        session.pending_c0 = collections.deque(meta["pending_c0"])
        if session.explicit_sampling is False and st.sampling is not None:
            # No sampling asked for: continue with the settings the state was saved with.
            session.sampling = st.sampling
        session.typed = collections.deque(meta.get("typed", []))
        # Half-decoded UTF-8 characters continue where they stopped.
        session._text_bytes = bytearray(meta.get("text_bytes", []))
        session._user_bytes = bytearray(meta.get("user_bytes", []))
        if meta.get("transcript"):
            session.transcript = [meta["transcript"]]
        if meta.get("user_transcript"):
            session.user_transcript = [meta["user_transcript"]]


def _safe(x: Any) -> str:
    """Text from a state file, fit to show: only plain characters, at most 160."""
    return "".join(c if c.isalnum() or c in " _./:-,()'=<>+" else "?" for c in str(x)[:160])


def _check_sampling(x: Any, bad: Callable[[str], Exception]) -> SamplingConfig:
    """A saved sampling config, every field of the right type and in range."""
    names = {f.name for f in fields(SamplingConfig)}
    if not isinstance(x, dict) or set(x) != names:
        raise bad(f"sampling must be an object with exactly the fields {sorted(names)}")
    for key in ("temperature", "text_temperature"):
        v = x[key]
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
