"""Training conversations heard through a random microphone channel (duplex.data.channel): the
conversation is unchanged but for the user track, a corpus without channels is what it was,
and the echo chain leaves the user and removes the model's echo."""

from __future__ import annotations

import numpy as np

from duplex.data import conversations as C
from duplex.data import dialogue as G
from duplex.data.channel import CHAINS, Channel, apply

SR = 16000


def _pair(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    bank = G.WordBank(SR)
    d = G.generate("duplex", np.random.default_rng(seed), bank, max_turns=6)
    n = min(d.user.size, round(seconds * SR))
    return d.user[:n], d.model[:n]


def test_the_off_channel_changes_nothing_and_random_ones_vary() -> None:
    user, model = _pair(4.0, 0)
    assert np.array_equal(apply(user, model, SR, Channel.off()), np.clip(user, -1, 1))
    rng = np.random.default_rng(0)
    drawn = [Channel.random(rng) for _ in range(200)]
    assert {c.chain for c in drawn} == set(CHAINS)
    assert all(40 <= c.highpass_hz <= 300 and 3400 <= c.lowpass_hz <= 7600 for c in drawn)
    assert all((c.chain == "echo+aec") == (c.echo_delay_s > 0) for c in drawn)
    band = Channel(highpass_hz=300.0, lowpass_hz=3400.0)
    y = apply(user, model, SR, band)
    spec_x, spec_y = np.abs(np.fft.rfft(user)), np.abs(np.fft.rfft(y))
    f = np.fft.rfftfreq(user.size, 1 / SR)
    # Outside the band the user is cut by more than 10 dB; inside it is kept.
    lo, mid = f < 100, (f > 800) & (f < 2000)
    assert spec_y[lo].sum() < 0.3 * spec_x[lo].sum()
    assert 0.8 < spec_y[mid].sum() / spec_x[mid].sum() < 1.2


def test_the_echo_chain_removes_the_model_and_keeps_the_user() -> None:
    """The model talks for 6 s with a -6 dB echo 120 ms late; the user is silent for 4 s, then
    talks over it. The cancelled echo is 15 dB down after 2 s, and the user's speech comes
    through (correlation with the same user through the chain with no echo)."""
    _, model = _pair(30.0, 1)
    model = model[np.abs(model) > 0][: 6 * SR]
    model = np.pad(model, (0, 6 * SR - model.size))
    user, _ = _pair(30.0, 2)
    voice = np.zeros(6 * SR, np.float32)
    speech = user[np.abs(user) > 0][: 2 * SR]
    voice[4 * SR : 4 * SR + speech.size] = speech
    ch = Channel(chain="echo+aec", echo_delay_s=0.12, echo_db=-6.0)
    echo_only = apply(np.zeros_like(voice), model, SR, ch)
    assert echo_only.size == voice.size
    from duplex.streamer.echo_rig import Room, room_response

    room = Room(SR, 0.12, room_response(SR))
    raw = np.concatenate([room(model[k : k + 160]) for k in range(0, model.size, 160)])
    raw *= 10 ** (-6 / 20)
    late = slice(2 * SR, 4 * SR)
    erle = 10 * np.log10(np.mean(raw[late] ** 2) / max(np.mean(echo_only[late] ** 2), 1e-12))
    assert erle >= 15.0, erle
    both = apply(voice, model, SR, ch)
    alone = apply(voice, model, SR, Channel(chain="aec"))
    span = slice(4 * SR, 4 * SR + speech.size)
    c = np.dot(both[span], alone[span]) / (
        np.linalg.norm(both[span]) * np.linalg.norm(alone[span]) + 1e-12
    )
    assert c >= 0.8, c


def test_a_corpus_with_channels_changes_only_the_user_track(tmp_path) -> None:
    hours = {"duplex": 0.004}
    plain = C.build(tmp_path / "a", hours, seed=5, shard_minutes=0.25, max_turns=6, progress=False)
    heard = C.build(
        tmp_path / "b", hours, seed=5, shard_minutes=0.25, max_turns=6, progress=False, channel=1.0
    )
    assert heard["channel"] == 1.0 and "channel" not in plain
    a = C.Shard(tmp_path / "a" / plain["shards"][0]["file"])
    b = C.Shard(tmp_path / "b" / heard["shards"][0]["file"])
    convs_a, convs_b = a.meta["conversations"], b.meta["conversations"]
    assert [c["words"] for c in convs_a] == [c["words"] for c in convs_b]
    assert all(c["channel"]["chain"] == "none" for c in convs_a)
    assert all(c["channel"]["highpass_hz"] > 0 for c in convs_b)
    assert np.array_equal(a.model, b.model)
    assert not np.array_equal(a.user, b.user)
    assert a.user.shape == b.user.shape and a.user.dtype == b.user.dtype
