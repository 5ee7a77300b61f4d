"""The full-duplex engine: one batched codec + model step per frame for every live session.

Per frame and session: the user's audio frame is encoded (codec.encode_step), the model takes
one step on it plus its own previous tokens, its tokens are sampled with the session's own
generator, and its audio frame is decoded (codec.decode_step). All sessions share one batched
call of each stage; a session that has no input this frame sits out through the exec mask, and a
session that joins takes a free slot whose state is reset. A session's tokens depend only on its
own input and seed, never on who else is in the batch.

The three stages are `encode`, `think` and `decode` (`duplex.streamer.engine_step`): `step` runs
them in turn; the server's scheduler runs the codec's two on a codec thread and the model's on
its engine thread, pipelined (`duplex.streamer.codec_stage`).

Acoustic delay: the model emits codebook 0 of frame t together with codebooks >= 1 of frame
t - D, so the frame it can decode at step t is t - D; the first D output frames are silence.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duplex.model.duplex_lm import DuplexLM
from duplex.model.tokenizer import PAD, ByteTokenizer
from duplex.streamer import engine_step
from duplex.streamer.engine_step import quantize16
from duplex.streamer.recording import Recorder, recording_header
from duplex.streamer.sampling import SamplingConfig, sample, sample_text
from duplex.streamer.session import FrameResult, Session
from duplex.streamer.state_check import CheckedState, StateLimits, safe
from duplex.streamer.statefile import (
    StateFileError,
    StateKeys,
    StateSource,
    encode_state,
    fingerprint,
    load_state,
    write_atomic,
)
from duplex.streamer.stats import Stats

__all__ = [
    "CheckedState",
    "Engine",
    "FrameResult",
    "SamplingConfig",
    "Session",
    "quantize16",
    "sample",
]


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
        self.card = model.cfg.codebook_size
        self.stats = Stats(frame_ms=1000.0 / codec.frame_rate)
        self.sessions: dict[int, Session] = {}
        self.rows = 1
        self._ids = itertools.count()
        self._tok = ByteTokenizer()
        self._open = False
        # Limits on what a loaded state may hold (see `check_state`).
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
        state: StateSource | CheckedState | None = None,
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
        session = self._new_session(sampling, explicit, recorder)
        session.slot = slot
        if state is not None:
            try:
                self._load_into(session, state)
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

    def _new_session(
        self, sampling: SamplingConfig, explicit: bool, recorder: Recorder | None
    ) -> Session:
        """A session at frame 0 whose generator is seeded from its sampling (slot set later)."""
        return Session(
            id=next(self._ids),
            slot=0,
            sampling=sampling,
            generator=torch.Generator().manual_seed(sampling.seed),
            prev_audio=torch.full((self.K,), self.model.cfg.audio_pad, dtype=torch.long),
            recorder=recorder,
            explicit_sampling=explicit,
        )

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
        `codes` (the user's K codec codes for this frame, when the client runs the codec).

        The three phases in turn on this thread (`duplex.streamer.engine_step`); every input is
        checked before any state changes."""
        codes = codes or {}
        both = set(frames) & set(codes)
        if both:
            raise ValueError(f"sessions {[s.id for s in both]} sent both audio and codes")
        engine_step.check_codes(self, codes)
        heard = engine_step.encode(self, frames)
        return engine_step.decode(self, engine_step.think(self, heard, codes))

    def encode(self, frames: dict[Session, np.ndarray]) -> engine_step.Heard:
        """Codec phase of a step: the PCM sessions' frames, encoded in one batch."""
        return engine_step.encode(self, frames)

    def think(
        self, heard: engine_step.Heard, codes: dict[Session, list[int]] | None = None
    ) -> engine_step.Thought:
        """Model phase of a step: the model's tokens for `heard` and the codes sessions."""
        return engine_step.think(self, heard, codes)

    def decode(self, thought: engine_step.Thought) -> dict[Session, FrameResult]:
        """Codec phase that ends a step: each session's audio, recordings, stats."""
        return engine_step.decode(self, thought)

    def check_members(self, sessions: Iterable[Session]) -> None:
        """ValueError unless every one of `sessions` is in this engine."""
        gone = [s.id for s in sessions if self.sessions.get(s.id) is not s]
        if gone:
            raise ValueError(f"sessions {gone} are not in this engine (they left)")

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
        # Sessions with a speak temperature decide PAD apart, on one more draw of their own.
        two = [x.speak_temperature is not None for x in sp]
        if any(two):
            speak = torch.tensor([x.speak_temperature or 0.0 for x in sp])
            decide = torch.stack(
                [
                    torch.rand(1, generator=s.generator)[0] if t else torch.zeros(())
                    for s, t in zip(stepping, two)
                ]
            )
            split = sample_text(logits.text[rows], PAD, t_temp, t_k, speak, u[:, :vt], decide)
            texts = torch.where(torch.tensor(two), split, texts)
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
        u_temp = torch.tensor([x.transcript_temperature for x in sp])
        users = sample(logits.user_text[rows], u_temp, t_k, u[:, vt + K * card :])
        return texts, audio, users

    def state_bytes(self, session: Session) -> bytes:
        """A session's whole state (model, codec, log, tokens, RNG) as a state file's bytes,
        signed with `state_keys` when set."""
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
        return encode_state(
            tensors, meta, self.model_fingerprint, self.codec_fingerprint, self.state_keys
        )

    def save_session(self, session: Session, path: str | Path) -> Path:
        """Save a session's whole state to a state file (written atomically)."""
        return write_atomic(path, self.state_bytes(session))

    def check_state(self, source: StateSource, *, label: str | None = None) -> CheckedState:
        """Read a state file (a path, or its bytes) and check every value in it against this
        engine's model and codec (types, ranges, shapes, history length <= `max_state_tokens`)
        without touching any slot: a refused state is a StateFileError saying why. Safe to call
        from any thread.

        With `require_signed_states`, only states signed by one of `state_keys` pass."""
        if label is None:
            label = (
                "the state" if isinstance(source, bytes | bytearray | memoryview) else str(source)
            )
        tensors, meta = load_state(
            source,
            self.model_fingerprint,
            self.codec_fingerprint,
            keys=self.state_keys,
            require_signature=self.require_signed_states,
            label=label,
        )
        limits = StateLimits(
            self.model.cfg, self.K, self.delay, self.max_state_tokens, self.max_typed_bytes
        )
        try:
            return limits.check(tensors, meta, label)
        except StateFileError:
            raise
        except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as e:
            # Belt and braces: whatever the checks missed is still a refusal, not a crash.
            raise StateFileError(f"{label}: unusable state ({safe(e)})") from None

    def restore(self, session: Session, state: StateSource | CheckedState) -> None:
        """Continue `session` from a saved state (a path, its bytes, or checked), in its slot.

        Every value is checked before anything changes: a refused state is a StateFileError
        and the session goes on as it was (no backup, no rejoin). Its recorder stays, and so
        does its sampling, unless it joined without one (then it samples as the state did)."""
        self._member(session)
        self._load_into(session, state)

    def reset(self, session: Session) -> None:
        """Start `session` over in its slot: fresh model and codec rows, frame 0, its generator
        re-seeded from its sampling. Its sampling and recorder stay (`record` starts a new
        recording)."""
        self._member(session)
        rows = torch.zeros(self.rows, dtype=torch.bool)
        rows[session.slot] = True
        self.model.reset_rows(rows)
        self.codec.reset_rows(rows)
        fresh = self._new_session(session.sampling, session.explicit_sampling, session.recorder)
        for f in fields(Session):
            if f.name not in ("id", "slot"):
                setattr(session, f.name, getattr(fresh, f.name))

    def record(
        self,
        session: Session,
        directory: str | Path,
        *,
        model: str,
        codec: str,
        state: str | None = None,
        budget: Any = None,
        **extra: Any,
    ) -> Recorder:
        """Record `session` from now on into `directory` (closing any recording it had), with
        the one recording header every front end writes. A session that continues a saved state
        carries it as initial.dstate, so replay needs nothing else; `budget(n)` (see
        `Recorder`) is charged for it too. `model`/`codec` are the names replay loads."""
        header = recording_header(
            model=model,
            codec=codec,
            sampling=asdict(session.sampling),
            model_fingerprint=self.model_fingerprint,
            codec_fingerprint=self.codec_fingerprint,
            frame_rate=self.frame_rate,
            state=state,
            **extra,
        )
        if session.recorder is not None:
            session.recorder.close()
            session.recorder = None
        recorder = Recorder(directory, header, self.sample_rate, self.frame_size, budget=budget)
        if session.restored or session.frame > 0:
            data = self.state_bytes(session)
            write_atomic(recorder.dir / "initial.dstate", data)
            if budget is not None and not budget(len(data)):
                recorder.close()
                recorder.stopped = "recording quota reached"
        session.recorder = recorder
        return recorder

    def _member(self, session: Session) -> None:
        if not self._open or self.sessions.get(session.id) is not session:
            raise ValueError(f"session {session.id} is not in this engine (it left)")

    def _load_into(self, session: Session, state: StateSource | CheckedState) -> None:
        """Load a state into a session's slot. Every value is checked first (see
        `check_state`); any error leaves everything unchanged."""
        st = state if isinstance(state, CheckedState) else self.check_state(state)
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
            raise StateFileError(f"{label}: {safe(e)}") from None
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
        # What was said before the state: its transcripts (none, for a session restored in
        # place, is none).
        session.transcript = [meta["transcript"]] if meta.get("transcript") else []
        session.user_transcript = [meta["user_transcript"]] if meta.get("user_transcript") else []
        session.restored = True
