"""Tokenizers."""
from __future__ import annotations

from typing import List


class ByteTokenizer:
    """Byte-level tokenizer of the seed project: pad 0, bos 1, eos 2, bytes at offset 3 (vocab 259)."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")
