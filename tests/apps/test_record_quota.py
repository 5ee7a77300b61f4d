"""`duplex serve --record` under a disk budget: a session past its budget goes on unrecorded,
and what was recorded stays a valid recording that replays."""

from __future__ import annotations

import numpy as np
import pytest

from duplex.apps.replay import replay
from duplex.streamer.recording import Recorder, Recording, RecordQuota
from tests.apps.test_connect import parts  # noqa: F401  (the shipped codec: replay loads it)
from tests.apps.test_serve import _frames, client, running

FRAME_BYTES = 4 * 320


def test_recorder_stops_at_its_budget_and_stays_readable(tmp_path):
    quota = RecordQuota(total_bytes=10**9, session_bytes=50 * FRAME_BYTES)
    rec = Recorder(
        tmp_path / "r", {"config": {}}, 16000, 320, budget=lambda n: quota.charge("a", n)
    )
    x = np.zeros(320, np.float32)
    for i in range(100):
        rec.frame(i, x, x, tokens_out=[1, 2, 3])
    assert rec.stopped and 30 < rec.frames < 50
    assert quota.by_key["a"] <= 50 * FRAME_BYTES
    rec.close()
    loaded = Recording.load(tmp_path / "r")
    assert len(loaded.frames) == rec.frames
    assert loaded.audio_in.size == rec.frames * 320
    # On disk: no more than the budget (plus the header).
    size = sum(p.stat().st_size for p in (tmp_path / "r").iterdir() if p.name != "header.json")
    assert size <= 50 * FRAME_BYTES + 2 * 44


def test_total_budget_is_shared_and_counts_earlier_recordings(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "blob").write_bytes(b"x" * 1000)
    quota = RecordQuota(total_bytes=3000, session_bytes=10**9, used=RecordQuota.usage(tmp_path))
    assert quota.used == 1000
    assert quota.charge("a", 1500) and not quota.charge("b", 600) and quota.charge("b", 500)
    assert quota.used == 3000


@pytest.mark.timeout(120)
async def test_serve_session_past_its_budget_goes_on_unrecorded(parts, tmp_path):  # noqa: F811
    n = 120
    async with (
        running(
            parts,
            record=str(tmp_path),
            record_session_mb=60 * FRAME_BYTES / 2**20,
            queue_frames=256,
        ) as server,
        client(server) as c,
    ):
        await c.send_frames(_frames(1, n))
        audio, _, _ = await c.collect(n)
        assert len(audio) == n
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rec = Recording.load(directory)
    assert 30 < len(rec.frames) < 60
    frames, mismatch, _ = replay(directory, verbose=False)
    assert frames == len(rec.frames) and mismatch is None
