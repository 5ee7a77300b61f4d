"""The microphone channel of a training conversation: filters and the echo canceller's chain.

The corpus's user track is clean synthetic speech plus noise and a room (dialogue.Augment).
At inference the model hears something else: a real microphone's band and tilt, and with a
device, `duplex talk`'s canceller chain (high-pass, speex's echo canceller and preprocessor)
between the microphone and the model, often with the residue of the model's own voice. Measured
over 12 held-out users with the talk6 model (benchmarks/aec_users.py), that chain alone, with no
echo at all, cost the model's transcript of the user 10-22 WER points, speex's noise suppressor
alone 12, a high-pass alone 5: a listener trained on one channel does not generalise to another.

`Channel` is drawn per conversation (its own generator, so a corpus made without it is the same
as before) and applied to the user track before it is encoded:

- a band: a high-pass at 40-300 Hz and a low-pass at 3.4-7.6 kHz (2nd-order Butterworth);
- a tilt: a first-order shelf of -6..+6 dB across the band;
- a chain, one of: none; speex's noise suppressor; the canceller chain with the model's track
  as its far end and no echo (headphones); or the model's own voice coming back through a
  room (50-250 ms, -20..-3 dB) and cancelled by the same chain (a speaker). The target
  transcript stays the user's words: the model learns to hear the user through the chain and to
  ignore what is left of its own voice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CHAINS = ("none", "ns", "aec", "echo+aec")


@dataclass
class Channel:
    """One conversation's microphone channel (see the module doc); `off()` changes nothing."""

    highpass_hz: float = 0.0
    lowpass_hz: float = 0.0
    tilt_db: float = 0.0
    chain: str = "none"
    echo_delay_s: float = 0.0
    echo_db: float = -120.0

    @classmethod
    def off(cls) -> Channel:
        return cls()

    @classmethod
    def random(cls, rng: np.random.Generator) -> Channel:
        chain = str(rng.choice(CHAINS, p=[0.3, 0.2, 0.2, 0.3]))
        echo = chain == "echo+aec"
        return cls(
            highpass_hz=float(np.exp(rng.uniform(np.log(40.0), np.log(300.0)))),
            lowpass_hz=float(rng.uniform(3400.0, 7600.0)),
            tilt_db=float(rng.uniform(-6.0, 6.0)),
            chain=chain,
            echo_delay_s=float(rng.uniform(0.05, 0.25)) if echo else 0.0,
            echo_db=float(rng.uniform(-20.0, -3.0)) if echo else -120.0,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _band(x: np.ndarray, sr: int, ch: Channel) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    y = x.astype(np.float64)
    if ch.highpass_hz > 0:
        y = sosfilt(butter(2, ch.highpass_hz, "highpass", fs=sr, output="sos"), y)
    if 0 < ch.lowpass_hz < sr / 2:
        y = sosfilt(butter(2, ch.lowpass_hz, "lowpass", fs=sr, output="sos"), y)
    if ch.tilt_db:
        # A shelf at 1 kHz: the highs raised (or cut) by tilt_db against the lows.
        hi = sosfilt(butter(1, 1000.0, "highpass", fs=sr, output="sos"), y)
        y = y + (10 ** (ch.tilt_db / 20) - 1.0) * hi
    return y.astype(np.float32)


def _chain(user: np.ndarray, model: np.ndarray, sr: int, ch: Channel) -> np.ndarray:
    """The user track through the canceller chain in 10 ms chunks, the model's track as the far
    end (played as it is; heard back through a room when `ch.chain` is echo+aec)."""
    from duplex.streamer.echo import EchoCanceller, EchoSettings
    from duplex.streamer.echo_rig import Room, room_response

    if ch.chain == "ns":
        settings = EchoSettings(aec=False, noise_suppression=True, high_pass=False)
    else:
        # The hold is off: what leaks before convergence is what the model must learn to ignore.
        settings = EchoSettings(hold_until_converged=False)
    ec = EchoCanceller(sr, settings, initial_delay_s=0.05)
    room = Room(sr, ch.echo_delay_s, room_response(sr)) if ch.chain == "echo+aec" else None
    gain = 10 ** (ch.echo_db / 20)
    n = user.size // ec.chunk * ec.chunk
    out = user.copy()
    try:
        for k in range(0, n, ec.chunk):
            far = model[k : k + ec.chunk]
            mic = user[k : k + ec.chunk]
            if room is not None:
                mic = mic + gain * room(far)
            if settings.aec:
                ec.play(far)
            out[k : k + ec.chunk] = ec.process(mic.astype(np.float32))
    finally:
        ec.close()
    return out


def apply(user: np.ndarray, model: np.ndarray, sr: int, ch: Channel) -> np.ndarray:
    """The user track [n] as the model hears it through `ch` (the model's track [n] is the far
    end of the canceller); float32, clipped to [-1, 1]."""
    y = _band(user, sr, ch)
    if ch.chain != "none":
        y = _chain(y, model.astype(np.float32), sr, ch)
    return np.clip(y, -1.0, 1.0).astype(np.float32)
