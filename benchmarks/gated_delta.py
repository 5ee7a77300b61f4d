"""Benchmark the gated delta rule ops and layer; same as `duplex bench gdn`.

Usage: .venv/bin/python benchmarks/gated_delta.py [--quick] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

# On a shared machine, OpenMP threads that spin while waiting fight other processes for the
# cores and slow small-op code 5x; sleeping waiters do not. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from duplex.kernels.gated_delta import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=bench.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bench.add_arguments(p)
    return bench.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
