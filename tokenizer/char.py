"""Character-level tokenizer: one id per Unicode code point seen in training."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Tokenizer, as_text_iterable, require_str
from .specials import SpecialTokens, TokenizerError

_MAX_SHOWN = 5


class CharTokenizer(Tokenizer):
    """The sorted characters of the training text, at the ids the specials leave free (in the historical
    layout: the specials, then the characters)."""

    kind = "char"

    def __init__(
        self, chars: Sequence[str], specials: SpecialTokens | Mapping[str, int] | None = None
    ) -> None:
        chars = list(chars)
        if not chars:
            raise TokenizerError("a char tokenizer needs at least one character; train it on non-empty text")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise TokenizerError("char vocabulary entries must be single characters; retrain the tokenizer")
        if len(set(chars)) != len(chars) or chars != sorted(chars):
            raise TokenizerError("char vocabulary must be sorted and without repeats; retrain the tokenizer")
        super().__init__(len(chars) + self._count_specials(specials), specials)
        self.chars: tuple[str, ...] = tuple(chars)
        self._id_of: dict[str, int] = dict(zip(chars, self._ordinary_ids.tolist()))
        # Code points in id order, for vectorised decode; surrogatepass keeps lone surrogates round-tripping.
        self._codes = np.frombuffer("".join(chars).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        # Lookup table code point -> id, with one extra -1 slot that every larger code point maps to.
        self._lut = np.full(int(self._codes.max()) + 2, -1, dtype=np.int32)
        self._lut[self._codes] = self._ordinary_ids

    @classmethod
    def train(
        cls, texts: Iterable[str], specials: SpecialTokens | Mapping[str, int] | None = None
    ) -> CharTokenizer:
        """Vocabulary = every distinct character in `texts`, plus `specials` (None: the historical layout)."""
        seen: set[str] = set()
        for text in as_text_iterable(texts):
            require_str(text)
            seen.update(text)
        if not seen:
            raise TokenizerError("no training text for the char tokenizer; pass at least one non-empty text")
        return cls(sorted(seen), specials)

    def encode(self, text: str) -> list[int]:
        require_str(text)
        id_of = self._id_of
        try:
            return [id_of[c] for c in text]
        except KeyError:
            raise self._unknown_error(text) from None

    def encode_array(self, text: str) -> np.ndarray:
        require_str(text)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = self._lut[np.minimum(codes, self._lut.size - 1)]
        if ids.size and int(ids.min()) < 0:
            raise self._unknown_error(text)
        return ids

    def encode_unseen(self, text: str) -> np.ndarray:
        require_str(text)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = np.where(codes < self._lut.size, self._lut[np.minimum(codes, self._lut.size - 1)], -1)
        return np.where(ids < 0, self.unk_id, ids).astype(np.int32)

    def _unknown_error(self, text: str) -> TokenizerError:
        missing = list(dict.fromkeys(c for c in text if c not in self._id_of))
        shown = ", ".join(repr(c) for c in missing[:_MAX_SHOWN])
        more = f" (and {len(missing) - _MAX_SHOWN} more)" if len(missing) > _MAX_SHOWN else ""
        return TokenizerError(
            f"text has {len(missing)} character(s) not in the char tokenizer's vocabulary: {shown}{more}; "
            "use a byte or bpe tokenizer (they encode any text) or retrain the char tokenizer on text "
            "that contains them"
        )

    def _decode_run(self, ids: np.ndarray) -> str:
        return self._codes[self._ordinary_index[ids]].tobytes().decode("utf-32-le", "surrogatepass")

    def _token_string(self, token_id: int) -> str:
        return self.chars[self._ordinary_index[token_id]]

    def _definition_bytes(self) -> bytes:
        return json.dumps(self.chars).encode("ascii")

    def _config(self) -> dict[str, Any]:
        return {"chars": list(self.chars)}

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> CharTokenizer:
        chars = config.get("chars")
        if not isinstance(chars, list):
            raise TokenizerError(
                f"{directory}/tokenizer.json has no 'chars' list; it is corrupt, retrain and save the tokenizer"
            )
        return cls(chars, SpecialTokens.from_config(config, directory))
