"""Echo cancellation measured on a private PulseAudio null sink (duplex.streamer.echo_rig).

One 14 s session per canceller: the model speaks throughout, a 100 ms delay and a 30 ms room
sit between speaker and microphone, the user talks over the model from 6 s (a second stream
into the sink), the delay jumps by 50 ms at 10.5 s. Prints a table and writes
benchmarks/results/aec.json; `--part offline` mixes the same session without the sound server
(aec_offline.json: the canceller's figures whatever the machine's load).

`--part transcript`: the shipped model's transcript of a held-out user, clean, with its own
replies echoing back through the same room and cancelled, and uncancelled (closed loop, offline;
aec_transcript.json). The issue's target: echo + AEC within 5 WER points of clean.

    PYTHONPATH=. .venv/bin/python benchmarks/aec.py [--part all|null-sink|offline|transcript]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SR, FS = 24000, 480


def start_pulse() -> tuple[subprocess.Popen, Path]:
    """A private pulseaudio with a null sink; this process's environment routes to it."""
    runtime = Path(tempfile.mkdtemp(prefix="duplex-aec-bench-"))
    sink = "aec_bench"
    env = {
        "XDG_RUNTIME_DIR": str(runtime),
        "PULSE_RUNTIME_PATH": str(runtime / "pulse"),
        "PULSE_SERVER": f"unix:{runtime / 'pulse' / 'native'}",
        "PULSE_SINK": sink,
        "PULSE_SOURCE": f"{sink}.monitor",
    }
    os.environ.update(env)
    proc = subprocess.Popen(
        [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "-L",
            "module-native-protocol-unix",
            "-L",
            f"module-null-sink sink_name={sink} rate=48000",
        ],
        env={**os.environ, "HOME": str(runtime)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not (runtime / "pulse" / "native").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("pulseaudio did not start")
        time.sleep(0.05)
    subprocess.run(["pactl", "set-default-source", f"{sink}.monitor"], check=True)
    return proc, runtime


def transcript_check(requests: int = 4, seed: int = 1015, save: str | None = None) -> dict:
    """The shipped model's transcript of a held-out user: clean microphone, its own replies
    echoing back with and without cancellation (duplex.streamer.echo_rig.talk_over_echo, closed
    loop, batched in one engine). A second clean session with another sampling seed shows how
    much the WER moves by sampling alone."""
    import torch

    from duplex import codecs
    from duplex.model import duplex_lm
    from duplex.streamer.echo import EchoSettings
    from duplex.streamer.echo_rig import (
        EchoCondition,
        held_out_user,
        talk_over_echo,
        transcript_wer,
    )
    from duplex.streamer.engine import Engine

    torch.set_num_threads(1)
    codec = codecs.load("default")
    user, words, voice = held_out_user(requests, seed, codec.sample_rate)
    conditions = [
        EchoCondition("clean", echo=False, settings=None),
        EchoCondition("clean, sampling seed 1", echo=False, settings=None, seed=1),
        EchoCondition("echo + speex AEC", echo=True, settings=EchoSettings()),
        EchoCondition("echo, no AEC", echo=True, settings=None),
    ]
    t0 = time.perf_counter()
    with Engine(duplex_lm.load("default"), codec, slots=len(conditions)) as engine:
        runs = talk_over_echo(engine, user, conditions, delay_s=0.1)
    wall = time.perf_counter() - t0
    if save is not None:
        np.savez_compressed(
            save,
            user=user,
            **{f"{k}/{a}": getattr(r, a) for k, r in runs.items() for a in ("mic", "heard", "out")},
        )
    fs = codec.frame_size
    frames = lambda x: x[: x.size // fs * fs].reshape(-1, fs)  # noqa: E731
    user_f = frames(np.pad(user, (0, runs["clean"].mic.size - user.size)))
    user_on = np.sqrt(np.mean(user_f**2, axis=1)) > 1e-3
    clean_wer, clean_hyp = transcript_wer(runs["clean"].user_ids, words)
    rows = []
    for c in conditions:
        run = runs[c.name]
        wer, hyp = transcript_wer(run.user_ids, words)
        row = {
            "condition": c.name,
            "wer": round(wer, 3),
            "wer_minus_clean_points": round(100 * (wer - clean_wer), 1),
            "words_vs_clean_transcript_wer": round(
                transcript_wer(run.user_ids, clean_hyp.split())[0], 3
            ),
            "transcript": hyp,
        }
        if c.echo:
            echo_f = frames(run.mic) - user_f
            echo_rms = np.sqrt(np.mean(echo_f**2, axis=1))
            row["echo_over_user_db"] = round(
                10
                * float(
                    np.log10(np.mean(echo_f[echo_rms > 1e-3] ** 2) / np.mean(user_f[user_on] ** 2))
                ),
                1,
            )
            # Echo alone (the user silent, the model's voice coming back), after 2 s.
            alone = (echo_rms > 1e-3) & ~user_on
            alone[: round(2 * codec.frame_rate)] = False
            heard_f = frames(run.heard)
            row["erle_echo_alone_db"] = round(
                10
                * float(
                    np.log10(np.sum(frames(run.mic)[alone] ** 2) / np.sum(heard_f[alone] ** 2))
                ),
                1,
            )
        if run.status is not None:
            row["delay_ms"] = round(float(run.status["delay_ms"]), 1)
            row["attenuation_db_status"] = round(float(run.status["attenuation_db"] or 0.0), 1)
            row["delay_source"] = run.status["delay_source"]
        rows.append(row)
    return {
        "audio_s": round(user.size / codec.sample_rate, 1),
        "user_voice": voice,
        "reference": " ".join(words),
        "reference_words": len(words),
        "requests": requests,
        "seed": seed,
        "room": {"delay_s": 0.1, "response": "echo_rig.room_response (30 ms)", "speaker_gain": 1.0},
        "wall_s": round(wall, 1),
        "rows": rows,
    }


def print_transcript(result: dict) -> None:
    print(
        f"held-out user ({result['user_voice']}), {result['reference_words']} words, "
        f"{result['audio_s']} s; reference: {result['reference']}"
    )
    print(
        f"{'condition':24s} {'WER':>6s} {'- clean':>8s} {'vs clean':>9s} "
        f"{'echo/user':>9s} {'ERLE':>6s}"
    )
    for r in result["rows"]:
        eu = f"{r['echo_over_user_db']:.1f}" if "echo_over_user_db" in r else "-"
        erle = f"{r['erle_echo_alone_db']:.1f}" if "erle_echo_alone_db" in r else "-"
        print(
            f"{r['condition']:24s} {100 * r['wer']:5.1f}% {r['wer_minus_clean_points']:+7.1f} "
            f"{100 * r['words_vs_clean_transcript_wer']:8.1f}% {eu:>9s} {erle:>6s}"
        )
        print(f"    {r['transcript']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "null-sink", "offline", "transcript"], default="all")
    p.add_argument("--requests", type=int, default=4, help="held-out requests (transcript)")
    p.add_argument("--save", help="transcript: write each session's audio here (.npz)")
    args = p.parse_args()
    results = Path(__file__).parent / "results"
    if args.part in ("all", "transcript"):
        result = transcript_check(args.requests, save=args.save)
        print_transcript(result)
        (results / "aec_transcript.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {results / 'aec_transcript.json'}")
    if args.part in ("all", "offline"):
        null_sink(offline=True)
    if args.part in ("all", "null-sink"):
        null_sink()


def null_sink(offline: bool = False) -> None:
    """The cancellers on the null sink (aec.json), or with `offline` the same scenario mixed
    without a sound server (echo_rig.run_offline; aec_offline.json): the canceller's own
    figures, free of the real-time scheduling a loaded machine breaks."""
    from duplex.streamer.echo import EchoSettings
    from duplex.streamer.echo_rig import (
        best_alignment,
        best_correlation,
        chain_delay,
        processed_reference,
        run_offline,
        run_scenario,
    )
    from tests.streamer.test_echo import MODEL_TEXTS, USER_TEXT, _speech

    far = (0.8 * _speech(MODEL_TEXTS, ("en-us", "m3")))[: 14 * SR]
    user = 0.4 * _speech(USER_TEXT, ("en-gb", "f2"))
    proc, runtime = (None, None) if offline else start_pulse()
    rows = []
    try:
        for name, settings in (
            ("speex (default)", EchoSettings()),
            ("webrtc AEC3", EchoSettings(backend="webrtc")),
            ("no AEC (NS+HPF)", EchoSettings(aec=False)),
        ):
            run = run_offline if offline else run_scenario
            res = run(far, user, SR, FS, settings, 0.1, 6.0, jump_at_s=10.5)
            start = res.user_start
            span = slice(start, start + user.size)
            ref = processed_reference(user, start, res.heard.size, SR, settings)
            raw_user = np.zeros_like(res.heard)
            raw_user[start : start + user.size] = user[: res.heard.size - start]
            raw_corr, raw_lag = best_alignment(res.heard[span], raw_user[span], SR // 20)
            proc_ms = np.asarray(res.process_ms) if res.process_ms else np.zeros(1)
            rows.append(
                {
                    "canceller": name,
                    "settings": settings.as_dict(),
                    "erle_2_5.5s_windows_db": [round(w, 1) for w in res.erle_windows_db(2, 5.5)],
                    "erle_after_jump_windows_db": [
                        round(w, 1) for w in res.erle_windows_db(10.5, 14.0)
                    ],
                    "double_talk_corr_vs_processed_clean": round(
                        best_correlation(res.heard[span], ref[span]), 3
                    ),
                    # Searched over 50 ms: the chain delays the user by its own latency.
                    "double_talk_corr_vs_raw_user": round(raw_corr, 3),
                    "double_talk_lag_vs_raw_user_ms": round(1000 * raw_lag / SR, 2),
                    "chain_delay_ms": round(1000 * chain_delay(SR, settings) / SR, 2),
                    "process_ms_per_10ms_p50": round(float(np.median(proc_ms)), 3),
                    "process_ms_per_10ms_p99": round(float(np.percentile(proc_ms, 99)), 3),
                    "cpu_percent_of_core": round(float(np.mean(proc_ms)) / 10.0 * 100, 1),
                    "delays_ms": sorted({round(s["delay_ms"] or 0.0, 1) for s in res.status}),
                }
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
            shutil.rmtree(runtime, ignore_errors=True)
    print(
        f"{'canceller':18s} {'ERLE 2-5.5s med':>15s} {'after jump':>28s} "
        f"{'DT corr':>8s} {'raw':>6s} {'delay ms':>8s} {'ms/10ms p50/p99':>16s} {'CPU%':>5s}"
    )
    for r in rows:
        print(
            f"{r['canceller']:18s} {np.median(r['erle_2_5.5s_windows_db']):15.1f} "
            f"{' '.join(f'{w:.0f}' for w in r['erle_after_jump_windows_db']):>28s} "
            f"{r['double_talk_corr_vs_processed_clean']:8.3f} "
            f"{r['double_talk_corr_vs_raw_user']:6.3f} {r['chain_delay_ms']:8.2f} "
            f"{r['process_ms_per_10ms_p50']:7.2f}/{r['process_ms_per_10ms_p99']:<7.2f} "
            f"{r['cpu_percent_of_core']:5.1f}"
        )
    out = Path(__file__).parent / "results" / ("aec_offline.json" if offline else "aec.json")
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
