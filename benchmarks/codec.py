"""Codec benchmark: the same as `duplex bench codec` (quality and streaming speed).

Run from the repository root: `python benchmarks/codec.py` (or `duplex bench codec`); writes
benchmarks/results/codec.json, codec_spectrogram.png and codec_sample.wav.
"""

from __future__ import annotations

import argparse
import sys

from duplex.codecs import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=bench.DESCRIPTION)
    bench.add_arguments(p)
    return bench.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
