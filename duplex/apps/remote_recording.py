"""Client-side recordings of `duplex connect --record DIR`.

A recording made by the client has the same layout as one made by `duplex talk` or `duplex serve`
(see `duplex.streamer.recording`), so `duplex replay DIR` shows it and `--check` re-runs it on a
local copy of the model. It is built from what crosses the wire: the PCM frame the client sent,
the server's TOKENS for that frame (the client asks for them with `?tokens=1`), its TEXT and its
AUDIO. Frames the server dropped were never stepped, so they are not in the recording either:
its frames are exactly the steps the model took. Typed text is placed at the frame the server
reports in its "typed" event.

One recording holds one timeline of one server session. A new timeline (a reconnect, which gets a
new server session; a reset; a state loaded mid-conversation) starts the next segment in a
sibling directory: DIR, DIR-1, DIR-2, ... A state loaded before the first frame is written into
the segment as `initial.dstate`, as `duplex talk --state` does.

With an echo canceller on the microphone, what was sent is the cancelled audio; the raw
microphone never crosses the wire, so the audio source hands it over (`raw_mic`) just before the
frame is sent, and it goes to `mic.wav`, frame for frame beside `in.wav`, with an `echo` control
event giving the settings, as in a `duplex talk` recording: a session can then be re-checked
with other canceller settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from duplex.apps import protocol as P
from duplex.streamer.recording import Recorder, recording_header


class RemoteRecorder:
    """Writes the conversation seen by one `duplex connect` as one or more recordings."""

    def __init__(self, directory: str | os.PathLike, url: str) -> None:
        self.base = Path(directory)
        if (self.base / "events.jsonl").exists():
            raise FileExistsError(f"{self.base} already holds a recording; choose another --record")
        self.url = url
        self.segments: list[Path] = []
        self.recorder: Recorder | None = None
        self.hello: P.Hello | None = None
        self.state: bytes | None = None
        self.frame = 0
        self.sent: dict[int, np.ndarray] = {}
        self.tokens: dict[int, tuple[list[int], list[int]]] = {}
        self.texts: dict[int, dict[str, str]] = {}
        self.raw: dict[int, np.ndarray] = {}
        self._raw_next: np.ndarray | None = None
        self.echo_settings: dict[str, Any] | None = None
        self.missing_tokens = 0

    def begin(self, hello: P.Hello, state: bytes | None = None, frame: int = 0) -> Path:
        """Start a segment for server session `hello` at session frame `frame`; returns its
        directory. The directory is written with the segment's first frame or event, so a
        timeline that records nothing (reset before the first frame) leaves nothing behind."""
        self.close()
        # Frames already sent stay pending: the server answers a frame after an event (a reset,
        # a loaded state) only if it stepped it on the new timeline.
        self.hello, self.state, self.frame = hello, state, frame
        return self._directory()

    def _directory(self) -> Path:
        n = len(self.segments)
        return self.base if n == 0 else self.base.with_name(f"{self.base.name}-{n}")

    def _open(self) -> Recorder:
        """The current segment's recorder, created on first use."""
        if self.recorder is not None:
            return self.recorder
        hello, directory = self.hello, self._directory()
        sampling = hello.extra.get("sampling") or {"seed": hello.extra.get("seed")}
        header = recording_header(
            model=hello.model,
            codec=hello.codec,
            sampling=sampling,
            model_fingerprint=hello.model_fingerprint,
            codec_fingerprint=hello.codec_fingerprint,
            frame_rate=hello.frame_rate,
            source="connect",
            server=self.url,
            server_session=hello.session,
        )
        self.recorder = Recorder(directory, header, hello.sample_rate, hello.frame_size)
        if self.state is not None:
            tmp = directory / ".initial.dstate.tmp"
            tmp.write_bytes(self.state)
            os.replace(tmp, directory / "initial.dstate")
        self.segments.append(directory)
        if self.echo_settings is not None:
            self.recorder.control(self.frame, "echo", **self.echo_settings)
        return self.recorder

    def raw_mic(self, pcm: np.ndarray, settings: dict[str, Any]) -> None:
        """The raw microphone frame (float) behind the next frame sent, and the echo
        canceller's settings: the source calls this right before the client sends the frame."""
        self._raw_next = P.pcm_to_int16(pcm)
        self.echo_settings = settings

    def sent_frame(self, seq: int, pcm: np.ndarray) -> None:
        """The int16 frame `seq` as sent (what the model hears if the server steps it)."""
        self.sent[seq] = pcm
        if self._raw_next is not None:
            self.raw[seq] = self._raw_next
            self._raw_next = None

    def received(self, msg: Any) -> None:
        """Fold in one server message."""
        if self.hello is None:
            return
        if isinstance(msg, P.Tokens):
            self.tokens[msg.frame] = (msg.tokens_in, msg.tokens_out)
        elif isinstance(msg, P.Text):
            key = "text" if msg.stream == P.Stream.MODEL else "user_text"
            pieces = self.texts.setdefault(msg.frame, {})
            pieces[key] = pieces.get(key, "") + msg.text
        elif isinstance(msg, P.Audio):
            self._answer(msg.frame, msg.pcm)
        elif isinstance(msg, P.Event):
            self._event(msg.data)

    def _answer(self, seq: int, out: np.ndarray) -> None:
        # Frames sent before `seq` that never came back were dropped by the server: forget them.
        for k in [k for k in self.sent if k < seq]:
            del self.sent[k]
            self.tokens.pop(k, None)
            self.texts.pop(k, None)
            self.raw.pop(k, None)
        pcm_in = self.sent.pop(seq, None)
        raw = self.raw.pop(seq, None)
        tokens = self.tokens.pop(seq, None)
        texts = self.texts.pop(seq, {})
        if pcm_in is None:
            return
        if tokens is None:
            # Without the server's tokens the frame cannot be checked; keep the audio anyway.
            self.missing_tokens += 1
            tokens = ([], [])
        recorder = self._open()
        if raw is not None:
            recorder.mic(P.int16_to_pcm(raw))
        recorder.frame(
            self.frame,
            P.int16_to_pcm(pcm_in),
            P.int16_to_pcm(out),
            tokens_in=tokens[0],
            tokens_out=tokens[1],
            codes_in=False,
            text=texts.get("text", ""),
            user_text=texts.get("user_text", ""),
        )
        self.frame += 1

    def _event(self, data: dict[str, Any]) -> None:
        event = data.get("event")
        if event == "typed":
            self._open().control(int(data["frame"]), "type", text=str(data.get("text", "")))

    def timeline_changed(self, frame: int, state: bytes | None) -> None:
        """A reset (`state` None) or a state load moved the session to `frame`."""
        if self.hello is not None:
            self.begin(self.hello, state, frame)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
