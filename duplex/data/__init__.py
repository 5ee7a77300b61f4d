"""Synthetic training data: espeak-ng speech with word-level timing (see `duplex.data.speech`)."""
