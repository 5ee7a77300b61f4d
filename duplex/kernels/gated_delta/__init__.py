"""The gated delta rule (Gated DeltaNet mixer): reference, chunked and recurrent forms.

`naive_recurrent_gated_delta_rule` is the reference loop; `chunk_gated_delta_rule` the
chunkwise-parallel form for training and prefill; `fused_recurrent_gated_delta_rule` the step form
for streaming. The last two dispatch to Triton kernels on CUDA tensors (imported lazily, so a CPU
install without Triton works) and to PyTorch otherwise.
"""

from duplex.kernels.gated_delta.chunk import chunk_gated_delta_rule
from duplex.kernels.gated_delta.fused_recurrent import fused_recurrent_gated_delta_rule
from duplex.kernels.gated_delta.naive import naive_recurrent_gated_delta_rule

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
]
