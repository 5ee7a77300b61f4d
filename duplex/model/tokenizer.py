"""The project's text tokenizer: UTF-8 bytes plus a few control tokens.

Why bytes: a conversation's text streams carry one token per 20 ms frame, so a word of n
characters spans n frames of speech-time, which is about how long it takes to say; nothing is
out of vocabulary (names, numbers, any language); and the guided-window index over the log sees
exact surface forms, which is what makes lexical recall exact. The vocabulary is tiny (260), so
heads and embeddings cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = 256
BOS = 257
EOT = 258
UNK = 259
VOCAB_SIZE = 260


@dataclass(frozen=True)
class ByteTokenizer:
    """Text <-> ids. `PAD` fills frames with no new text; `EOT` ends a turn."""

    pad_id: int = PAD
    bos_id: int = BOS
    eot_id: int = EOT
    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        """Bytes back to text; control tokens are dropped, broken UTF-8 is replaced."""
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def is_text(self, i: int) -> bool:
        return 0 <= i < 256
