"""`duplex serve` over real websockets on 127.0.0.1: correctness, auth, limits, misbehaviour.

The server runs in-process (port 0) around a tiny random model and a random small codec, except
for the SIGTERM/recording test, which runs `duplex serve` as users do. Expected outputs come from
running the same frames through the engine alone, so a batching, ordering or routing mistake in
the server shows up as a mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from duplex.apps import protocol as P
from duplex.apps.server import DuplexServer, ServeConfig
from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.engine import Engine, SamplingConfig

FS = 320


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return load("tiny"), SmallCodec(SmallCodecConfig()).eval()


def _frames(seed: int, n: int) -> list[np.ndarray]:
    """n int16 frames of a tone plus noise, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(n * FS) / 16000
    x = 0.3 * np.sin(2 * np.pi * (140 + 60 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    pcm = P.pcm_to_int16(x)
    return [pcm[i * FS : (i + 1) * FS] for i in range(n)]


@dataclass
class Stream:
    """What one session produced: per-frame tokens and audio, and the model's text."""

    tokens: list[list[int]] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)
    text: str = ""


def _solo(parts, seed: int, frames: list[np.ndarray], typed: str = "") -> Stream:
    """The reference: the same frames through an engine with this session alone."""
    model, codec = parts
    out = Stream()
    with Engine(model, codec, slots=1) as eng:
        s = eng.join(SamplingConfig(seed=seed))
        s.type_text(typed)
        for f in frames:
            res = eng.step({s: P.int16_to_pcm(f)})[s]
            out.tokens.append(res.tokens_out)
            out.pcm.append(P.pcm_to_int16(res.pcm))
            out.text += res.text
    return out


def assert_same(got: Stream, ref: Stream, text: bool = True) -> None:
    """Tokens and text must be identical. PCM comes from a batched decoder whose float
    rounding can depend on the batch, so it must match to within a few LSB (of 32767)."""
    assert len(got.tokens) == len(ref.tokens)
    for i, (a, b) in enumerate(zip(got.tokens, ref.tokens, strict=True)):
        assert a == b, f"frame {i}: tokens {a} differ from the solo run's {b}"
    if text:
        assert got.text == ref.text
    for i, (a, b) in enumerate(zip(got.pcm, ref.pcm, strict=True)):
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32)).max()
        assert diff <= 4, f"frame {i}: audio differs from the solo run by {diff}"


async def until(condition, timeout: float = 30.0, what: str = "") -> None:
    """Wait for `condition()` to hold (polled every 10 ms): an event, not a guessed sleep."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(parts, **kw) -> AsyncIterator[DuplexServer]:
    model, codec = parts
    # Every test client comes from 127.0.0.1: per-address connect rates are tested on their own.
    kw.setdefault("connect_rate", 1000.0)
    kw.setdefault("connect_burst", 1000.0)
    cfg = ServeConfig(host="127.0.0.1", port=0, ping_interval=None, model_name="tiny", **kw)
    with Engine(model, codec, slots=cfg.max_sessions) as eng:
        server = DuplexServer(eng, cfg)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
        # Stopping frees every session's slot.
        assert not eng.sessions, f"sessions left in the engine: {list(eng.sessions)}"


def _url(server: DuplexServer, **query: object) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"ws://127.0.0.1:{server.port}/" + (f"?{q}" if q else "")


class Client:
    """A minimal protocol client for tests: handshake, then typed receive helpers."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.hello: P.Hello | None = None

    async def handshake(self) -> P.Hello:
        msg = P.parse_server(await asyncio.wait_for(self.ws.recv(), 30), None)
        assert isinstance(msg, P.Hello)
        self.hello = msg
        return msg

    async def recv(self, timeout: float = 30.0):
        fmt = self.hello.format() if self.hello is not None else None
        return P.parse_server(await asyncio.wait_for(self.ws.recv(), timeout), fmt)

    async def send_frames(self, frames: list[np.ndarray], start: int = 0) -> None:
        for i, f in enumerate(frames):
            await self.ws.send(P.encode(P.Audio(start + i, f), "client"))

    async def collect(self, n: int) -> tuple[list[P.Audio], Stream, list]:
        """Receive until n AUDIO messages arrived: them, the stream they make, everything else."""
        audio, stream, other = [], Stream(), []
        while len(audio) < n:
            msg = await self.recv()
            if isinstance(msg, P.Audio):
                audio.append(msg)
                stream.pcm.append(msg.pcm)
            elif isinstance(msg, P.Tokens):
                # A frame's TOKENS precede its AUDIO.
                assert not audio or msg.frame > audio[-1].frame
                stream.tokens.append(msg.tokens_out)
            elif isinstance(msg, P.Text) and msg.stream == P.Stream.MODEL:
                stream.text += msg.text
            else:
                other.append(msg)
        return audio, stream, other

    async def expect_close(self, error: P.ErrorCode, close: int) -> str:
        """The next messages must be an ERROR with `error`, then a close with `close`."""
        message = None
        with pytest.raises(ConnectionClosed) as info:
            while True:
                msg = await self.recv()
                if isinstance(msg, P.Error):
                    assert msg.code == error, msg
                    message = msg.message
        assert message is not None, "closed without an ERROR message"
        assert info.value.rcvd is not None and info.value.rcvd.code == close, info.value
        return message


@contextlib.asynccontextmanager
async def client(server: DuplexServer, **query: object) -> AsyncIterator[Client]:
    async with connect(_url(server, **query), max_size=None, compression=None) as ws:
        c = Client(ws)
        await c.handshake()
        yield c


async def test_two_concurrent_sessions_each_equal_their_solo_run(parts) -> None:
    n = 25
    fa, fb = _frames(1, n), _frames(2, n)
    ref_a = _solo(parts, 11, fa, typed="hi")
    ref_b = _solo(parts, 22, fb)
    async with running(parts, max_sessions=4, queue_frames=64) as server:
        async with client(server, seed=11, tokens=1) as a, client(server, seed=22, tokens=1) as b:
            assert a.hello.session != b.hello.session
            assert a.hello.frame_size == FS and a.hello.accepts == [
                "PCM",
                "CODES",
                "TYPE",
                "CONTROL",
                "PING",
                "OPUS",
            ]
            await a.ws.send(P.encode(P.Text("hi"), "client"))
            await asyncio.gather(a.send_frames(fa), b.send_frames(fb))
            (aa, ta, _), (ab, tb, _) = await asyncio.gather(a.collect(n), b.collect(n))
        # Batched: steps held both sessions (a server stepping each alone would have none).
        assert server.batch_sizes[2] > 0, server.batch_sizes
    assert [m.frame for m in aa] == list(range(n)) and [m.frame for m in ab] == list(range(n))
    assert_same(ta, ref_a)
    assert_same(tb, ref_b)
    # Different seeds and inputs: the streams really are independent.
    assert not all(np.array_equal(x.pcm, y.pcm) for x, y in zip(aa[5:], ab[5:], strict=True))


async def test_token_checked_before_upgrade(parts) -> None:
    async with running(parts, max_sessions=2, token="s3cret") as server:
        for url, headers in (
            (_url(server), None),
            (_url(server, token="wrong"), None),
            (_url(server), {"Authorization": "Bearer s3cre"}),
        ):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 401
        async with connect(_url(server, token="s3cret")) as ws:
            assert isinstance(P.parse_server(await ws.recv(), None), P.Hello)
        async with connect(
            _url(server), additional_headers={"Authorization": "Bearer s3cret"}
        ) as ws:
            assert isinstance(P.parse_server(await ws.recv(), None), P.Hello)


async def test_healthz_and_bad_query(parts) -> None:
    async with running(parts, max_sessions=1, token="t") as server:
        for path, status in (("/healthz", b"200"), ("/auth?token=t&seed=x", b"400")):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert line.split()[1] == status, line


async def test_oversize_message_closes_1009(parts) -> None:
    async with (
        running(parts, max_sessions=1, max_message_bytes=4096) as server,
        client(server) as c,
    ):
        await c.ws.send(b"\x41" + bytes(5000))
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await c.recv()
        assert info.value.rcvd.code == 1009


BAD = [
    ("garbage", b"\xff\x00\x13garbage", P.ErrorCode.UNKNOWN_KIND, 1003),
    ("unknown kind", bytes([0x7E]) + bytes(8), P.ErrorCode.UNKNOWN_KIND, 1003),
    ("server kind from client", P.encode(P.Ping(1)), P.ErrorCode.UNKNOWN_KIND, 1003),
    ("empty", b"", P.ErrorCode.BAD_MESSAGE, 1008),
    ("text frame", "hello", P.ErrorCode.UNSUPPORTED, 1003),
    ("truncated frame", bytes([P.Kind.PCM, 1, 0]), P.ErrorCode.BAD_MESSAGE, 1008),
    (
        "wrong sample count",
        P.encode(P.Audio(0, np.zeros(FS - 1, np.int16)), "client"),
        P.ErrorCode.BAD_MESSAGE,
        1008,
    ),
    ("bad utf-8", bytes([P.Kind.TYPE]) + b"\xc3\x28", P.ErrorCode.BAD_MESSAGE, 1008),
    ("unknown control", bytes([P.Kind.CONTROL, 9]), P.ErrorCode.BAD_MESSAGE, 1008),
    ("state without magic", bytes([P.Kind.CONTROL, 2]) + b"nope", P.ErrorCode.BAD_MESSAGE, 1008),
    (
        "code out of range",
        P.encode(P.Codes(0, [1] * 8))[:-2] + b"\xff\xff",
        P.ErrorCode.BAD_MESSAGE,
        1008,
    ),
    ("ping too long", P.encode(P.Ping(5), "client") + b"x", P.ErrorCode.BAD_MESSAGE, 1008),
]


async def test_each_malformed_input_closes_only_its_own_session(parts) -> None:
    n = 40
    frames = _frames(3, n)
    ref = _solo(parts, 5, frames)
    async with running(parts, max_sessions=3, queue_frames=64, flood_burst=100) as server:
        async with client(server, seed=5, tokens=1) as good:

            async def stream_slowly() -> None:
                for i, f in enumerate(frames):
                    await good.ws.send(P.encode(P.Audio(i, f), "client"))
                    await asyncio.sleep(0.02)

            async def misbehave() -> list[str]:
                seen = []
                for name, payload, error, close in BAD:
                    async with client(server) as bad:
                        await bad.send_frames(_frames(9, 2))
                        await bad.ws.send(payload)
                        seen.append(f"{name}: {await bad.expect_close(error, close)}")
                async with client(server) as flood:
                    for i in range(400):
                        with contextlib.suppress(ConnectionClosed):
                            await flood.ws.send(P.encode(P.Ping(i), "client"))
                    seen.append(await flood.expect_close(P.ErrorCode.FLOOD, 1008))
                async with client(server) as controls:
                    for _ in range(20):
                        with contextlib.suppress(ConnectionClosed):
                            await controls.ws.send(P.encode(P.Control(P.Op.RESET), "client"))
                    seen.append(await controls.expect_close(P.ErrorCode.FLOOD, 1008))
                return seen

            (got, text, _), _, seen, _ = await asyncio.gather(
                good.collect(n), stream_slowly(), misbehave(), asyncio.sleep(0)
            )
            assert len(seen) == len(BAD) + 2
            assert "CONTROL requests/s" in seen[-1]
            # Each bad client got a message that says what was wrong.
            assert any("one frame is 320 int16 samples" in s for s in seen), seen
        await until(lambda: server.active == 0)
    assert [m.frame for m in got] == list(range(n))
    assert_same(text, ref)


async def test_codes_client_gets_what_a_pcm_client_gets(parts) -> None:
    """A client that runs the codec itself sends CODES; its session equals the PCM solo run."""
    _, codec = parts
    frames = _frames(6, 12)
    ref = _solo(parts, 8, frames)
    with torch.no_grad(), codec.streaming(1):
        codes = [
            codec.encode_step(torch.from_numpy(P.int16_to_pcm(f))[None, None])[0, :, 0].tolist()
            for f in frames
        ]
    async with (
        running(parts, max_sessions=2, queue_frames=64) as server,
        client(server, seed=8, tokens=1) as c,
    ):
        assert "CODES" in c.hello.accepts
        for i, k in enumerate(codes):
            await c.ws.send(P.encode(P.Codes(i, k), "client"))
        _, got, _ = await c.collect(len(frames))
    assert_same(got, ref)


async def test_full_server_1013_and_disconnect_frees_the_slot(parts) -> None:
    async with running(parts, max_sessions=1) as server:
        async with client(server) as first:
            async with connect(_url(server)) as ws:
                # No HELLO: the first message is the ERROR, then the close.
                await Client(ws).expect_close(P.ErrorCode.FULL, 1013)
            await first.send_frames(_frames(1, 2))
            await first.collect(2)
        # No waiting: the next client takes the slot the first one left.
        async with client(server) as second:
            await second.send_frames(_frames(1, 3))
            audio, _, _ = await second.collect(3)
            assert len(audio) == 3


async def test_idle_timeout_closes_4000(parts) -> None:
    async with running(parts, max_sessions=1, idle_timeout=0.5) as server, client(server) as c:
        await c.expect_close(P.ErrorCode.IDLE, 4000)


async def test_ping_stats_save_load_reset(parts) -> None:
    frames = _frames(4, 16)
    async with (
        running(parts, max_sessions=2, queue_frames=64, stats_interval=0.1) as server,
        client(server, seed=3, tokens=1) as c,
    ):
        await c.ws.send(P.encode(P.Ping(123456789), "client"))
        await c.send_frames(frames[:8])
        _, _, other = await c.collect(8)
        assert any(isinstance(m, P.Ping) and m.nonce == 123456789 for m in other)
        await c.ws.send(P.encode(P.Control(P.Op.SAVE_STATE), "client"))
        while not isinstance(msg := await c.recv(), P.State):
            pass
        blob = msg.blob
        await c.send_frames(frames[8:], 8)
        _first, text1, other = await c.collect(8)
        stats = [m.data for m in other if isinstance(m, P.Stats)]
        # Eight queued frames can take less than one stats interval: then wait for the next.
        while not stats:
            if isinstance(msg := await c.recv(), P.Stats):
                stats.append(msg.data)
        assert stats and stats[-1]["session"] == c.hello.session
        assert stats[-1]["dropped_input_frames"] == 0
        await c.ws.send(P.encode(P.Control(P.Op.LOAD_STATE, blob), "client"))
        while not isinstance(msg := await c.recv(), P.Event):
            pass
        assert msg.data == {"event": "state_loaded", "frame": 8}
        await c.send_frames(frames[8:], 8)
        _again, text2, _ = await c.collect(8)
        # Text is compared as tokens only: a state file does not carry the engine's
        # half-decoded UTF-8 bytes, so the first pieces after a load may split differently.
        assert_same(text2, text1, text=False)
        # A corrupt state is refused; the session goes on where it was.
        await c.ws.send(P.encode(P.Control(P.Op.LOAD_STATE, P.STATE_MAGIC + b"junk"), "client"))
        while not isinstance(msg := await c.recv(), P.Error):
            pass
        assert msg.code == P.ErrorCode.STATE and "LOAD_STATE failed" in msg.message
        await c.ws.send(P.encode(P.Control(P.Op.RESET), "client"))
        while not isinstance(msg := await c.recv(), P.Event):
            pass
        assert msg.data == {"event": "reset", "frame": 0}
        await c.send_frames(frames[:4])
        _, fresh, _ = await c.collect(4)
    assert_same(fresh, _solo(parts, 3, frames[:4]))


def _codec_file(path: Path) -> Path:
    from duplex.codecs.train import save_weights

    torch.manual_seed(0)
    save_weights(SmallCodec(SmallCodecConfig()), path, {"note": "random weights for tests"})
    return path


def test_refuses_public_address_without_token() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "duplex", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "DUPLEX_TOKEN"},
    )
    assert r.returncode == 2 and "without a token" in r.stderr


def test_cli_sigterm_closes_1001_and_records(tmp_path) -> None:
    from duplex.apps.replay import replay

    codec = _codec_file(tmp_path / "codec.safetensors")
    rec = tmp_path / "rec"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "duplex",
            "serve",
            "--port",
            "0",
            "--codec",
            str(codec),
            "--record",
            str(rec),
            "--token",
            "tok",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        port = json.loads(line)["port"]

        async def session() -> int:
            url = f"ws://127.0.0.1:{port}/?token=tok&seed=7"
            async with connect(url, compression=None) as ws:
                c = Client(ws)
                await c.handshake()
                await c.send_frames(_frames(6, 10))
                await c.collect(10)
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await c.recv()
                return info.value.rcvd.code

        assert asyncio.run(session()) == 1001
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    (session_dir,) = list(rec.iterdir())
    frames, mismatch, _ = replay(session_dir, verbose=False)
    assert frames == 10 and mismatch is None


def _connect_args(*argv: str) -> argparse.Namespace:
    from duplex.apps import connect as connect_cmd

    p = argparse.ArgumentParser()
    connect_cmd.add_arguments(p)
    return p.parse_args(list(argv))


async def test_connect_client_streams_a_wav_and_saves_state(parts, tmp_path, capsys) -> None:
    import soundfile as sf

    from duplex.apps import connect as connect_cmd

    wav = tmp_path / "in.wav"
    sf.write(wav, P.int16_to_pcm(np.concatenate(_frames(8, 50))), 16000, subtype="PCM_16")
    out, state = tmp_path / "out.wav", tmp_path / "end.dstate"
    # A queue deep enough that a slow (loaded) machine drops nothing: every frame is answered.
    async with running(parts, max_sessions=2, token="tok", queue_frames=64) as server:
        args = _connect_args(
            _url(server), "--token", "tok", "--input", str(wav), "--output", str(out)
        )
        args.tail, args.save_state, args.seed, args.text = 0.2, str(state), 4, "hey"
        cfg = connect_cmd.ConnectConfig(
            url=args.url, token="tok", seed=4, text="hey", tail_seconds=0.2, save_state=str(state)
        )
        code = await connect_cmd._main(cfg, args)
        printed = capsys.readouterr().out
        assert code == 0, printed
        bad = await connect_cmd._main(connect_cmd.ConnectConfig(url=args.url, token="nope"), args)
        assert bad == 4
        # The saved state is a whole, valid state of this model and codec, signed by this
        # server, at the frame the session ended (50 frames + 10 of tail), with the typed text
        # in it; and it loads back into a session.
        checked = server.engine.check_state(state)
        assert checked.meta["frame"] == 60, checked.meta["frame"]
        assert checked.meta["sampling"]["seed"] == 4
        assert checked.meta["typed"] == [] and "hey" in checked.meta["user_transcript"]
        assert server.engine.require_signed_states
    assert "[connected] session" in printed and "[stats] sent" in printed
    done = printed.strip().splitlines()[-1]
    # 50 frames of input plus 10 of tail, every one answered.
    assert done.startswith("[done] sent 60 frames, received 60"), done
    y, sr = sf.read(out, dtype="int16")
    assert sr == 16000 and 50 * FS <= y.size <= 60 * FS and np.abs(y).max() > 0
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        assert eng.join(state=state).frame == 60


def test_jitter_buffer_waits_drops_old_and_counts_underruns() -> None:
    from duplex.apps.jitter import JitterBuffer

    jb = JitterBuffer(target=2, max_frames=4)
    frame = [np.full(4, i, np.int16) for i in range(8)]
    jb.push(frame[0])
    assert jb.pull(4) is None
    jb.push(frame[1])
    assert jb.pull(4)[0] == 0 and jb.pull(4)[0] == 1
    assert not jb.pull(4).any() and jb.underruns == 1
    for f in frame[2:7]:
        jb.push(f)
    # Five waiting > max 4: dropped down to the target 2, newest kept.
    assert jb.depth == 2 and jb.dropped == 3
    assert jb.pull(4)[0] == 5


def test_connect_gives_up_on_an_unreachable_server() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "duplex",
            "connect",
            "ws://127.0.0.1:9",
            "--retries",
            "1",
            "--output",
            os.devnull,
            "--seconds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 5, r.stderr
    assert "retrying in 0.5 s" in r.stderr and "giving up after 2 tries" in r.stderr


async def test_tls_wss(parts, tmp_path) -> None:
    import ssl

    # Never skipped: the openssl command comes with the system's libssl (Debian: openssl).
    assert shutil.which("openssl"), (
        "test_tls_wss needs the openssl command (apt-get install openssl)"
    )
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    cmd += ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"]
    cmd += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(cmd, check=True, capture_output=True)
    ctx = ssl.create_default_context(cafile=str(cert))
    async with running(parts, max_sessions=1, certfile=str(cert), keyfile=str(key)) as server:
        url = f"wss://127.0.0.1:{server.port}/"
        async with connect(url, ssl=ctx) as ws:
            c = Client(ws)
            await c.handshake()
            await c.send_frames(_frames(1, 2))
            audio, _, _ = await c.collect(2)
            assert len(audio) == 2
        # A client that does not trust the certificate gets no session.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(url, ssl=ssl.create_default_context()):
                pass


async def test_connect_retries_while_the_server_is_full(parts, tmp_path, capsys) -> None:
    from duplex.apps import connect as connect_cmd

    async with running(parts, max_sessions=1, queue_frames=64) as server:
        args = _connect_args(_url(server), "--output", str(tmp_path / "o.wav"), "--seconds", "0.2")
        args.tail = 0.0
        cfg = connect_cmd.ConnectConfig(url=args.url, backoff=0.2, retries=5, max_seconds=0.2)
        async with client(server):
            task = asyncio.create_task(connect_cmd._main(cfg, args))
            # Refused twice while the only slot is taken: it retries rather than giving up.
            await until(lambda: server.refused_full >= 2, what="two refusals")
            assert not task.done()
        assert await asyncio.wait_for(task, 60) == 0
    err = capsys.readouterr().err
    assert "server busy" in err and "retrying in 0.2 s" in err


async def test_connect_reconnects_after_the_server_restarts(parts, tmp_path, capsys) -> None:
    import soundfile as sf

    from duplex.apps import connect as connect_cmd

    wav = tmp_path / "in.wav"
    sf.write(wav, P.int16_to_pcm(np.concatenate(_frames(8, 100))), 16000, subtype="PCM_16")
    model, codec = parts
    with Engine(model, codec, slots=1) as eng:
        cfg = ServeConfig(
            port=0, max_sessions=1, queue_frames=64, ping_interval=None, model_name="tiny"
        )
        first = DuplexServer(eng, cfg)
        await first.start()
        port = first.port
        args = _connect_args(f"ws://127.0.0.1:{port}/", "--input", str(wav))
        args.tail = 0.0
        ccfg = connect_cmd.ConnectConfig(url=args.url, backoff=0.2, retries=10, tail_seconds=0)
        task = asyncio.create_task(connect_cmd._main(ccfg, args))
        # Stop the first server once the client streams through it (answers went out).
        await until(lambda: any(c.frames_out >= 10 for c in first.conns), what="streaming")
        await first.stop()
        second = DuplexServer(eng, ServeConfig(**{**vars(cfg), "port": port}))
        await second.start()
        try:
            code = await asyncio.wait_for(task, 60)
        finally:
            await second.stop()
        assert not eng.sessions
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "connection lost" in captured.err
    assert captured.out.count("[connected] session") == 2
    done = captured.out.strip().splitlines()[-1]
    assert done.startswith("[done] sent 100 frames"), done


@pytest.mark.audio
async def test_connect_with_microphone_and_speaker(parts, pulse_sink, capsys) -> None:
    """The device path: PortAudio on the PulseAudio null sink as microphone and speaker."""
    from duplex.apps import connect as connect_cmd

    async with running(parts, max_sessions=1, queue_frames=64) as server:
        args = _connect_args(_url(server), "--device", "pulse", "--seconds", "2")
        cfg = connect_cmd.ConnectConfig(url=args.url, max_seconds=2.0)
        code = await asyncio.wait_for(connect_cmd._main(cfg, args), 90)
    out = capsys.readouterr().out
    assert code == 0, out
    done = out.strip().splitlines()[-1]
    # 2 s of microphone frames went out; the answers came back and were played.
    assert done.startswith("[done] sent 100 frames"), done
    received = int(done.split("received ")[1].split(";")[0])
    assert received >= 50, done
