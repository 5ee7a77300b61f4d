"""What each audio encoding on the wire costs a `duplex serve` stream: PCM, codec codes, Opus.

Two parts, both on held-out speech (espeak-ng eval voices saying requests of the domain):

1. Per frame, no server: bytes on the wire each way (-> kbps), the delay the encoding adds to
   the audio itself (Opus: libopus look-ahead plus the 48 kHz -> codec-rate resampler, measured
   by cross-correlation), and CPU per frame of the work the encoding adds (Opus: encode +
   decode, on the server and again on the client; codes: the client runs the codec's encoder,
   which the server then skips).
2. End to end: a fresh `duplex serve` (benchmarks/serve_load.py's) per encoding and one client
   streaming the speech in real time; frame latency (a frame sent until its answer is back and
   decoded) and the server process's CPU per second of audio (from /proc), so the encoding's
   cost shows next to the model's.

Writes benchmarks/results/serve_load_wire.json. Figures depend on the machine and its load
(recorded in the JSON).

    python benchmarks/serve_load_wire.py                 # 20 s per encoding, tiny model
    python benchmarks/serve_load_wire.py --seconds 10 --model default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from duplex.apps import protocol as P  # noqa: E402
from duplex.apps.wire_opus import DEFAULT_BITRATE, OpusDecoder, OpusEncoder  # noqa: E402

SR, FS = 16000, 320
TEXTS = [
    "what is seven plus two",
    "my name is dana",
    "what is my name",
    "good morning",
    "what is nine minus four",
    "call me anna",
]


def speech(seconds: float) -> np.ndarray:
    """Held-out voices saying domain requests with short pauses, int16, whole frames."""
    from duplex.data import speech as SP

    rng = np.random.default_rng(7)
    parts, n = [], 0
    while n < seconds * SR:
        u = SP.synthesize(TEXTS[len(parts) % len(TEXTS)], SP.random_voice(rng, "eval"))
        x = np.concatenate([P.pcm_to_int16(u.audio), np.zeros(SR // 4, np.int16)])
        parts.append(x)
        n += x.size
    x = np.concatenate(parts)[: int(seconds * SR)]
    return x[: x.size - x.size % FS]


def delay_ms(x: np.ndarray, y: np.ndarray) -> float:
    n = x.size - 1600
    xs, ys = x[:n].astype(np.float64), y.astype(np.float64)
    return 1000.0 * int(np.argmax([np.dot(xs, ys[k : k + n]) for k in range(1600)])) / SR


def per_frame(x: np.ndarray, bitrate: int) -> dict:
    """Part 1: bytes, added delay and CPU per frame of each encoding."""
    import torch

    from duplex.codecs import load as load_codec

    torch.set_num_threads(1)
    frames = [x[i * FS : (i + 1) * FS] for i in range(x.size // FS)]
    enc, dec = OpusEncoder(SR, FS, bitrate), OpusDecoder(SR, FS)
    t0 = time.process_time()
    packets = [enc.encode(f) for f in frames]
    t_enc = time.process_time() - t0
    t0 = time.process_time()
    y = np.concatenate([dec.decode(p) for p in packets])
    t_dec = time.process_time() - t0
    sizes = np.array([len(p) for p in packets])
    codec = load_codec("default")
    t0 = time.process_time()
    with torch.no_grad(), codec.streaming(1):
        for f in frames:
            codec.encode_step(torch.from_numpy(P.int16_to_pcm(f)).view(1, 1, FS))
    t_codes = time.process_time() - t0
    n = len(frames)
    k = int(codec.num_codebooks)
    header = 5  # kind byte + u32 frame number, every audio message
    return {
        "frames": n,
        "pcm": {
            "bytes_per_frame_up": header + 2 * FS,
            "bytes_per_frame_down": header + 2 * FS,
            "kbps_up": (header + 2 * FS) * 8 * 50 / 1000,
            "kbps_down": (header + 2 * FS) * 8 * 50 / 1000,
            "added_delay_ms": 0.0,
            "cpu_ms_per_frame_server": 0.0,
        },
        "codes": {
            "bytes_per_frame_up": header + 2 * k,
            "bytes_per_frame_down": header + 2 * FS,
            "kbps_up": (header + 2 * k) * 8 * 50 / 1000,
            "kbps_down": (header + 2 * FS) * 8 * 50 / 1000,
            "added_delay_ms": 0.0,
            "cpu_ms_per_frame_client_encoder": 1000 * t_codes / n,
            "cpu_ms_per_frame_server": -1000 * t_codes / n,
            "note": "the client runs the codec's encoder; the server skips its own",
        },
        "opus": {
            "bitrate_asked": bitrate,
            "bytes_per_frame_up": header + float(sizes.mean()),
            "bytes_per_frame_up_p95": header + float(np.percentile(sizes, 95)),
            "kbps_up": (header + float(sizes.mean())) * 8 * 50 / 1000,
            "kbps_payload_only": float(sizes.mean()) * 8 * 50 / 1000,
            "added_delay_ms": delay_ms(x, y),
            "cpu_ms_per_frame_encode": 1000 * t_enc / n,
            "cpu_ms_per_frame_decode": 1000 * t_dec / n,
            "cpu_ms_per_frame_server": 1000 * (t_enc + t_dec) / n,
            "note": "the server decodes the input and encodes the answer; the client the reverse",
        },
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream(port: int, wire: str, x: np.ndarray, codec) -> dict:
    """One client streaming `x` in real time over `wire`; latency and bytes."""
    import torch
    from websockets.asyncio.client import connect

    query = "?audio=opus" if wire == "opus" else ""
    lat: list[float] = []
    up = down = received = 0
    async with connect(f"ws://127.0.0.1:{port}/{query}", compression=None, max_size=None) as ws:
        hello = P.parse_server(await ws.recv(), None)
        fmt = hello.format()
        enc, dec = OpusEncoder(SR, FS), OpusDecoder(SR, FS)
        sent_at: dict[int, float] = {}

        async def receive() -> None:
            nonlocal down, received
            async for data in ws:
                msg = P.parse_server(data, fmt)
                if isinstance(msg, P.Opus | P.Audio):
                    down += len(data)
                    if isinstance(msg, P.Opus):
                        dec.decode(msg.packet)
                    t0 = sent_at.pop(msg.frame, None)
                    received += 1
                    if t0 is not None and msg.frame >= 50:
                        lat.append(1000.0 * (time.monotonic() - t0))

        reader = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        start = loop.time()
        frames = [x[i * FS : (i + 1) * FS] for i in range(x.size // FS)]
        ctx = codec.streaming(1) if wire == "codes" else None
        if ctx is not None:
            ctx.__enter__()
        for i, f in enumerate(frames):
            sent_at[i] = time.monotonic()
            if wire == "opus":
                data = P.encode(P.Opus(i, enc.encode(f)), "client")
            elif wire == "codes":
                with torch.no_grad():
                    codes = codec.encode_step(torch.from_numpy(P.int16_to_pcm(f)).view(1, 1, FS))
                data = P.encode(P.Codes(i, codes.view(-1).tolist()), "client")
            else:
                data = P.encode(P.Audio(i, f), "client")
            up += len(data)
            await ws.send(data)
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
        if ctx is not None:
            ctx.__exit__(None, None, None)
        deadline = loop.time() + 3.0
        while sent_at and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await ws.close()
        reader.cancel()
    n = len(frames)
    arr = np.array(lat) if lat else np.array([np.nan])
    return {
        "frames": n,
        "received": received,
        "kbps_up": up * 8 / (n * 0.02) / 1000,
        "kbps_down": down * 8 / (n * 0.02) / 1000,
        "latency_p50_ms": float(np.percentile(arr, 50)),
        "latency_p99_ms": float(np.percentile(arr, 99)),
    }


def end_to_end(x: np.ndarray, args: argparse.Namespace) -> dict:
    """Part 2: one stream per encoding through a fresh server; the server's CPU per second."""
    from serve_load import codec_for_benchmark, start_server

    from duplex.codecs import load as load_codec

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        codec_name, _ = codec_for_benchmark(Path(tmp))
        codec = load_codec(codec_name)
        for wire in ("pcm", "codes", "opus"):
            proc, port = start_server(1, codec_name, args)
            try:
                c0 = cpu_seconds(proc.pid)
                res = asyncio.run(stream(port, wire, x, codec))
                res["server_cpu_percent_of_a_core"] = (
                    100.0 * (cpu_seconds(proc.pid) - c0) / (res["frames"] * 0.02)
                )
            finally:
                proc.terminate()
                proc.wait(30)
            out[wire] = res
            print(f"  {wire:5s} {json.dumps(res)}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="speech streamed per encoding")
    ap.add_argument("--model", default="tiny", help="the server's model (tiny)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--queue-frames", type=int, default=10)
    ap.add_argument("--bitrate", type=int, default=DEFAULT_BITRATE)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load_wire"))
    args = ap.parse_args()
    x = speech(args.seconds)
    print(f"per frame ({x.size / SR:.1f} s of held-out speech):", flush=True)
    part1 = per_frame(x, args.bitrate)
    for k in ("pcm", "codes", "opus"):
        print(f"  {k:5s} {json.dumps(part1[k])}", flush=True)
    print(f"end to end (one stream per encoding, model {args.model}):", flush=True)
    part2 = end_to_end(x, args)
    result = {
        "per_frame": part1,
        "end_to_end": part2,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "threads": args.threads,
            "model": args.model,
            "seconds": args.seconds,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
