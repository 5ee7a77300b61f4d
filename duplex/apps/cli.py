"""The `duplex` command line: one console script, one subcommand per job.

Commands live in the modules listed in `COMMANDS`. Each such module defines `HELP` (one line),
`DESCRIPTION` (the full --help text), `add_arguments(parser)` and `run(args) -> int`. A command
with a group ("bench", "train", ...) becomes `duplex GROUP NAME`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Idle OpenMP threads sleep instead of spinning: on a few shared cores spinning threads starve
# the audio path (measured 5x slower kernels). Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from duplex import __version__

# (group or None, name, module)
COMMANDS: list[tuple[str | None, str, str]] = [
    (None, "doctor", "duplex.apps.doctor"),
    (None, "talk", "duplex.apps.talk"),
    (None, "replay", "duplex.apps.replay"),
    (None, "serve", "duplex.apps.serve"),
    (None, "connect", "duplex.apps.connect"),
    ("bench", "engine", "duplex.streamer.bench"),
    ("eval", "recall", "duplex.model.recall"),
    ("eval", "talk", "duplex.apps.eval_talk"),
    ("eval", "compare", "duplex.apps.eval_compare"),
    ("train", "recall", "duplex.model.recall_train"),
    ("bench", "codec", "duplex.codecs.bench"),
    ("bench", "gdn", "duplex.kernels.gated_delta.bench"),
    ("train", "codec", "duplex.codecs.train"),
    ("train", "duplex", "duplex.train.duplex_train"),
    ("data", "speech", "duplex.data.speech"),
    ("data", "conversations", "duplex.data.corpus_command"),
]

GROUP_HELP = {
    "bench": "benchmarks: print a table, save JSON and PNG under benchmarks/results/",
    "train": "train the codec and the model",
    "data": "make synthetic training data",
    "eval": "recall and quality evaluations",
}


def _add_command(sub: argparse._SubParsersAction, name: str, module_name: str) -> None:
    mod = importlib.import_module(module_name)
    p = sub.add_parser(
        name,
        help=mod.HELP,
        description=mod.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duplex",
        description=(
            "Real-time full-duplex audio/text conversation on a fixed-state model "
            "(gated delta rule) with guided window attention."
        ),
        epilog="Run `duplex COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"duplex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, name, module_name in COMMANDS:
        if group is None:
            _add_command(sub, name, module_name)
            continue
        if group not in groups:
            gp = sub.add_parser(
                group, help=GROUP_HELP.get(group, ""), description=GROUP_HELP.get(group)
            )
            groups[group] = gp.add_subparsers(dest="subcommand", metavar="WHAT", required=True)
        _add_command(groups[group], name, module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a reader that stopped (`| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
