"""The closed-loop rig of the echo benchmarks (echo_rig.talk_over_echo): each session hears its
own user, plus, with echo, exactly what the model played through the room one frame later."""

from __future__ import annotations

import numpy as np
import torch

from duplex import codecs
from duplex.model.duplex_lm import load
from duplex.streamer.echo import EchoSettings
from duplex.streamer.echo_rig import EchoCondition, Room, room_response, talk_over_echo
from duplex.streamer.engine import Engine


def test_many_users_batched_each_session_hears_its_own_user_and_its_own_echo() -> None:
    torch.manual_seed(0)
    codec = codecs.load("default")
    rate, fs = codec.sample_rate, codec.frame_size
    rng = np.random.default_rng(0)
    # Two users of different lengths: every session runs for the longer one.
    users = [
        (0.2 * rng.standard_normal(30 * fs + 17)).astype(np.float32),
        (0.2 * rng.standard_normal(22 * fs)).astype(np.float32),
    ]
    conditions = [
        EchoCondition("clean 0", echo=False, settings=None, user=0),
        EchoCondition("clean 1", echo=False, settings=None, user=1),
        EchoCondition("echo 1", echo=True, settings=None, seed=3, user=1),
        EchoCondition("echo + AEC 0", echo=True, settings=EchoSettings(), seed=4, user=0),
    ]
    with Engine(load("tiny").eval(), codec, slots=len(conditions)) as engine:
        runs = talk_over_echo(engine, users, conditions, delay_s=0.1)
    n = 31 * fs
    padded = [np.pad(u, (0, n - u.size)) for u in users]
    for name, run in runs.items():
        assert run.mic.size == run.heard.size == run.out.size == n, name
        assert len(run.user_ids) == 31
    np.testing.assert_array_equal(runs["clean 0"].mic, padded[0])
    np.testing.assert_array_equal(runs["clean 1"].mic, padded[1])
    np.testing.assert_array_equal(runs["clean 1"].heard, padded[1])
    # With echo: the user plus what the model played, through the room, from the next frame.
    for name, u in (("echo 1", 1), ("echo + AEC 0", 0)):
        run = runs[name]
        assert np.abs(run.out).max() > 0, name
        room = Room(rate, 0.1, room_response(rate))
        echo = np.zeros(n, np.float32)
        for i in range(30):
            echo[(i + 1) * fs : (i + 2) * fs] = room(run.out[i * fs : (i + 1) * fs])
        np.testing.assert_allclose(run.mic, padded[u] + echo, atol=1e-6)
    # The canceller processed its session's microphone; the uncancelled one heard it as it is.
    np.testing.assert_array_equal(runs["echo 1"].heard, runs["echo 1"].mic)
    assert not np.array_equal(runs["echo + AEC 0"].heard, runs["echo + AEC 0"].mic)
    assert runs["echo + AEC 0"].status is not None and runs["echo 1"].status is None
