"""`duplex bench codec`: quality and speed of the codecs (filled in below)."""

from __future__ import annotations

import argparse

HELP = "codec quality (mel distance, SI-SNR, ASR word accuracy) and streaming speed"
DESCRIPTION = HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
