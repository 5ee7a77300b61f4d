"""The echo canceller: offline properties, then measured on the PulseAudio null sink with a room
(delay + response) between speaker and microphone and the user talking over the model."""

from __future__ import annotations

import numpy as np
import pytest

from duplex.streamer.echo import (
    DelayEstimator,
    EchoCanceller,
    EchoSettings,
    SampleRing,
    library_version,
)

SR = 24000


def _speech(texts: list[str], voice: tuple[str, str], rate: int = 165) -> np.ndarray:
    from duplex.data.speech import Voice, synthesize

    v = Voice(*voice, rate=rate)
    gap = np.zeros(SR // 5, np.float32)
    parts = []
    for t in texts:
        parts += [synthesize(t, v, SR).audio, gap]
    return np.concatenate(parts).astype(np.float32)


MODEL_TEXTS = [
    "hello there, how are you doing today my friend",
    "the weather is lovely and I like to talk about numbers, one two three four",
    "please tell me what you would like to hear the next time we meet",
    "seven eight nine ten, and then we all go home for dinner",
    "I can count to twenty and I can also tell you the time of day",
    "the capital of italy is rome and the capital of spain is madrid",
]
USER_TEXT = ["what is the capital of france, and how many people live there"]


@pytest.fixture(scope="module")
def voices() -> tuple[np.ndarray, np.ndarray]:
    """The model's voice (a male US voice) and the user's (a British female one), 24 kHz."""
    far = 0.8 * _speech(MODEL_TEXTS, ("en-us", "m3"))
    user = 0.4 * _speech(USER_TEXT, ("en-gb", "f2"))
    return far, user


def test_library_loads() -> None:
    assert "libspeexdsp" in library_version("speex")
    assert "livekit" in library_version("webrtc")


def test_sample_ring_reads_absolute_ranges_and_zeros_outside() -> None:
    ring = SampleRing(10)
    ring.write(np.arange(1, 8, dtype=np.float32))
    assert ring.read(-2, 4).tolist() == [0, 0, 1, 2]
    assert ring.read(5, 4).tolist() == [6, 7, 0, 0]
    ring.write(np.arange(8, 16, dtype=np.float32))
    # 15 written, capacity 10: samples 0..4 are gone.
    assert ring.read(3, 4).tolist() == [0, 0, 6, 7]
    assert ring.read(12, 3).tolist() == [13, 14, 15]


def test_delay_estimator_finds_a_known_delay_through_a_room(voices) -> None:
    from duplex.streamer.echo_rig import Room, room_response

    far, _ = voices
    est = DelayEstimator(SR)
    for delay in (0.0123, 0.2, 0.6):
        room = Room(SR, delay, room_response(SR))
        near = np.concatenate([room(b) for b in np.split(far[: 3 * SR], 150)])
        fr, nr = SampleRing(4 * SR), SampleRing(4 * SR)
        fr.write(far[: 3 * SR])
        nr.write(near)
        found = est.estimate(fr, nr, 3 * SR)
        assert found is not None
        # The strongest arrival of this room sits within its first 3 ms (its direct path, or a
        # strong early reflection): the estimate lands there, never before the direct path.
        assert -est.decim <= found[0] - delay * SR <= 0.003 * SR, (found, delay * SR)
    # The microphone's counter 0.3 s ahead of the far end's (the streams started apart): the
    # same 0.1 s room measures -0.2 s, found in the far samples already handed out.
    room = Room(SR, 0.1, room_response(SR))
    near = np.concatenate([room(b) for b in np.split(far[: 3 * SR], 150)])
    fr, nr = SampleRing(4 * SR), SampleRing(4 * SR)
    fr.write(far[: 3 * SR])
    nr.write(near[round(0.3 * SR) :])
    found = est.estimate(fr, nr, 3 * SR - round(0.3 * SR))
    assert found is not None and -est.decim <= found[0] + 0.2 * SR <= 0.003 * SR, found
    # Silence on the far end: nothing to measure.
    quiet = SampleRing(4 * SR)
    quiet.write(np.zeros(3 * SR, np.float32))
    assert est.estimate(quiet, nr, 3 * SR) is None


def test_a_route_change_moves_the_delay_by_the_rooms_shift_not_its_peak(voices) -> None:
    """A room with two near-equal arrivals 2 ms apart, the stronger one swapping when the route
    changes by 50 ms (on the null sink the estimate's peak flipped this way between two arrivals
    of the rig's room and the realigned filter was 2.7 ms off; CI measured 16-32 dB after the
    jump). The delay must move by the route's 50 ms, not to the new highest peak (52 ms)."""
    from duplex.streamer.echo_rig import Room

    far, _ = voices
    gap = round(0.002 * SR)
    first, second = np.zeros(gap + 1), np.zeros(gap + 1)
    first[0], first[gap] = 0.5, 0.4
    second[0], second[gap] = 0.4, 0.5
    room = Room(SR, 0.1, first)
    ec = EchoCanceller(SR, EchoSettings(), initial_delay_s=0.1)
    delays = []
    for j in range(8 * 100):
        if j == 400:
            room.delay_s, room.h = 0.15, second
        block = far[j * 240 : (j + 1) * 240]
        ec.play(block)
        ec.process(room(block).astype(np.float32))
        delays.append(ec.delay)
    assert ec.delay_changes == 1, ec.delay_changes
    assert delays[399] == round(0.1 * SR), delays[399]
    assert delays[-1] - delays[399] == round(0.05 * SR), (delays[399], delays[-1])
    ec.close()


@pytest.mark.parametrize("backend", ["speex", "webrtc"])
def test_streamed_in_any_chunking_equals_one_call_and_is_causal(voices, backend) -> None:
    far, user = voices
    n = 2 * SR
    near = 0.3 * far[:n] + np.pad(user, (SR // 2, 0))[:n]
    settings = EchoSettings(backend=backend)

    def run(blocks: list[int], near_signal: np.ndarray) -> np.ndarray:
        ec = EchoCanceller(SR, settings, initial_delay_s=0.04)
        ec.far.write(far[:n])
        out, pos = [], 0
        for b in blocks:
            out.append(ec.process(near_signal[pos : pos + b]))
            pos += b
        return np.concatenate(out)

    chunk = SR // 100
    whole = run([n], near)
    rng = np.random.default_rng(0)
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(rng.integers(1, 6)) * chunk, n - sum(sizes)))
    assert np.array_equal(run(sizes, near), whole)
    # Causality: changing the microphone after 1 s leaves every earlier chunk as it was.
    changed = near.copy()
    changed[SR:] = rng.standard_normal(n - SR).astype(np.float32) * 0.1
    assert np.array_equal(run([n], changed)[:SR], whole[:SR])
    assert not np.array_equal(run([n], changed)[SR:], whole[SR:])


def test_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="10 ms"):
        EchoCanceller(22050)
    with pytest.raises(ValueError, match="at least one stage"):
        EchoCanceller(SR, EchoSettings(False, False, False))
    with pytest.raises(ValueError, match="backend"):
        EchoSettings(backend="magic")
    with pytest.raises(ValueError, match="whole 10 ms chunks"):
        EchoCanceller(SR).process(np.zeros(100, np.float32))


def test_status_line_says_what_runs() -> None:
    ec = EchoCanceller(SR, initial_delay_s=0.12)
    assert ec.status().line().startswith("AEC on (speex) · delay 120 ms (portaudio)")
    assert ec.status().line().endswith("converging (mic held)")
    no_hold = EchoCanceller(SR, EchoSettings(hold_until_converged=False), initial_delay_s=0.12)
    assert no_hold.status().line() == "AEC on (speex) · delay 120 ms (portaudio) · echo −–"
    off = EchoCanceller(SR, EchoSettings(aec=False))
    assert off.status().line() == "AEC off (NS+HPF on)"


@pytest.fixture(scope="module")
def offline(voices):
    """The null-sink session's scenario mixed offline (echo_rig.run_offline): the same room,
    user and delay jump, with no sound server, so the canceller's logic is checked whatever the
    machine's load (the null-sink test below needs real-time scheduling)."""
    from duplex.streamer.echo_rig import run_offline

    far, user = voices
    return run_offline(far[: 14 * SR], user, SR, 480, EchoSettings(), 0.1, 6.0, jump_at_s=10.5)


def test_offline_echo_goes_and_the_delay_is_measured_where_it_is(offline) -> None:
    windows = offline.erle_windows_db(2.0, 5.5)
    # The 25 dB after 2 s: the median of 0.5 s windows (the first, 2-2.5 s, measured
    # 18.8 dB: the filter restarts when the measured delay replaces PortAudio's), and every
    # window from 2.5 s on.
    assert np.median(windows) >= 25.0 and min(windows[1:]) >= 25.0, windows
    # The far end is aligned by the measured delay, the true one (100 ms, then 150 ms): at most
    # a decimation step (0.125 ms) early, or a room's early reflection (3 ms) late.
    before = [s["delay_ms"] for s in offline.status if 2.0 <= s["t"] < 10.5]
    after = [s["delay_ms"] for s in offline.status if s["t"] >= 12.5]
    assert all(s["delay_source"] == "measured" for s in offline.status if s["t"] >= 2.0)
    assert all(99.8 <= d <= 103.0 for d in before), before
    assert all(149.8 <= d <= 153.0 for d in after), after


def test_offline_the_first_reply_is_held_until_the_canceller_converges(offline) -> None:
    """The start of a session: the delay is PortAudio's guess (50 ms, the path is 100 ms + the
    room) and the filter has learnt nothing, so the echo comes through (without the hold the
    0.5 s windows read 1, 3 and 19 dB). The microphone is held while the far end plays, until
    the canceller is measured to attenuate the echo; then the hold is off for good."""
    first = offline.erle_windows_db(0.0, 1.5)
    assert min(first) >= 25.0, first
    by_t = {round(s["t"], 2): s for s in offline.status}
    # Converged within 3 s of the model starting to speak, and never held again after that.
    assert by_t[3.0]["converged"] and by_t[3.0]["hold"] == "converged", by_t[3.0]
    assert 0.5 <= by_t[3.0]["held_s"] <= 3.0, by_t[3.0]
    assert all(s["held_s"] == by_t[3.0]["held_s"] for s in offline.status if s["t"] >= 3.0)
    assert all(s["converged"] for s in offline.status if s["t"] >= 3.0)


def test_offline_the_microphone_counter_ahead_of_the_far_end(voices) -> None:
    """The streams' counters started 0.3 s apart (PulseAudio's input delivered its first
    samples late and without the monitor's backlog): the 0.1 s room is at -0.2 s between the
    counters. Before negative delays were searched, nothing was found, the hold gave up after
    5 s and the echo came through (one null-sink run in eight: user kept at 0.35-0.43, echo down
    by 0-9 dB). Now the same session converges as the plain one does."""
    from duplex.streamer.echo_rig import best_alignment, processed_reference, run_offline

    far, user = voices
    res = run_offline(far[: 10 * SR], user, SR, 480, EchoSettings(), 0.1, 6.0, far_ahead_s=0.3)
    delays = [s["delay_ms"] for s in res.status if s["t"] >= 2.0]
    assert all(-200.2 <= d <= -197.0 for d in delays), delays
    assert all(s["converged"] for s in res.status if s["t"] >= 3.0), res.status
    assert min(res.erle_windows_db(2.5, 5.5)) >= 25.0
    span = slice(res.user_start, res.user_start + user.size)
    ref = processed_reference(user, res.user_start, res.heard.size, SR, EchoSettings())
    kept, lag = best_alignment(res.heard[span], ref[span], 50)
    assert kept >= 0.9 and lag == 0, (kept, lag)


def test_offline_without_the_hold_the_first_reply_leaks(voices) -> None:
    """`--no-aec-hold`: the canceller as it was, the echo of the first second comes through."""
    from duplex.streamer.echo_rig import run_offline

    far, _ = voices
    settings = EchoSettings(hold_until_converged=False)
    res = run_offline(far[: 3 * SR], None, SR, 480, settings, 0.1)
    assert max(res.erle_windows_db(0.0, 1.0)) < 15.0
    assert all(s["hold"] == "off" and s["held_s"] == 0.0 for s in res.status)


def test_offline_the_user_is_kept_during_double_talk(offline, voices) -> None:
    from duplex.streamer.echo_rig import best_alignment, chain_delay, processed_reference

    _, user = voices
    start = offline.user_start
    span = slice(start, start + user.size)
    ref = processed_reference(user, start, offline.heard.size, SR, EchoSettings())
    kept, lag = best_alignment(offline.heard[span], ref[span], 50)
    assert kept >= 0.9 and lag == 0, (kept, lag)
    # Against the raw voice: the chain delays by its preprocessor's 10 ms, and the high-pass and
    # noise suppressor change the waveform a little; what the echo canceller takes must be small.
    raw = np.zeros_like(offline.heard)
    raw[start : start + user.size] = user[: raw.size - start]
    delay = chain_delay(SR, EchoSettings())
    assert delay == SR // 100
    kept_raw, lag = best_alignment(offline.heard[span], raw[span], SR // 20)
    assert lag == delay and kept_raw >= 0.85, (kept_raw, lag)


def test_offline_after_a_delay_jump_the_echo_goes_again_within_2_s(offline) -> None:
    # Just after the jump the old alignment is wrong: the echo comes through...
    assert np.median(offline.erle_windows_db(10.5, 11.0)) < 15.0
    # ...and 2 s later it is gone again (the target).
    after = offline.erle_windows_db(12.5, 14.0)
    assert min(after) >= 25.0, after
    # Realignment keeps the filter (it still fits the residual path): from 1.5 s after the jump
    # the attenuation is back near its level before (measured 26 50 56 55 dB; restarting the
    # filter on the move gave 14 27 38 38).
    assert np.median(offline.erle_windows_db(12.0, 14.0)) >= 40.0
    changes = [s["delay_changes"] for s in offline.status]
    assert changes[-1] >= 1


def test_one_stray_delay_estimate_does_not_move_the_alignment() -> None:
    """A double-talk burst or a periodic sound can give one wrong peak: only two estimates in a
    row that agree (within 2 ms) move the far end."""
    ec = EchoCanceller(SR, initial_delay_s=0.05)
    found = iter([2400, 2400, 7200, 2400, 7200, 7210, 7200])

    class Script:
        curve = None

        def estimate(self, far, near, end):
            return next(found), 20.0

    ec.estimator = Script()
    delays = []
    for _ in range(7):
        ec._update_delay(0)
        delays.append(ec.delay)
    assert delays == [1200, 2400, 2400, 2400, 2400, 7210, 7210], delays
    assert ec.delay_source == "measured" and ec.delay_changes == 1


@pytest.mark.audio
def test_on_the_null_sink_echo_goes_user_stays_delay_jump_recovers(pulse_sink, voices) -> None:
    """One 14 s session: the model speaks throughout; the user talks over it at 6 s; the echo
    path's delay jumps by 50 ms at 10.5 s. Measured against the issue's targets."""
    from duplex.streamer.echo_rig import (
        best_correlation,
        processed_reference,
        run_scenario,
    )

    far, user = voices
    far = far[: 14 * SR]
    settings = EchoSettings()
    res = run_scenario(far, user, SR, 480, settings, delay_s=0.1, user_at_s=6.0, jump_at_s=10.5)
    # Half-second windows: the median resists one scheduling glitch of this shared machine (an
    # underrun shifts the echo path until the delay is re-measured), the figures show it.
    windows = [round(w, 1) for w in res.erle_windows_db(2.0, 5.5)]
    track = [(s["t"], round(s["delay_ms"], 1), s["hold"]) for s in res.status]
    assert np.median(windows) >= 25.0, (windows, track)
    start = res.user_start
    assert start is not None and 5.5 * SR < start < 7.0 * SR
    span = slice(start, start + user.size)
    ref = processed_reference(user, start, res.heard.size, SR, settings)
    kept = best_correlation(res.heard[span], ref[span])
    assert kept >= 0.9, f"user's speech kept only at correlation {kept:.3f}; {track}"
    # After the jump: 2 s to re-converge, then the echo is down by 25 dB again.
    after = [round(w, 1) for w in res.erle_windows_db(12.5, 14.0)]
    assert np.median(after) >= 25.0, f"ERLE {after} dB 2 s after the delay jump; {track}"
    measured = [s["delay_ms"] for s in res.status if s["delay_source"] == "measured"]
    assert measured and max(measured) - min(measured) >= 40.0, measured


@pytest.mark.audio
def test_without_aec_the_model_hears_itself(pulse_sink, voices) -> None:
    """The same path with --no-aec: the echo reaches the model (what the canceller is for)."""
    from duplex.streamer.echo_rig import run_scenario

    far, _ = voices
    res = run_scenario(far[: 4 * SR], None, SR, 480, None, delay_s=0.1)
    echo_db = 10 * np.log10(np.mean(res.heard[2 * SR :] ** 2) / np.mean(far[: 2 * SR] ** 2))
    assert echo_db > -20.0, f"the echo was only {echo_db:.1f} dB below the model's voice"
