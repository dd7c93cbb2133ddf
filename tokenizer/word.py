"""Word-level tokenizer: one id per whitespace-separated word, a newline is <eos>, anything else is <unk>.

This is the vocabulary of the classic word-level benchmarks (Penn Treebank): perplexity there counts one
end-of-sentence token per line, and the corpus already spells rare words as "<unk>". The tokenizer's
specials must include the eos and unk roles; the unk token's string is never a word of the vocabulary.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import IdsLike, Tokenizer, as_text_iterable, require_str
from .specials import SpecialTokens, TokenizerError

_NEWLINE = "\n"


class WordTokenizer(Tokenizer):
    """The training words by descending frequency (ties alphabetical), at the ids the specials leave free
    (in the historical layout: the specials, then the words)."""

    kind = "word"

    def __init__(
        self, words: Sequence[str], specials: SpecialTokens | Mapping[str, int] | None = None
    ) -> None:
        words = list(words)
        declared = SpecialTokens.coerce(specials)
        for role in ("eos", "unk"):
            if role not in declared.roles:
                raise TokenizerError(
                    f"a word tokenizer needs an {role!r} special (newlines are eos, unknown words unk); "
                    "declare one among its specials"
                )
        unk = declared.roles["unk"]
        if not words:
            raise TokenizerError("a word tokenizer needs at least one word; train it on non-empty text")
        for w in words:
            if not isinstance(w, str) or not w or w != "".join(w.split()):
                raise TokenizerError(
                    f"word vocabulary entries must be non-empty strings without whitespace, got {w!r}; "
                    "retrain the tokenizer"
                )
        if unk in words:
            raise TokenizerError(f"{unk!r} stands for unknown words, it cannot be in the vocabulary; retrain")
        if len(set(words)) != len(words):
            raise TokenizerError("word vocabulary has repeated words; retrain the tokenizer")
        super().__init__(len(words) + len(declared.ids), declared)
        self.words: tuple[str, ...] = tuple(words)
        self._id_of: dict[str, int] = dict(zip(words, self._ordinary_ids.tolist()))
        # Text of every id, for decode: <eos> is the newline it stands for, other specials their names.
        self._text_of: list[str] = [""] * self.vocab_size
        for i, name in self._special_name_of.items():
            self._text_of[i] = name
        for w, i in self._id_of.items():
            self._text_of[i] = w
        self._text_of[self.eos_id] = _NEWLINE
        # Specials that stand for text (a line end, an unknown word) survive decode(skip_special=True).
        self._dropped_by_skip = self._special_mask.copy()
        self._dropped_by_skip[[self.eos_id, self.unk_id]] = False

    def text_specials(self) -> tuple[int, ...]:
        return (self.eos_id, self.unk_id)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int | None = None,
        specials: SpecialTokens | Mapping[str, int] | None = None,
    ) -> WordTokenizer:
        """Vocabulary = the words of `texts` (most frequent first), capped to `vocab_size` ids in all
        (specials included); `specials` None is the historical layout."""
        declared = SpecialTokens.coerce(specials)
        n_special = len(declared.ids)
        is_int = isinstance(vocab_size, (int, np.integer)) and not isinstance(vocab_size, bool)
        if vocab_size is not None and (not is_int or vocab_size <= n_special):
            raise TokenizerError(
                f"a word tokenizer's vocab_size must be an int above the {n_special} special ids, "
                f"got {vocab_size!r}; use e.g. 10000, or None for every word"
            )
        counts: collections.Counter[str] = collections.Counter()
        for text in as_text_iterable(texts):
            require_str(text)
            counts.update(text.split())
        counts.pop(declared.roles.get("unk", ""), None)
        if not counts:
            raise TokenizerError("no words in the training text for the word tokenizer; pass non-empty text")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if vocab_size is not None:
            ranked = ranked[: int(vocab_size) - n_special]
        return cls([w for w, _ in ranked], declared)

    def encode(self, text: str) -> list[int]:
        """Ids of each line's words, with <eos> for every newline; unknown words (and "<unk>") -> <unk>."""
        require_str(text)
        get, unk, eos = self._id_of.get, self.unk_id, self.eos_id
        ids: list[int] = []
        lines = text.split(_NEWLINE)
        for i, line in enumerate(lines):
            ids.extend(get(w, unk) for w in line.split())
            if i < len(lines) - 1:
                ids.append(eos)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
        """Words joined by single spaces, a newline for each <eos>; skip_special drops the specials that
        are not text (so <eos> and <unk> stay)."""
        arr = self._check_ids(ids)
        if skip_special:
            arr = arr[~self._dropped_by_skip[arr]]
        text_of = self._text_of
        lines: list[str] = []
        start = 0
        for pos in [*np.flatnonzero(arr == self.eos_id).tolist(), arr.size]:
            lines.append(" ".join([text_of[i] for i in arr[start:pos].tolist()]))
            start = pos + 1
        return _NEWLINE.join(lines)

    def _decode_run(self, ids: np.ndarray) -> str:
        return " ".join(self.words[i] for i in self._ordinary_index[ids].tolist())

    def _token_string(self, token_id: int) -> str:
        return self.words[self._ordinary_index[token_id]]

    def _definition_bytes(self) -> bytes:
        return json.dumps(self.words, ensure_ascii=True).encode("ascii")

    def _config(self) -> dict[str, Any]:
        return {"words": list(self.words)}

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> WordTokenizer:
        words = config.get("words")
        if not isinstance(words, list):
            raise TokenizerError(
                f"{directory}/tokenizer.json has no 'words' list; it is corrupt, "
                "retrain and save the tokenizer"
            )
        return cls(words, SpecialTokens.from_config(config, directory))
