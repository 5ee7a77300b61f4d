"""Engine benchmark (latency, batching, flat cost); same as `duplex bench engine`.

.venv/bin/python benchmarks/engine.py            # writes benchmarks/results/engine.{json,png}
"""

import sys

from duplex.apps.cli import main

sys.exit(main(["bench", "engine", *sys.argv[1:]]))
