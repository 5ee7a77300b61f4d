"""The full-duplex engine: frame clock, audio I/O, batching, saved states and sessions."""
