"""The hold while the echo canceller converges (duplex.streamer.echo_hold), chunk by chunk: it
acts only while the far end plays, gives up when the canceller never converges, and a stream
restart starts from the delay measured before."""

from __future__ import annotations

import argparse

import numpy as np

from duplex.streamer.echo import EchoCanceller, EchoSettings, add_arguments
from duplex.streamer.echo_hold import ConvergenceHold

SR = 16000
CHUNK = SR // 100


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Noise with a syllable-rate envelope: loud enough to count as speech (about -20 dBFS)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    t = np.arange(n) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + seed) ** 2
    return (0.1 * env * rng.standard_normal(n)).astype(np.float32)


def _run(ec: EchoCanceller, far: np.ndarray, near: np.ndarray) -> np.ndarray:
    out = np.zeros_like(near)
    for k in range(0, near.size // CHUNK * CHUNK, CHUNK):
        ec.play(far[k : k + CHUNK])
        out[k : k + CHUNK] = ec.process(near[k : k + CHUNK])
    return out


def test_a_user_heard_while_the_far_end_is_silent_passes_untouched() -> None:
    """Before any convergence: with nothing played, the held canceller gives exactly what the
    canceller without the hold gives (the user talking first is heard from the first frame)."""
    user = _speechlike(2.0, 1)
    silent = np.zeros_like(user)
    held = EchoCanceller(SR, EchoSettings(), initial_delay_s=0.05)
    free = EchoCanceller(SR, EchoSettings(hold_until_converged=False), initial_delay_s=0.05)
    a, b = _run(held, silent, user), _run(free, silent, user)
    assert np.array_equal(a, b)
    assert float(np.mean(a**2)) > 0.1 * float(np.mean(user**2))
    assert held.status().held_s == 0.0 and held.status().hold == "holding"


def test_unconverged_while_the_far_end_plays_the_mic_is_held_then_released() -> None:
    """The far end plays and the microphone hears something the canceller cannot remove (here:
    no echo of it at all, another voice): held by 40 dB, and after `limit_s` of holding the
    canceller gives up holding, so a path it never learns does not mute the user for good."""
    far = _speechlike(3.0, 2)
    near = _speechlike(3.0, 3)
    hold = ConvergenceHold(SR, CHUNK, limit_s=1.0)
    ec = EchoCanceller(SR, EchoSettings(), initial_delay_s=0.05, hold=hold)
    free = EchoCanceller(SR, EchoSettings(hold_until_converged=False), initial_delay_s=0.05)
    a, b = _run(ec, far, near), _run(free, far, near)
    held = slice(CHUNK, SR - CHUNK)
    down = 10 * np.log10(np.mean(b[held] ** 2) / np.mean(a[held] ** 2))
    assert down >= 35.0, down
    # Given up after 1 s of holding: from then on the same as without the hold.
    late = slice(round(1.1 * SR), 3 * SR)
    assert np.array_equal(a[late], b[late])
    status = ec.status()
    assert status.hold == "gave up" and not status.converged
    assert abs(status.held_s - 1.0) <= 0.02, status.held_s
    assert status.line().endswith("· not converged")


def test_no_echo_at_all_releases_the_hold_and_a_barge_in_is_heard() -> None:
    """Headphones: the far end plays and nothing comes back. After 1.5 s of playing the hold is
    off ("no echo"), so the user who talks over the model at 2 s is heard as without the hold
    (before, the hold muted the first 5 s of the model's speech)."""
    far = _speechlike(4.0, 2)
    near = np.zeros_like(far)
    near[2 * SR :] = _speechlike(2.0, 3)
    ec = EchoCanceller(SR, EchoSettings(), initial_delay_s=0.05)
    free = EchoCanceller(SR, EchoSettings(hold_until_converged=False), initial_delay_s=0.05)
    a, b = _run(ec, far, near), _run(free, far, near)
    late = slice(2 * SR, 4 * SR)
    assert np.array_equal(a[late], b[late])
    status = ec.status()
    # Held while it listened for an echo (a silent microphone: nothing lost), not longer.
    assert status.hold == "no echo" and status.held_s <= 1.55, status
    assert status.line().endswith("· no echo heard")


def test_a_long_or_faint_echo_is_not_taken_for_no_echo() -> None:
    """The test must not release the hold on a real echo: one 0.9 s late (the longest path
    searched is 1 s) and one 30 dB down both keep it holding through their first 3 s."""
    from duplex.streamer.echo_rig import Room, room_response

    far = _speechlike(3.0, 2)
    for delay, gain in ((0.9, 0.5), (0.1, 0.03)):
        room = Room(SR, delay, room_response(SR))
        near = np.concatenate([gain * room(far[k : k + CHUNK]) for k in range(0, far.size, CHUNK)])
        hold = ConvergenceHold(SR, CHUNK, limit_s=10.0)
        ec = EchoCanceller(SR, EchoSettings(), initial_delay_s=0.05, hold=hold)
        _run(ec, far, near.astype(np.float32))
        assert not hold.no_echo, (delay, gain)


def test_a_restart_starts_from_the_delay_measured_before() -> None:
    """New streams (PortAudio reopened): the delay is PortAudio's new figure plus the excess the
    measurement found over the old one, not PortAudio's figure alone; the hold waits for the
    filter to show it still fits."""
    ec = EchoCanceller(SR, EchoSettings(), initial_delay_s=0.05)
    found = iter([1600, 1600])

    class Script:
        curve = None

        def estimate(self, far, near, end):
            return next(found), 20.0

    ec.estimator = Script()
    ec._update_delay(0)
    ec._update_delay(0)
    assert ec.delay == 1600 and ec.delay_source == "measured"
    ec.hold.converged = True
    ec.restart(0.06)
    # 100 ms measured where PortAudio said 50: 60 ms now means 110 ms.
    assert ec.delay == round(0.11 * SR) and ec.delay_source == "remembered"
    assert ec.status().hold == "holding"
    assert ec.status().line().startswith("AEC on (speex) · delay 110 ms (remembered)")


def test_the_hold_is_switchable_from_the_command_line() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert EchoSettings.from_args(p.parse_args([])).hold_until_converged
    off = EchoSettings.from_args(p.parse_args(["--no-aec-hold"]))
    assert not off.hold_until_converged
    assert EchoCanceller(SR, off).hold is None
    assert "no hold while converging" in off.describe()
