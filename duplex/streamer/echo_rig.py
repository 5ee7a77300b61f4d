"""A measured echo path on a loopback device: the echo canceller's test and benchmark rig.

On the PulseAudio null sink the microphone (the sink's monitor) hears the speaker exactly, with
no room in between. `RoomDevice` puts one there: after the canceller's tap (so the far end is
still exactly what was sent to the speaker) the output passes a delay and a short room response
before PortAudio plays it. `UserVoice` plays the user's voice as a second stream into the same
sink, so the microphone hears echo and user mixed by the sound server, as a real one would.
`run_scenario` plays the model's speech, lets the user talk over it, optionally jumps the delay
mid-session, and returns what the microphone heard, what the model heard and the measures.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from duplex.streamer.audio import DeviceAudio, _import_sounddevice
from duplex.streamer.echo import EchoCanceller, EchoSettings


def room_response(sample_rate: int, length_s: float = 0.03, seed: int = 0) -> np.ndarray:
    """A short room: a direct path at 0.5 and an exponentially decaying diffuse tail."""
    rng = np.random.default_rng(seed)
    h = np.zeros(round(length_s * sample_rate))
    h[0] = 0.5
    t = np.arange(1, h.size)
    h[1:] = 0.15 * rng.standard_normal(h.size - 1) * np.exp(-t / (0.006 * sample_rate))
    return h


class Room:
    """A streaming delay + FIR room; `delay_s` may change between blocks (a route change)."""

    def __init__(self, sample_rate: int, delay_s: float, response: np.ndarray) -> None:
        self.rate = sample_rate
        self.h = np.asarray(response, dtype=np.float64)
        self.delay_s = delay_s
        self.history = np.zeros(round(1.0 * sample_rate) + self.h.size, dtype=np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.size
        self.history = np.concatenate([self.history[n:], x.astype(np.float64)])
        d = round(self.delay_s * self.rate)
        seg = self.history[self.history.size - n - d - self.h.size + 1 : self.history.size - d]
        return np.convolve(seg, self.h, mode="valid")


class RoomDevice(DeviceAudio):
    """The device with a simulated room between its speaker tap and PortAudio."""

    def __init__(self, *args, room: Room, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.room = room

    def _out_callback(self, outdata, frames, time_info, status) -> None:
        super()._out_callback(outdata, frames, time_info, status)
        y = self.room(outdata[:, 0].astype(np.float32) / 32768.0)
        outdata[:, 0] = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)


class UserVoice:
    """The user's voice as a second output stream into the same sink, from `start()` on."""

    def __init__(self, signal: np.ndarray, sample_rate: int, device: str | int | None) -> None:
        sd = _import_sounddevice()
        self.signal = np.asarray(signal, dtype=np.float32)
        self.pos = 0
        self.playing = threading.Event()
        self.stream = sd.OutputStream(
            device=device,
            samplerate=sample_rate,
            channels=1,
            dtype="int16",
            callback=self._callback,
            latency="high",
        )

    def _callback(self, outdata, frames, time_info, status) -> None:
        y = np.zeros(frames, dtype=np.float32)
        if self.playing.is_set():
            part = self.signal[self.pos : self.pos + frames]
            y[: part.size] = part
            self.pos += frames
        outdata[:, 0] = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)

    def __enter__(self) -> UserVoice:
        self.stream.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.stop()
        self.stream.close()


@dataclass
class ScenarioResult:
    """What one run through the null sink gave (all at the codec rate)."""

    sample_rate: int
    frame_size: int
    played: np.ndarray
    mic: np.ndarray
    heard: np.ndarray
    user_start: int | None
    status: list[dict] = field(default_factory=list)
    process_ms: list[float] = field(default_factory=list)

    def erle_windows_db(self, start_s: float, end_s: float, step_s: float = 0.5) -> list[float]:
        """ERLE of each `step_s` window in [start_s, end_s)."""
        out, t = [], start_s
        while t + step_s <= end_s + 1e-9:
            out.append(self.erle_db(t, t + step_s))
            t += step_s
        return out

    def erle_db(self, start_s: float, end_s: float) -> float:
        """Echo return loss enhancement over [start_s, end_s): microphone over heard power."""
        a, b = round(start_s * self.sample_rate), round(end_s * self.sample_rate)
        mic = float(np.mean(self.mic[a:b].astype(np.float64) ** 2))
        heard = float(np.mean(self.heard[a:b].astype(np.float64) ** 2))
        return 10.0 * np.log10(mic / max(heard, 1e-12))


def find_offset(x: np.ndarray, probe: np.ndarray) -> int:
    """Where `probe` best sits in `x` (FFT cross-correlation)."""
    n = 1 << (x.size + probe.size).bit_length()
    cc = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(probe, n)), n)
    return int(np.argmax(cc[: x.size - probe.size + 1]))


def run_scenario(
    far: np.ndarray,
    user: np.ndarray | None,
    sample_rate: int,
    frame_size: int,
    settings: EchoSettings | None,
    delay_s: float = 0.1,
    user_at_s: float = 6.0,
    jump_at_s: float | None = None,
    jump_s: float = 0.05,
    response: np.ndarray | None = None,
    device: str = "pulse",
) -> ScenarioResult:
    """Play `far` as the model's voice through the room, the user's voice from `user_at_s`,
    and return what the microphone and the model heard."""
    room = Room(sample_rate, delay_s, room_response(sample_rate) if response is None else response)
    frames = far.size // frame_size
    played, mic, heard, status, proc = [], [], [], [], []
    voice = UserVoice(user, sample_rate, device) if user is not None else None
    audio = RoomDevice(sample_rate, frame_size, device, device, room=room, echo=settings)
    lead = 25
    with audio:
        if voice is not None:
            voice.__enter__()
        try:
            for i in range(lead + frames):
                f = audio.read_frame()
                j = i - lead
                t = j * frame_size / sample_rate
                if j >= 0:
                    mic.append(audio.raw_frame if audio.echo is not None else f)
                    heard.append(f)
                    if audio.echo is not None and j % 25 == 0:
                        status.append({"t": t, **audio.echo.status().as_dict()})
                if voice is not None and t >= user_at_s and not voice.playing.is_set():
                    voice.playing.set()
                if jump_at_s is not None and t >= jump_at_s:
                    room.delay_s = delay_s + jump_s
                out = far[j * frame_size : (j + 1) * frame_size] if j >= 0 else None
                if out is None or out.size < frame_size:
                    out = np.zeros(frame_size, np.float32)
                audio.write_frame(out)
                played.append(out)
        finally:
            if voice is not None:
                voice.__exit__()
        if audio.echo is not None:
            proc = list(audio.echo._proc_ms)
    mic_a = np.concatenate(mic)
    user_start = None
    if user is not None:
        user_start = find_offset(mic_a, user[: min(user.size, 2 * sample_rate)])
    return ScenarioResult(
        sample_rate,
        frame_size,
        np.concatenate(played[lead:]),
        mic_a,
        np.concatenate(heard),
        user_start,
        status,
        proc,
    )


def processed_reference(
    user: np.ndarray, start: int, length: int, sample_rate: int, settings: EchoSettings
) -> np.ndarray:
    """The user's voice alone through the same chain (no far end): what the model would have
    heard of the user with no echo at all, for the double-talk comparison."""
    x = np.zeros(length, dtype=np.float32)
    part = user[: max(0, min(user.size, length - start))]
    x[start : start + part.size] = part
    ec = EchoCanceller(sample_rate, settings)
    n = length // ec.chunk * ec.chunk
    out = np.zeros(length, dtype=np.float32)
    out[:n] = ec.process(x[:n])
    return out


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 200) -> float:
    """The largest normalised correlation of `a` with `b` shifted by at most `max_lag`."""
    return best_alignment(a, b, max_lag)[0]


def best_alignment(a: np.ndarray, b: np.ndarray, max_lag: int = 200) -> tuple[float, int]:
    """(largest normalised correlation, its lag) of `a` against `b` shifted by -max_lag..max_lag
    samples; a positive lag means `a` comes later than `b`."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    best, best_lag = -1.0, 0
    for lag in range(-max_lag, max_lag + 1):
        x = a[max(0, lag) : a.size + min(0, lag)]
        y = b[max(0, -lag) : b.size + min(0, -lag)]
        c = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
        if c > best:
            best, best_lag = c, lag
    return best, best_lag


def chain_delay(sample_rate: int, settings: EchoSettings, seconds: float = 1.0) -> int:
    """How many samples the microphone processing delays what it passes on, measured with a
    noise probe and a silent far end. Not zero: speex's preprocessor analyses overlapping
    windows and returns the previous 10 ms chunk, and WebRTC's module resamples to its own band
    rate. A comparison with the raw microphone must look that far (an 8 ms search missed
    speex's 10 ms and read 0.14 where the user was kept at 0.92)."""
    rng = np.random.default_rng(0)
    ec = EchoCanceller(sample_rate, settings)
    x = (0.05 * rng.standard_normal(round(seconds * sample_rate) // ec.chunk * ec.chunk)).astype(
        np.float32
    )
    y = ec.process(x)
    ec.close()
    return best_alignment(y, x, sample_rate // 20)[1]


def run_offline(
    far: np.ndarray,
    user: np.ndarray | None,
    sample_rate: int,
    frame_size: int,
    settings: EchoSettings,
    delay_s: float = 0.1,
    user_at_s: float = 6.0,
    jump_at_s: float | None = None,
    jump_s: float = 0.05,
    response: np.ndarray | None = None,
    initial_delay_s: float = 0.05,
    far_ahead_s: float = 0.0,
) -> ScenarioResult:
    """`run_scenario`'s session without a sound server: the same room, delay jump and user,
    mixed here frame by frame, the canceller fed exactly as the device feeds it (`play` with the
    frame handed to the speaker, `process` with the microphone). Deterministic, and independent
    of the machine's load: what the canceller's logic does, apart from real-time scheduling.
    `far_ahead_s`: the far end's counter starts that far ahead of the microphone's (as when
    the output stream runs before the input stream delivers), so the delay between the two
    counters is `delay_s - far_ahead_s`, negative when the room's delay is shorter."""
    room = Room(sample_rate, delay_s, room_response(sample_rate) if response is None else response)
    ec = EchoCanceller(sample_rate, settings, initial_delay_s=initial_delay_s)
    frames = far.size // frame_size
    voice = np.zeros(frames * frame_size, np.float32)
    user_start = None
    if user is not None:
        user_start = round(user_at_s * sample_rate)
        part = user[: max(0, voice.size - user_start)]
        voice[user_start : user_start + part.size] = part
    played = far[: frames * frame_size].astype(np.float32)
    mic = np.zeros_like(played)
    heard = np.zeros_like(played)
    status = []
    ec.play(np.zeros(round(far_ahead_s * sample_rate), np.float32))
    for j in range(frames):
        t = j * frame_size / sample_rate
        if jump_at_s is not None and t >= jump_at_s:
            room.delay_s = delay_s + jump_s
        span = slice(j * frame_size, (j + 1) * frame_size)
        ec.play(played[span])
        mic[span] = room(played[span]) + voice[span]
        heard[span] = ec.process(mic[span])
        if j % 25 == 0:
            status.append({"t": t, **ec.status().as_dict()})
    proc = list(ec._proc_ms)
    ec.close()
    return ScenarioResult(sample_rate, frame_size, played, mic, heard, user_start, status, proc)


@dataclass
class EchoCondition:
    """One session of `talk_over_echo`: whether its speaker echoes into its microphone, and
    which microphone processing runs (None: the microphone goes to the model as it is), and
    which of the users it hears (an index into `talk_over_echo`'s list)."""

    name: str
    echo: bool
    settings: EchoSettings | None
    seed: int = 0
    user: int = 0


@dataclass
class LoopRun:
    """What one session of `talk_over_echo` gave, at the codec rate, frame by frame."""

    name: str
    mic: np.ndarray
    heard: np.ndarray
    out: np.ndarray
    user_ids: list[int]
    status: dict | None = None


def talk_over_echo(
    engine,
    user: np.ndarray | list[np.ndarray],
    conditions: list[EchoCondition],
    delay_s: float = 0.1,
    response: np.ndarray | None = None,
    speaker_gain: float = 1.0,
    initial_delay_s: float = 0.05,
) -> dict[str, LoopRun]:
    """The model talking to a user through a speaker and a microphone, closed loop, one engine
    session per condition (batched, each with its own sampler, room and canceller).

    Each frame the session's microphone hears the user's voice plus, when the condition has
    echo, everything the model played so far through `delay_s` + `response` (the rig's room);
    the canceller's far end is exactly what the model played, its initial delay the PortAudio
    guess `initial_delay_s`, so it must measure the true path itself. The model then hears the
    processed microphone and answers, and its answer is the next echo: the model hears its own
    current reply, not a recording. This runs offline (no sound server): the null sink's monitor
    hears the speaker exactly, so the acoustics are the same, but the model need not keep up
    with real time on a loaded machine. `user`: one voice for every condition, or a list of
    voices that each condition picks from by its `user` index (many users batched in one run);
    all run for the longest one's length.
    """
    from duplex.streamer.engine import SamplingConfig

    rate, fs = engine.sample_rate, engine.frame_size
    h = room_response(rate) if response is None else response
    users = [user] if isinstance(user, np.ndarray) else list(user)
    n = max(-(-u.size // fs) for u in users)
    signals = np.zeros((len(users), n * fs), np.float32)
    for k, u in enumerate(users):
        signals[k, : u.size] = u
    loops = []
    for c in conditions:
        canceller = None
        if c.settings is not None:
            canceller = EchoCanceller(rate, c.settings, initial_delay_s=initial_delay_s)
        zeros = [np.zeros(n * fs, np.float32) for _ in range(3)]
        loops.append(
            _Loop(
                engine.join(SamplingConfig(seed=c.seed)),
                Room(rate, delay_s, h) if c.echo else None,
                canceller,
                np.zeros(fs, np.float32),
                LoopRun(c.name, *zeros, []),
                signals[c.user],
            )
        )
    try:
        for i in range(n):
            span = slice(i * fs, (i + 1) * fs)
            for lp in loops:
                lp.run.mic[span] = lp.signal[span] + lp.echo
                mic = lp.run.mic[span]
                lp.run.heard[span] = mic if lp.canceller is None else lp.canceller.process(mic)
            results = engine.step({lp.session: lp.run.heard[span] for lp in loops})
            for lp in loops:
                res = results[lp.session]
                out = np.asarray(res.pcm, np.float32).reshape(-1)
                lp.run.out[span] = out
                lp.run.user_ids.append(int(res.tokens_out[-1]))
                if lp.canceller is not None:
                    lp.canceller.play(out)
                if lp.room is not None:
                    # What the speaker plays now reaches the microphone from the next frame on.
                    lp.echo = lp.room(speaker_gain * out).astype(np.float32)
    finally:
        for lp in loops:
            engine.leave(lp.session)
            if lp.canceller is not None:
                lp.run.status = lp.canceller.status().as_dict()
                lp.canceller.close()
    return {lp.run.name: lp.run for lp in loops}


@dataclass
class _Loop:
    """One session's speaker-to-microphone loop in `talk_over_echo`."""

    session: object
    room: Room | None
    canceller: EchoCanceller | None
    echo: np.ndarray
    run: LoopRun
    signal: np.ndarray


def held_out_user(requests: int, seed: int, sample_rate: int) -> tuple[np.ndarray, list[str], str]:
    """A held-out user's spoken requests, as `duplex eval talk` speaks them: an eval-split voice
    (accent and variant training never used), eval-split requests, a clean microphone at the
    generator's default level, the model's turns left silent for the model to fill.
    -> (audio, the words said, the voice)."""
    from duplex.data import dialogue as G
    from duplex.data import domain as D

    rng = np.random.default_rng(seed)
    bank = G.WordBank(sample_rate)
    voice = G.user_voice(rng, "eval")
    tl = G.Timeline(bank, rng, voice, "eval", "conversations", G.Augment())
    for _ in range(requests):
        tl.request(tl._intent())
    d = tl.render()
    words = [D.normalize(w.text) for w in d.words if w.speaker == "user"]
    return d.user.astype(np.float32), words, f"{voice.accent}+{voice.variant}"


def transcript_wer(user_ids: list[int], reference: list[str]) -> tuple[float, str]:
    """Word error rate of the model's transcript of the user (its user-text tokens) against
    `reference` words -> (WER, the transcript as normalised words)."""
    from duplex.apps.eval_talk import decode_ids
    from duplex.data import domain as D
    from duplex.data.asr import word_errors

    hyp = D.normalize(decode_ids(user_ids))
    return word_errors(reference, hyp.split()) / max(1, len(reference)), hyp
