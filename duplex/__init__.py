"""duplex: real-time full-duplex audio/text conversation on a fixed-state model.

Two model ideas carry it: a fixed-state mixer (the gated delta rule, `duplex.kernels`) and
guided window attention over an append-only token log (`duplex.model`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("duplex")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
