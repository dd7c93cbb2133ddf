"""Byte-level tokenizer: one id per UTF-8 byte, so any text (or any bytes) round-trips."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .base import NUM_SPECIAL, SPECIAL_TOKENS, IdsLike, Tokenizer, byte_token_string, utf8


class ByteTokenizer(Tokenizer):
    """Specials, then the 256 byte values (id = NUM_SPECIAL + byte)."""

    kind = "byte"

    def __init__(self) -> None:
        super().__init__(NUM_SPECIAL + 256)

    @classmethod
    def train(cls, texts: Iterable[str] | None = None) -> ByteTokenizer:
        """The vocabulary is fixed; accepted for symmetry with the other kinds."""
        return cls()

    def encode_bytes(self, data: bytes) -> list[int]:
        return [b + NUM_SPECIAL for b in bytes(data)]

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(utf8(text))

    def encode_array(self, text: str) -> np.ndarray:
        ids = np.frombuffer(utf8(text), dtype=np.uint8).astype(np.int32)
        ids += NUM_SPECIAL
        return ids

    def decode_bytes(self, ids: IdsLike, *, skip_special: bool = False) -> bytes:
        """Bytes for `ids`; special ids become their names' UTF-8 unless skip_special."""
        arr = self._check_ids(ids)
        is_special = self._special_mask[arr]
        if not is_special.any():
            return (arr - NUM_SPECIAL).astype(np.uint8).tobytes()
        parts: list[bytes] = []
        start = 0
        for pos in np.flatnonzero(is_special).tolist():
            parts.append((arr[start:pos] - NUM_SPECIAL).astype(np.uint8).tobytes())
            if not skip_special:
                parts.append(SPECIAL_TOKENS[int(arr[pos])].encode("utf-8"))
            start = pos + 1
        parts.append((arr[start:] - NUM_SPECIAL).astype(np.uint8).tobytes())
        return b"".join(parts)

    def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
        # errors="replace": sampled ids may form invalid UTF-8, and decoding must never raise.
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def _decode_run(self, ids: np.ndarray) -> str:
        return (ids - NUM_SPECIAL).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _token_string(self, token_id: int) -> str:
        return byte_token_string(token_id - NUM_SPECIAL)

    def _definition_bytes(self) -> bytes:
        return b"bytes:0-255"

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> ByteTokenizer:
        return cls()
