"""`duplex replay DIR`: re-run a recorded session by frame index and compare its tokens."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "re-run a recorded session frame by frame; --check verifies every token"
DESCRIPTION = """Re-run a session recorded with `--record DIR`.

The recorded input audio is fed to a fresh engine frame by frame (by frame index, not wall
time), with the same model, codec, sampling seed, starting state and typed text, and the model's
tokens are compared with the recorded ones. A recording cut short (a killed process) replays up
to its last complete frame.

  duplex replay runs/session1                     watch it again in the TUI (real time)
  duplex replay runs/session1 --headless          print the conversation and the comparison
  duplex replay runs/session1 --check             exit 1 unless every token matches
  duplex replay runs/session1 --output again.wav  also write the replayed audio

Exit status: 0 when all tokens match (or without --check), 1 on a mismatch with --check,
2 when the recording or its model/codec cannot be loaded."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="the recording directory")
    p.add_argument("--check", action="store_true", help="exit 1 unless every token matches")
    p.add_argument(
        "--headless",
        action="store_true",
        help="print instead of showing the TUI (automatic with --check or without a terminal)",
    )
    p.add_argument("--output", metavar="WAV", help="write the replayed model audio here")
    p.add_argument(
        "--transcript",
        metavar="FILE",
        help="append one JSON line per finished utterance of the replay to FILE (see `duplex "
        "talk --help`)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def open_recording(directory: str | Path):
    """A recording with the config, model and codec it was made with (and its start state)."""
    from duplex.streamer.conversation import ConversationConfig, load_parts
    from duplex.streamer.recording import Recording

    rec = Recording.load(directory)
    cfg = ConversationConfig(**rec.header["config"])
    initial = Path(directory) / "initial.dstate"
    cfg.state = str(initial) if initial.is_file() else None
    model, codec = load_parts(cfg)
    return rec, cfg, model, codec


def replay(
    directory: str | Path,
    output: str | Path | None = None,
    verbose: bool = True,
    transcript: str | Path | None = None,
):
    """Replay a recording; returns (frames compared, index of first mismatch or None)."""
    from duplex.streamer.audio import FileAudio
    from duplex.streamer.engine import Engine
    from duplex.streamer.events import printable
    from duplex.streamer.transcript import Transcript

    rec, cfg, model, codec = open_recording(directory)
    for note in rec.notes:
        print(f"[replay] note: {note}", file=sys.stderr)
    out = None
    if output is not None:
        out = FileAudio(codec.sample_rate, codec.frame_size, None, output)
        out.start()
    mismatch = None
    lines = Transcript(codec.frame_rate, transcript) if transcript is not None else None
    with Engine(model, codec, slots=1) as engine:
        for what in ("model", "codec"):
            have = getattr(engine, f"{what}_fingerprint")
            want = rec.header.get(f"{what}_fingerprint")
            if have != want:
                raise ValueError(
                    f"the recording was made with {what} fingerprint {want}; "
                    f"{cfg.model if what == 'model' else cfg.codec!r} loads as {have}"
                )
        session = engine.join(cfg.sampling, state=cfg.state)
        start = session.frame
        controls = {}
        for c in rec.controls:
            controls.setdefault(c["i"], []).append(c)
        for i, ev in enumerate(rec.frames):
            for c in controls.get(start + i, []):
                if c["kind"] == "type":
                    session.type_text(c["text"])
            heard = rec.input_frame(i)
            if ev.get("codes_in"):
                # The client ran the codec: the recorded codes are what the model heard.
                res = engine.step({}, codes={session: ev["tokens_in"]})[session]
            else:
                res = engine.step({session: heard})[session]
            if lines is not None:
                lines.add(heard, res)
            if out is not None:
                out.write_frame(res.pcm)
            if res.tokens_out != ev["tokens_out"] and mismatch is None:
                mismatch = i
                if verbose:
                    print(
                        f"[replay] frame {i}: tokens differ: recorded {ev['tokens_out']}, "
                        f"replayed {res.tokens_out}",
                        file=sys.stderr,
                    )
            if verbose and res.text:
                print(f"[model] {printable(res.text)}", flush=True)
            if verbose and res.user_text:
                print(f"[you] {printable(res.user_text)}", flush=True)
        recorded_audio = rec.audio_out
    if lines is not None:
        lines.close()
    if out is not None:
        out.close()
    return len(rec.frames), mismatch, recorded_audio


def replay_tui(directory: str | Path, output: str | Path | None) -> int:
    """Show a recording replayed through the engine in the TUI, paced at the frame rate."""
    from duplex.apps.tui import DuplexApp, TalkOptions
    from duplex.streamer.audio import FileAudio
    from duplex.streamer.engine import Engine

    rec, cfg, model, codec = open_recording(directory)
    schedule: dict[int, list[str]] = {}
    for c in rec.controls:
        if c["kind"] == "type":
            schedule.setdefault(c["i"], []).append(c["text"])
    audio = FileAudio(
        codec.sample_rate,
        codec.frame_size,
        output_path=output,
        realtime=True,
        signal=rec.audio_in,
    )
    with Engine(model, codec, slots=1) as engine:
        session = engine.join(cfg.sampling, state=cfg.state)
        audio.start()
        options = TalkOptions(schedule=schedule, title=f"duplex replay {directory}")
        DuplexApp.local(engine, session, audio, options).run()
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from duplex.streamer.recording import RecordingError
    from duplex.streamer.statefile import StateFileError

    torch.set_num_threads(max(1, args.threads))
    if not args.headless and not args.check and not args.transcript and sys.stdout.isatty():
        try:
            return replay_tui(args.dir, args.output)
        except (RecordingError, StateFileError, ValueError, FileNotFoundError, KeyError) as e:
            print(f"duplex replay: {e}", file=sys.stderr)
            return 2
    try:
        n, mismatch, _ = replay(args.dir, args.output, transcript=args.transcript)
    except (RecordingError, StateFileError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"duplex replay: {e}", file=sys.stderr)
        return 2
    if mismatch is None:
        print(f"[replay] {n} frames, every token matches the recording")
        return 0
    print(f"[replay] {n} frames, first mismatch at frame {mismatch}")
    return 1 if args.check else 0
