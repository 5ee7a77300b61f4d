"""Streaming audio codecs: EnCodec 24 kHz and the small codec duplex trains and ships."""
