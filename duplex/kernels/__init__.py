"""Low-level ops: the gated delta rule (reference, chunked, recurrent, Triton) and GWA gathers."""

from duplex.kernels.gated_delta import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
]
