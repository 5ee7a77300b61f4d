"""Holding the microphone while the echo canceller has not converged yet.

An adaptive canceller starts knowing nothing: the echo path's delay is a guess from PortAudio's
reported latencies until cross-correlation has measured it (about 1.5 s of the far end playing),
and its filter then needs a fraction of a second more to learn the room. Everything the model
says in that time comes back nearly as loud as it left, and the model hears its own first reply
as the user's words (measured in the closed loop: the first reply of a session leaked at 1 and
9 dB of attenuation and the transcript diverged from there; docs/echo.md).

`ConvergenceHold` is the fallback a speakerphone uses: half duplex until the canceller is shown
to work. While the canceller has not converged and the far end is playing something whose echo
may be arriving now, the near end is attenuated by `hold_db` (the model hears near silence where
it would hear itself); when the far end is quiet the microphone passes untouched, so a user who
speaks while the model is silent is heard from the first frame. Converged means: the delay has
been measured (or remembered from before a stream restart) and the chain's output is at least
`converge_db` below the microphone over `verify_s` of chunks where the far end played and the
microphone heard something. Once converged the hold is off for good (a later delay jump is the
delay tracker's job, and a latched decision cannot mistake double talk for a lost filter). If
the canceller never converges (a path it cannot model) the hold gives up after `limit_s` of held
audio, so the user is never shut out for long.

No echo at all (headphones, or a microphone far from the speaker) is recognised sooner: once the
far end has played for `no_echo_s` and the microphone heard, over those chunks, less than
`no_echo_db` below it, nothing comes back and the hold is off for good ("no echo"). Before this,
such a session held the microphone for its first 5 s of the model's speech: over 12 held-out
users with no echo, the canceller alone cost the model's transcript 19 WER points
(benchmarks/aec_users.py --stages), most of them barge-ins and requests made just after the
model's replies that it never heard. The test needs the echo to be quieter than -35 dB over
1.5 s of playing; an echo path up to 1 s long comes back within that time and keeps the hold.
"""

from __future__ import annotations

import math

import numpy as np

# A far end below -50 dBFS (chunk power 1e-5) plays nothing worth holding the microphone for;
# a microphone below -60 dBFS hears nothing worth measuring an attenuation on.
FAR_ACTIVE_POWER = 1e-5
NEAR_AUDIBLE_POWER = 1e-6


class ConvergenceHold:
    """The convergence test and the near-end gain of one echo canceller (one 10 ms chunk at a
    time, on the canceller's thread)."""

    def __init__(
        self,
        sample_rate: int,
        chunk: int,
        hold_db: float = 40.0,
        converge_db: float = 18.0,
        verify_s: float = 0.3,
        limit_s: float = 5.0,
        unknown_span_s: float = 0.5,
        tail_s: float = 0.08,
        ahead_s: float = 0.5,
        no_echo_s: float = 1.5,
        no_echo_db: float = 35.0,
    ) -> None:
        self.rate = sample_rate
        self.chunk = chunk
        self.hold_gain = 10.0 ** (-hold_db / 20.0)
        self.converge_db = converge_db
        self.verify = max(1, round(verify_s * sample_rate / chunk))
        self.limit = max(1, round(limit_s * sample_rate / chunk))
        self.unknown_span = round(unknown_span_s * sample_rate)
        self.tail = round(tail_s * sample_rate)
        self.ahead = round(ahead_s * sample_rate)
        self.no_echo_chunks = max(1, round(no_echo_s * sample_rate / chunk))
        self.no_echo_ratio = 10.0 ** (-no_echo_db / 10.0)
        self.held_chunks = 0
        self.converged_at: int | None = None
        self.reset()

    def reset(self) -> None:
        """New streams: the delay is a guess again, so the filter must show it still fits."""
        self.converged = False
        self.gave_up = False
        self.no_echo = False
        self.gain = 1.0
        self._held_since_reset = 0
        # Far-end and microphone energy over the chunks where the far end played (no echo?).
        self._far_e = self._mic_e = 0.0
        self._far_n = 0
        self.realigned()

    def realigned(self) -> None:
        """The far end's alignment moved: what was measured before says nothing now."""
        self._en = self._eo = 0.0
        self._n = 0

    @property
    def active(self) -> bool:
        """Whether the hold may still act (not converged, no echo found, not given up)."""
        return not self.converged and not self.gave_up and not self.no_echo

    @property
    def held_s(self) -> float:
        return self.held_chunks * self.chunk / self.rate

    def attenuation_db(self) -> float | None:
        if self._n == 0 or self._en <= 0.0:
            return None
        return 10.0 * math.log10(self._en / max(self._eo, 1e-12))

    def observe(
        self, near: np.ndarray, out: np.ndarray, far: np.ndarray, delay_known: bool, at: int
    ) -> None:
        """One chunk: the microphone, the chain's output before any hold, the far end aligned
        with it (played `delay - margin` earlier); `at` is the chunk's sample index."""
        if not self.active:
            return
        pf = float(np.mean(far.astype(np.float64) ** 2))
        if pf < FAR_ACTIVE_POWER:
            return
        pn = float(np.mean(near.astype(np.float64) ** 2))
        self._far_e += pf
        self._mic_e += pn
        self._far_n += 1
        if self._far_n >= self.no_echo_chunks and self._mic_e < self.no_echo_ratio * self._far_e:
            self.no_echo = True
            return
        if pn < NEAR_AUDIBLE_POWER:
            return
        po = float(np.mean(out.astype(np.float64) ** 2))
        if self._n == 0:
            self._en, self._eo = pn, po
        else:
            # About a fifth of a second of far-end activity.
            a = 0.05
            self._en += a * (pn - self._en)
            self._eo += a * (po - self._eo)
        self._n += 1
        erle = self.attenuation_db()
        if delay_known and self._n >= self.verify and erle is not None and erle >= self.converge_db:
            self.converged = True
            self.converged_at = at

    def far_active(self, far_ring, start: int, delay: int, delay_known: bool) -> bool:
        """Whether the far end played, within the span whose echo may reach the near chunk that
        starts at sample `start`: around the measured delay (plus the room's tail), or with the
        delay still a guess anywhere from `ahead` past now (the microphone's counter may run
        ahead of the far end's, echo_delay.DelayEstimator) back to the guess plus
        `unknown_span`."""
        if delay_known:
            lo = start - delay - self.tail - self.chunk
            hi = start + self.chunk - delay + self.chunk
        else:
            lo = start - delay - self.unknown_span
            hi = start + self.chunk + self.ahead
        x = far_ring.read(lo, hi - lo)
        n = x.size // self.chunk * self.chunk
        if n == 0:
            return False
        power = np.mean(x[:n].astype(np.float64).reshape(-1, self.chunk) ** 2, axis=1)
        return bool(power.max() >= FAR_ACTIVE_POWER)

    def apply(self, out: np.ndarray, hold: bool) -> np.ndarray:
        """The chunk with the hold's gain, ramped over the chunk from the last one's (no click).
        Counts held chunks and gives up after `limit_s` of them since the last reset."""
        if hold:
            self.held_chunks += 1
            self._held_since_reset += 1
            if self._held_since_reset > self.limit:
                self.gave_up = True
                hold = False
        target = self.hold_gain if hold else 1.0
        if target == self.gain == 1.0:
            return out
        ramp = np.linspace(self.gain, target, out.size + 1, dtype=np.float32)[1:]
        self.gain = target
        return (out * ramp).astype(np.float32)
