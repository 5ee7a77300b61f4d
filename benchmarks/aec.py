"""Echo cancellation measured on a private PulseAudio null sink (duplex.streamer.echo_rig).

One 14 s session per canceller: the model speaks throughout, a 100 ms delay and a 30 ms room
sit between speaker and microphone, the user talks over the model from 6 s (a second stream
into the sink), the delay jumps by 50 ms at 10.5 s. Prints a table and writes
benchmarks/results/aec.json.

    .venv/bin/python benchmarks/aec.py
"""

from __future__ import annotations

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


def main() -> None:
    from duplex.streamer.echo import EchoSettings
    from duplex.streamer.echo_rig import best_correlation, processed_reference, run_scenario
    from tests.streamer.test_echo import MODEL_TEXTS, USER_TEXT, _speech

    far = (0.8 * _speech(MODEL_TEXTS, ("en-us", "m3")))[: 14 * SR]
    user = 0.4 * _speech(USER_TEXT, ("en-gb", "f2"))
    proc, runtime = start_pulse()
    rows = []
    try:
        for name, settings in (
            ("speex (default)", EchoSettings()),
            ("webrtc AEC3", EchoSettings(backend="webrtc")),
            ("no AEC (NS+HPF)", EchoSettings(aec=False)),
        ):
            res = run_scenario(far, user, SR, FS, settings, 0.1, 6.0, jump_at_s=10.5)
            start = res.user_start
            span = slice(start, start + user.size)
            ref = processed_reference(user, start, res.heard.size, SR, settings)
            raw_user = np.zeros_like(res.heard)
            raw_user[start : start + user.size] = user[: res.heard.size - start]
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
                    "double_talk_corr_vs_raw_user": round(
                        best_correlation(res.heard[span], raw_user[span]), 3
                    ),
                    "process_ms_per_10ms_p50": round(float(np.median(proc_ms)), 3),
                    "process_ms_per_10ms_p99": round(float(np.percentile(proc_ms, 99)), 3),
                    "cpu_percent_of_core": round(float(np.mean(proc_ms)) / 10.0 * 100, 1),
                    "delays_ms": sorted({round(s["delay_ms"] or 0.0, 1) for s in res.status}),
                }
            )
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(runtime, ignore_errors=True)
    print(
        f"{'canceller':18s} {'ERLE 2-5.5s med':>15s} {'after jump':>28s} "
        f"{'DT corr':>8s} {'raw':>6s} {'ms/10ms p50/p99':>16s} {'CPU%':>5s}"
    )
    for r in rows:
        print(
            f"{r['canceller']:18s} {np.median(r['erle_2_5.5s_windows_db']):15.1f} "
            f"{' '.join(f'{w:.0f}' for w in r['erle_after_jump_windows_db']):>28s} "
            f"{r['double_talk_corr_vs_processed_clean']:8.3f} "
            f"{r['double_talk_corr_vs_raw_user']:6.3f} "
            f"{r['process_ms_per_10ms_p50']:7.2f}/{r['process_ms_per_10ms_p99']:<7.2f} "
            f"{r['cpu_percent_of_core']:5.1f}"
        )
    out = Path(__file__).parent / "results" / "aec.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
