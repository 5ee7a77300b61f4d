"""Echo cancellation measured on a private PulseAudio null sink (duplex.streamer.echo_rig).

One 14 s session per canceller: the model speaks throughout, a 100 ms delay and a 30 ms room
sit between speaker and microphone, the user talks over the model from 6 s (a second stream
into the sink), the delay jumps by 50 ms at 10.5 s. Prints a table and writes
benchmarks/results/aec.json; `--part offline` mixes the same session without the sound server
(aec_offline.json: the canceller's figures whatever the machine's load).

`--part transcript`: the shipped model's transcript of a held-out user, clean, with its own
replies echoing back through the same room and cancelled, and uncancelled (closed loop, offline;
aec_transcript.json). The issue's target: echo + AEC within 5 WER points of clean, compared
seed by seed (`--seeds 0,1`: a clean and a cancelled session per sampling seed; plus, for the
first seed, uncancelled and cancelled without the start-of-session hold). `--user-seed` picks
another held-out conversation, `--out` the results file.

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


def transcript_check(
    requests: int = 4,
    seed: int = 1015,
    save: str | None = None,
    seeds: tuple[int, ...] = (0, 1),
    baselines: bool = True,
    chain: bool = False,
) -> dict:
    """The shipped model's transcript of a held-out user: clean microphone, its own replies
    echoing back with and without cancellation (duplex.streamer.echo_rig.talk_over_echo, closed
    loop, batched in one engine). For each sampling seed a clean session and an echo + AEC one
    (the default: the microphone held while the canceller converges), so the WER difference is
    taken seed by seed; with `baselines`, for the first seed also the echo uncancelled and
    cancelled without the hold (the canceller before the hold existed); with `chain`, for each
    seed a session without echo whose microphone still goes through the canceller's chain
    (high-pass, speex with the model's own output as far end, preprocessor, its 10 ms delay):
    what the processing alone does to the transcript."""
    import torch

    from duplex import codecs
    from duplex.model import duplex_lm
    from duplex.streamer.echo import EchoSettings
    from duplex.streamer.echo_rig import (
        EchoCondition,
        held_out_user,
        talk_over_echo,
    )
    from duplex.streamer.engine import Engine

    torch.set_num_threads(1)
    codec = codecs.load("default")
    user, words, voice = held_out_user(requests, seed, codec.sample_rate)
    conditions = []
    for s in seeds:
        conditions += [
            EchoCondition(f"clean, seed {s}", echo=False, settings=None, seed=s),
            EchoCondition(
                f"echo + speex AEC, seed {s}", echo=True, settings=EchoSettings(), seed=s
            ),
        ]
        if chain:
            conditions.append(
                EchoCondition(f"no echo, speex chain, seed {s}", False, EchoSettings(), seed=s)
            )
    if baselines:
        s = seeds[0]
        conditions += [
            EchoCondition(
                f"echo + AEC no hold, seed {s}",
                echo=True,
                settings=EchoSettings(hold_until_converged=False),
                seed=s,
            ),
            EchoCondition(f"echo, no AEC, seed {s}", echo=True, settings=None, seed=s),
        ]
    t0 = time.perf_counter()
    with Engine(duplex_lm.load("default"), codec, slots=len(conditions)) as engine:
        runs = talk_over_echo(engine, user, conditions, delay_s=0.1)
    wall = time.perf_counter() - t0
    if save is not None:
        arrays = {
            f"{k}/{a}": getattr(r, a) for k, r in runs.items() for a in ("mic", "heard", "out")
        }
        ids = {f"{k}/user_ids": np.asarray(r.user_ids) for k, r in runs.items()}
        np.savez_compressed(save, user=user, **arrays, **ids)
    result = transcript_rows(runs, conditions, user, words, codec.frame_size, codec.frame_rate)
    return {
        "audio_s": round(user.size / codec.sample_rate, 1),
        "user_voice": voice,
        "reference": " ".join(words),
        "reference_words": len(words),
        "requests": requests,
        "seed": seed,
        "sampling_seeds": list(seeds),
        "room": {"delay_s": 0.1, "response": "echo_rig.room_response (30 ms)", "speaker_gain": 1.0},
        "wall_s": round(wall, 1),
        "rows": result,
    }


def transcript_rows(runs, conditions, user, words, fs, frame_rate) -> list[dict]:
    """One row per condition: WER against the reference and against the clean session of the
    same sampling seed; for echo conditions the echo level and what the model heard of it."""
    from duplex.streamer.echo_rig import transcript_wer

    frames = lambda x: x[: x.size // fs * fs].reshape(-1, fs)  # noqa: E731
    user_f = frames(np.pad(user, (0, runs[conditions[0].name].mic.size - user.size)))
    user_on = np.sqrt(np.mean(user_f**2, axis=1)) > 1e-3
    clean = {
        c.seed: transcript_wer(runs[c.name].user_ids, words)
        for c in conditions
        if not c.echo and c.settings is None
    }
    rows = []
    for c in conditions:
        run = runs[c.name]
        wer, hyp = transcript_wer(run.user_ids, words)
        clean_wer, clean_hyp = clean[c.seed]
        row = {
            "condition": c.name,
            "seed": c.seed,
            "wer": round(wer, 3),
            # Against the clean session of the same sampling seed.
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
            alone[: round(2 * frame_rate)] = False
            mic_f, heard_f = frames(run.mic), frames(run.heard)
            row["erle_echo_alone_db"] = _erle(mic_f, heard_f, alone)
            # The start of the session (what the hold is for): echo alone in the first 5 s.
            first = (echo_rms > 1e-3) & ~user_on
            first[round(5 * frame_rate) :] = False
            row["erle_echo_alone_first_5s_db"] = _erle(mic_f, heard_f, first)
        if run.status is not None:
            row["delay_ms"] = round(float(run.status["delay_ms"]), 1)
            row["attenuation_db_status"] = round(float(run.status["attenuation_db"] or 0.0), 1)
            row["delay_source"] = run.status["delay_source"]
            row["hold"] = run.status.get("hold")
            row["held_s"] = round(float(run.status.get("held_s", 0.0)), 2)
        rows.append(row)
    return rows


def _erle(mic_f: np.ndarray, heard_f: np.ndarray, mask: np.ndarray) -> float | None:
    """Microphone over heard power on the masked frames, dB (None: no such frame)."""
    if not mask.any():
        return None
    ratio = np.sum(mic_f[mask] ** 2) / max(float(np.sum(heard_f[mask] ** 2)), 1e-12)
    return round(10 * float(np.log10(ratio)), 1)


def print_transcript(result: dict) -> None:
    print(
        f"held-out user ({result['user_voice']}), {result['reference_words']} words, "
        f"{result['audio_s']} s; reference: {result['reference']}"
    )
    print(
        f"{'condition':30s} {'WER':>6s} {'- clean':>8s} {'vs clean':>9s} "
        f"{'echo/user':>9s} {'ERLE':>6s} {'0-5s':>6s} {'held':>5s}"
    )

    def fmt(r: dict, key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.1f}"

    for r in result["rows"]:
        print(
            f"{r['condition']:30s} {100 * r['wer']:5.1f}% {r['wer_minus_clean_points']:+7.1f} "
            f"{100 * r['words_vs_clean_transcript_wer']:8.1f}% {fmt(r, 'echo_over_user_db'):>9s} "
            f"{fmt(r, 'erle_echo_alone_db'):>6s} {fmt(r, 'erle_echo_alone_first_5s_db'):>6s} "
            f"{fmt(r, 'held_s'):>5s}"
        )
        print(f"    {r['transcript']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "null-sink", "offline", "transcript"], default="all")
    p.add_argument("--requests", type=int, default=4, help="held-out requests (transcript)")
    p.add_argument("--save", help="transcript: write each session's audio here (.npz)")
    p.add_argument(
        "--seeds", default="0,1", help="transcript: sampling seeds, comma-separated (default 0,1)"
    )
    p.add_argument(
        "--user-seed", type=int, default=1015, help="transcript: the held-out conversation's seed"
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="transcript: only clean and echo + AEC sessions (no uncancelled, no hold-less one)",
    )
    p.add_argument(
        "--chain",
        action="store_true",
        help="transcript: also a session per seed without echo but through the canceller",
    )
    p.add_argument("--out", help="transcript: results file name (default aec_transcript.json)")
    args = p.parse_args()
    results = Path(__file__).parent / "results"
    if args.part in ("all", "transcript"):
        seeds = tuple(int(s) for s in args.seeds.split(","))
        result = transcript_check(
            args.requests, args.user_seed, args.save, seeds, not args.no_baselines, args.chain
        )
        print_transcript(result)
        out = results / (args.out or "aec_transcript.json")
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
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
            ("speex, no hold", EchoSettings(hold_until_converged=False)),
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
                    # The start of the session (PortAudio's delay guess, the filter learning).
                    "erle_0_2s_windows_db": [round(w, 1) for w in res.erle_windows_db(0, 2)],
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
                    "converged_at_s": next(
                        (s["t"] for s in res.status if s.get("converged")), None
                    ),
                    "held_s": res.status[-1].get("held_s", 0.0) if res.status else 0.0,
                }
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
            shutil.rmtree(runtime, ignore_errors=True)
    print(
        f"{'canceller':18s} {'0-2 s':>14s} {'ERLE 2-5.5s med':>15s} {'after jump':>28s} "
        f"{'DT corr':>8s} {'raw':>6s} {'delay ms':>8s} {'ms/10ms p50/p99':>16s} {'CPU%':>5s}"
    )
    for r in rows:
        print(
            f"{r['canceller']:18s} {' '.join(f'{w:.0f}' for w in r['erle_0_2s_windows_db']):>14s} "
            f"{np.median(r['erle_2_5.5s_windows_db']):15.1f} "
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
