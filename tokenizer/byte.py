"""Byte-level tokenizer: one id per UTF-8 byte, so any text (or any bytes) round-trips."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import IdsLike, Tokenizer, byte_token_string, utf8
from .specials import SpecialTokens


class ByteTokenizer(Tokenizer):
    """The 256 byte values, in order, at the ids the specials leave free (in the historical layout:
    id = NUM_SPECIAL + byte)."""

    kind = "byte"

    def __init__(self, specials: SpecialTokens | Mapping[str, int] | None = None) -> None:
        super().__init__(256 + self._count_specials(specials), specials)

    @classmethod
    def train(
        cls, texts: Iterable[str] | None = None, specials: SpecialTokens | Mapping[str, int] | None = None
    ) -> ByteTokenizer:
        """The vocabulary is fixed; accepted for symmetry with the other kinds."""
        return cls(specials)

    def _byte_ids(self, data: bytes) -> np.ndarray:
        """int32 id of each byte of `data`."""
        return self._ordinary_ids[np.frombuffer(data, dtype=np.uint8)]

    def _bytes_of(self, ids: np.ndarray) -> bytes:
        """The bytes a run of ordinary ids stands for."""
        return self._ordinary_index[ids].astype(np.uint8).tobytes()

    def encode_bytes(self, data: bytes) -> list[int]:
        return self._byte_ids(bytes(data)).tolist()

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(utf8(text))

    def encode_array(self, text: str) -> np.ndarray:
        return self._byte_ids(utf8(text))

    def decode_bytes(self, ids: IdsLike, *, skip_special: bool = False) -> bytes:
        """Bytes for `ids`; special ids become their names' UTF-8 unless skip_special."""
        arr = self._check_ids(ids)
        is_special = self._special_mask[arr]
        if not is_special.any():
            return self._bytes_of(arr)
        parts: list[bytes] = []
        start = 0
        for pos in np.flatnonzero(is_special).tolist():
            parts.append(self._bytes_of(arr[start:pos]))
            if not skip_special:
                parts.append(self._special_name_of[int(arr[pos])].encode("utf-8"))
            start = pos + 1
        parts.append(self._bytes_of(arr[start:]))
        return b"".join(parts)

    def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
        # errors="replace": sampled ids may form invalid UTF-8, and decoding must never raise.
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def _decode_run(self, ids: np.ndarray) -> str:
        return self._bytes_of(ids).decode("utf-8", errors="replace")

    def _token_string(self, token_id: int) -> str:
        return byte_token_string(int(self._ordinary_index[token_id]))

    def _definition_bytes(self) -> bytes:
        return b"bytes:0-255"

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> ByteTokenizer:
        return cls(SpecialTokens.from_config(config, directory))
