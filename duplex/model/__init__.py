"""Layers, the DuplexLM, configs, checkpoints and the token log used by guided window attention."""
