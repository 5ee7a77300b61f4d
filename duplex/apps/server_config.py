"""The settings of `duplex serve`: every limit explicit, so nothing buffers without bound."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServeConfig:
    """Server settings; every limit is explicit so nothing buffers without bound."""

    host: str = "127.0.0.1"
    port: int = 8998
    token: str | None = None
    max_sessions: int = 16
    max_message_bytes: int = 4 << 20
    input_queue_messages: int = 4
    idle_timeout: float = 60.0
    queue_frames: int = 10
    out_queue_messages: int = 512
    out_queue_bytes: int = 4 << 20
    max_typed_bytes: int = 4096
    max_state_tokens: int = 100_000
    max_per_peer: int = 4
    connect_rate: float = 2.0
    connect_burst: float = 8.0
    max_handshakes: int = 64
    open_timeout: float = 5.0
    state_secrets: list[bytes] | None = None
    allow_unsigned_states: bool = False
    flood_rate: float = 150.0
    flood_burst: float = 250.0
    control_rate: float = 2.0
    control_burst: float = 5.0
    stats_interval: float = 1.0
    record: str | None = None
    # Disk budget of --record: all recordings under the directory, and one session's segments.
    record_max_mb: float = 2048.0
    record_session_mb: float = 256.0
    certfile: str | None = None
    keyfile: str | None = None
    model_name: str = "default"
    codec_name: str = "default"
    sampling: dict[str, Any] = field(default_factory=dict)
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    # What an Opus session's answers are encoded at (?audio=opus); 24 kbps keeps 16 kHz speech
    # intelligible to the model's ear and to people.
    opus_bitrate: int = 24_000
    # The neural codec on a thread of its own, pipelined with the model step (see
    # duplex.streamer.codec_stage); False runs it on the engine thread, as before.
    codec_thread: bool = True
