"""`duplex talk`: a local conversation with the model (microphone/speaker or WAV files)."""

from __future__ import annotations

import argparse
import sys

HELP = "talk to the model: microphone and speaker, or WAV files in and out"
DESCRIPTION = """Talk to the model locally.

Audio comes from the microphone (or --input WAV) and goes to the speaker (or --output WAV);
the model hears you while it speaks, one model step per codec frame (20 ms with the default
codec). In a terminal a TUI shows both transcripts, latency (p50/p99 per stage and a sparkline),
input/output levels and session facts; type a line and press Enter to send text. Keys: F1 help,
F2 mute the microphone, F3 pause, F5 save state (to --save-state, default duplex.dstate), F6 load
that state, F7 reset, Ctrl+Q quit. With --headless (or when stdout is not a terminal) the
transcripts and a stats line per second are printed instead.

Examples:
  duplex talk --input question.wav --output reply.wav          (TUI in a terminal)
  duplex talk --input question.wav --output reply.wav --headless
  duplex talk --input in.wav --output out.wav --record runs/session1 --headless
  duplex talk --state saved.dstate --input in.wav --output out.wav --headless
  duplex talk --device pulse --headless

Echo: with an audio device the speaker's echo is cancelled in the microphone (--no-aec turns it
off: use that with headphones); the TUI's session panel shows the delay and echo attenuation.

Files: --input accepts any format libsndfile reads (resampled to the codec rate, mixed to mono);
--output writes 16-bit WAV at the codec rate. With --input and no --output the reply is
discarded; with neither, the audio device is used (see `duplex doctor`).
Exit status: 0 on success, 2 on a usage or input error, 3 when no audio device is usable."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="model name or .safetensors (default: default, the trained model)",
    )
    p.add_argument(
        "--codec", default="default", help="codec name or .safetensors (default: default)"
    )
    p.add_argument("--input", metavar="WAV", help="read your side from this audio file")
    p.add_argument("--output", metavar="WAV", help="write the model's audio to this WAV file")
    p.add_argument("--device", help="audio device name fragment or index (both directions)")
    p.add_argument("--state", metavar="FILE", help="start from a saved state file")
    p.add_argument("--save-state", metavar="FILE", help="save the final state to this file")
    p.add_argument("--record", metavar="DIR", help="record the session into this directory")
    p.add_argument(
        "--transcript",
        metavar="FILE",
        help="append one JSON line per finished utterance to FILE: "
        '{"speaker": "user"|"model", "start": s, "end": s, "text": ...} (times of the speech '
        "in the input for the user, in the output for the model)",
    )
    p.add_argument("--text", default="", help="text to type to the model at the start")
    p.add_argument(
        "--headless",
        action="store_true",
        help="print transcripts and a stats line per second instead of the TUI "
        "(automatic when stdout is not a terminal)",
    )
    p.add_argument("--json", action="store_true", help="with --headless: JSON lines")
    p.add_argument("--realtime", action="store_true", help="pace file input at the frame rate")
    p.add_argument(
        "--exit-at-end", action="store_true", help="TUI: quit when the input file has ended"
    )
    p.add_argument("--tail", type=float, default=1.0, help="seconds of silence after --input")
    p.add_argument("--max-seconds", type=float, help="stop after this many seconds of audio")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    from duplex.streamer.sampling import add_arguments as add_sampling_arguments

    add_sampling_arguments(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    from duplex.streamer.echo import add_arguments as add_echo_arguments

    add_echo_arguments(p)


def make_audio(args: argparse.Namespace, sample_rate: int, frame_size: int):
    from duplex.streamer.audio import DeviceAudio, FileAudio
    from duplex.streamer.echo import EchoSettings

    if args.input or args.output:
        tail = round(args.tail * sample_rate / frame_size)
        silence = 0
        if not args.input:
            silence = int((args.max_seconds or 10.0) * sample_rate / frame_size)
        return FileAudio(
            sample_rate,
            frame_size,
            args.input,
            args.output,
            realtime=args.realtime,
            tail_frames=tail,
            silence_frames=silence,
        )
    echo = EchoSettings.from_args(args)
    return DeviceAudio(sample_rate, frame_size, args.device, args.device, echo=echo)


def run(args: argparse.Namespace) -> int:
    import torch

    from duplex.streamer.audio import AudioUnavailableError
    from duplex.streamer.conversation import (
        ConversationConfig,
        load_parts,
        open_session,
    )
    from duplex.streamer.engine import Engine
    from duplex.streamer.sampling import from_args as sampling_from_args
    from duplex.streamer.statefile import StateFileError

    torch.set_num_threads(max(1, args.threads))
    sampling = sampling_from_args(args)
    cfg = ConversationConfig(args.model, args.codec, sampling, args.state)
    try:
        model, codec = load_parts(cfg)
    except (ValueError, FileNotFoundError) as e:
        return _fail(e, 2)
    try:
        audio = make_audio(args, codec.sample_rate, codec.frame_size)
    except AudioUnavailableError as e:
        return _fail(e, 3)
    except (ValueError, FileNotFoundError) as e:
        return _fail(e, 2)
    with Engine(model, codec, slots=1) as engine:
        try:
            session = open_session(engine, cfg, args.record)
        except (StateFileError, FileExistsError, ValueError) as e:
            return _fail(e, 2)
        echo = getattr(audio, "echo", None)
        if echo is not None and session.recorder is not None:
            # What processed the microphone: the recording's in.wav is its output, mic.wav
            # its input, so the session can be re-checked with other settings.
            session.recorder.control(session.frame, "echo", **echo.settings.as_dict())
        if args.text:
            session.type_text(args.text)
        if not args.headless and sys.stdout.isatty():
            return run_tui(args, engine, session, audio)
        return run_headless(args, engine, session, audio)


def _fail(error: object, status: int) -> int:
    from duplex.streamer.events import printable

    # Error text can quote untrusted input (a state file's fields): no control characters.
    print(f"duplex talk: {printable(str(error))}", file=sys.stderr)
    return status


def run_headless(args: argparse.Namespace, engine, session, audio) -> int:
    """Print transcripts and a stats line per second until the input ends."""
    from duplex.streamer.audio import AudioUnavailableError
    from duplex.streamer.conversation import HeadlessPrinter
    from duplex.streamer.conversation import run as run_conversation

    max_frames = None
    if args.max_seconds:
        max_frames = int(args.max_seconds * engine.frame_rate)
    printer = HeadlessPrinter(engine, session, json_lines=args.json)
    transcript = open_transcript(args, engine)
    try:
        with audio:
            run_conversation(engine, session, audio, printer, max_frames, transcript=transcript)
    except AudioUnavailableError as e:
        return _fail(e, 3)
    except KeyboardInterrupt:
        pass
    finally:
        if transcript is not None:
            transcript.close()
    printer.stats_line()
    if args.save_state:
        path = engine.save_session(session, args.save_state)
        print(f"[state] saved to {path}", flush=True)
    print(f"[done] {session.frame} frames; model said: {''.join(session.transcript)!r}")
    return 0


def open_transcript(args: argparse.Namespace, engine):
    """The --transcript writer, or None."""
    if not getattr(args, "transcript", None):
        return None
    from duplex.streamer.transcript import Transcript

    return Transcript(engine.frame_rate, args.transcript)


def run_tui(args: argparse.Namespace, engine, session, audio) -> int:
    """The Textual front end; returns when the user quits."""
    from duplex.apps.tui import DuplexApp, TalkOptions
    from duplex.streamer.audio import AudioUnavailableError

    try:
        audio.start()
    except AudioUnavailableError as e:
        return _fail(e, 3)
    options = TalkOptions(args.save_state or "duplex.dstate", args.exit_at_end)
    app = DuplexApp.local(engine, session, audio, options)
    app.worker.transcript = open_transcript(args, engine)
    try:
        app.run()
    finally:
        if app.worker.transcript is not None:
            app.worker.transcript.close()
    if app.worker.error:
        return _fail(app.worker.error, 3)
    s = app.worker.session
    print(f"[done] {s.frame} frames; model said: {''.join(s.transcript)!r}")
    return 0
