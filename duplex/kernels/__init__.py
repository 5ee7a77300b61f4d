"""Low-level ops: the gated delta rule (reference, chunked, recurrent, Triton) and GWA gathers."""
