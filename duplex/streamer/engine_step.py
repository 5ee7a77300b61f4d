"""The three phases of one engine step, so that they can run on different threads.

`Engine.step` is `decode(think(encode(frames), codes))`; a scheduler may instead run each phase
where it likes (`duplex.streamer.codec_stage`): the codec phases touch only the codec (and the
recorders), the model phase only the model and the sessions.

- `encode` (codec): check and quantize each PCM frame to 16 bits, then one batched
  `codec.encode_step` over the rows that sent audio. Changes only the codec's encoder state.
- `think` (model): one batched `model.step` over every stepping session, sampling from each
  session's generator, and the session's bookkeeping (previous tokens, typed text, transcripts,
  frame count). Returns the codes to decode and each session's result without its audio.
- `decode` (codec): one batched `codec.decode_step` over the rows that have a frame to speak,
  the audio into each result, the frame into the session's recording, the timings into the
  engine's stats. Changes only the codec's decoder state and the recorders.

A phase that raises has changed nothing it owns when the error is a check of its input (every
input is checked before any state moves); each phase also works on any subset of a batch
(`Heard.only`, `Thought.only`), which is how a scheduler finds the one session that made a
batched phase fail without stepping the others twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from duplex.model.tokenizer import PAD
from duplex.streamer.session import FrameResult, utf8_piece

if TYPE_CHECKING:
    from duplex.streamer.engine import Engine
    from duplex.streamer.recording import Recorder
    from duplex.streamer.session import Session


def quantize16(x: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and round to the 16-bit grid (k / 32767), as float32."""
    return (np.round(np.clip(x, -1.0, 1.0) * 32767.0) / 32767.0).astype(np.float32)


@dataclass
class Heard:
    """The encoded input of one step: row `slot` of `codes` is what session `slot` heard.

    `sessions` are the PCM sessions (rows set in `active`); sessions that send codes join in
    `think`. `pcm` keeps the quantized frames for the recordings."""

    sessions: list[Session]
    codes: torch.Tensor
    pcm: torch.Tensor
    active: torch.Tensor
    ms: float = 0.0

    def only(self, session: Session) -> Heard:
        """This step's input restricted to one of its sessions."""
        active = torch.zeros_like(self.active)
        active[session.slot] = self.active[session.slot]
        mine = [s for s in self.sessions if s is session]
        return Heard(mine, self.codes, self.pcm, active, self.ms)

    @staticmethod
    def merge(parts: list[Heard], rows: int, k: int, fs: int) -> Heard:
        """One step's input from inputs encoded separately (disjoint rows)."""
        out = Heard(
            [],
            torch.zeros(rows, k, dtype=torch.long),
            torch.zeros(rows, 1, fs),
            torch.zeros(rows, dtype=torch.bool),
        )
        for p in parts:
            out.sessions += p.sessions
            out.codes[p.active] = p.codes[p.active]
            out.pcm[p.active] = p.pcm[p.active]
            out.active |= p.active
            out.ms += p.ms
        return out


@dataclass
class Said:
    """One session's result of a step before its audio is decoded, and what its recording
    needs."""

    session: Session
    result: FrameResult
    pcm_in: np.ndarray
    codes_in: bool
    user_text_in: int
    recorder: Recorder | None


@dataclass
class Thought:
    """The model's answer for one step: `codes` [rows, K, 1] to decode on the `decoding` rows
    (a session decodes once its acoustic delay has passed) and each session's result."""

    said: list[Said]
    codes: torch.Tensor
    decoding: torch.Tensor
    ms_encode: float = 0.0
    ms_model: float = 0.0
    ms_decode: float = field(default=0.0)

    def only(self, session: Session) -> Thought:
        """This step's answer restricted to one of its sessions."""
        decoding = torch.zeros_like(self.decoding)
        decoding[session.slot] = self.decoding[session.slot]
        mine = [x for x in self.said if x.session is session]
        return Thought(mine, self.codes, decoding, self.ms_encode, self.ms_model)


def encode(engine: Engine, frames: dict[Session, np.ndarray]) -> Heard:
    """Codec phase: every frame checked, then one batched encode of the rows that sent audio."""
    S, K, fs = engine.rows, engine.K, engine.frame_size
    engine.check_members(frames)
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
    if frames:
        with torch.no_grad():
            engine.codec.set_exec_mask(active)
            codes = engine.codec.encode_step(pcm)[..., 0]
    else:
        codes = torch.zeros(S, K, dtype=torch.long)
    return Heard(list(frames), codes, pcm, active, 1000 * (time.perf_counter() - t0))


def check_codes(engine: Engine, codes: dict[Session, list[int]]) -> dict[Session, torch.Tensor]:
    """The codes sessions sent (K codes each, in the codebook's range) as tensors."""
    engine.check_members(codes)
    given = {}
    for s, c in codes.items():
        c = torch.as_tensor(c, dtype=torch.long).reshape(-1)
        if c.numel() != engine.K or int(c.min()) < 0 or int(c.max()) >= engine.card:
            raise ValueError(f"session {s.id}: expected {engine.K} codes in [0, {engine.card})")
        given[s] = c
    return given


def think(engine: Engine, heard: Heard, codes: dict[Session, list[int]] | None = None) -> Thought:
    """Model phase: one batched model step for the sessions in `heard` and in `codes` (the
    user's K codes for this frame, when the client runs the codec), then sampling and each
    session's bookkeeping."""
    S, K, delay = engine.rows, engine.K, engine.delay
    codes = codes or {}
    both = set(heard.sessions) & set(codes)
    if both:
        raise ValueError(f"sessions {[s.id for s in both]} sent both audio and codes")
    if heard.codes.shape[0] != S:
        raise ValueError("the input was encoded before the batch changed size")
    given = check_codes(engine, codes)
    engine.check_members(heard.sessions)
    t1 = time.perf_counter()
    codes_in = heard.codes.clone()
    active = heard.active.clone()
    for s, c in given.items():
        codes_in[s.slot] = c
        active[s.slot] = True
    stepping = [*heard.sessions, *given]
    model = engine.model
    with torch.no_grad():
        prev_audio = torch.full((S, K), model.cfg.audio_pad, dtype=torch.long)
        prev_text = torch.full((S,), PAD, dtype=torch.long)
        prev_user = torch.full((S,), PAD, dtype=torch.long)
        for s in stepping:
            prev_audio[s.slot] = s.prev_audio
            prev_text[s.slot] = s.prev_text
            prev_user[s.slot] = s.typed.popleft() if s.typed else s.prev_user_text
        model.set_exec_mask(active)
        logits = model.step(codes_in, prev_audio, prev_text, prev_user)
        texts, audios, users = engine._sample(stepping, logits)
    out_codes = torch.zeros(S, K, 1, dtype=torch.long)
    decoding = torch.zeros(S, dtype=torch.bool)
    said = []
    for n, s in enumerate(stepping):
        r = s.slot
        text, audio, user = int(texts[n]), audios[n], int(users[n])
        s.pending_c0.append(int(audio[0]))
        if len(s.pending_c0) > delay:
            out_codes[r, 0, 0] = s.pending_c0.popleft()
            out_codes[r, 1:, 0] = audio[1:]
            decoding[r] = True
        s.prev_audio = audio.clone()
        s.prev_text = text
        s.prev_user_text = user
        piece = utf8_piece(s._text_bytes, text)
        upiece = utf8_piece(s._user_bytes, int(prev_user[r]))
        if piece:
            s.transcript.append(piece)
        if upiece:
            s.user_transcript.append(upiece)
        res = FrameResult(
            frame=s.frame,
            pcm=np.zeros(engine.frame_size, np.float32),
            text=piece,
            user_text=upiece,
            tokens_in=codes_in[r].tolist(),
            tokens_out=[*audio.tolist(), text, user],
        )
        pcm_in = heard.pcm[r, 0].numpy()
        said.append(Said(s, res, pcm_in, s in given, int(prev_user[r]), s.recorder))
        s.frame += 1
    ms = 1000 * (time.perf_counter() - t1)
    return Thought(said, out_codes, decoding, heard.ms, ms)


def decode(engine: Engine, thought: Thought) -> dict[Session, FrameResult]:
    """Codec phase: one batched decode of the rows that speak this frame; each result gets its
    audio (silence during the acoustic delay), each recording its frame."""
    t2 = time.perf_counter()
    if thought.said:
        with torch.no_grad():
            engine.codec.set_exec_mask(thought.decoding)
            pcm_out = engine.codec.decode_step(thought.codes)
    ms = 1000 * (time.perf_counter() - t2)
    results = {}
    for x in thought.said:
        r = x.session.slot
        if thought.decoding[r]:
            x.result.pcm = pcm_out[r, 0].numpy().copy()
        res = x.result
        if x.recorder is not None:
            x.recorder.frame(
                res.frame,
                x.pcm_in,
                res.pcm,
                tokens_in=res.tokens_in,
                tokens_out=res.tokens_out,
                codes_in=x.codes_in,
                user_text_in=x.user_text_in,
                text=res.text,
                ms={"encode": thought.ms_encode, "model": thought.ms_model, "decode": ms},
            )
        results[x.session] = res
    engine.stats.record(
        encode=thought.ms_encode,
        model=thought.ms_model,
        decode=ms,
        total=thought.ms_encode + thought.ms_model + ms,
    )
    return results
