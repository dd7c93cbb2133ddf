"""Shared tokenizer interface: special tokens, errors, id validation, save/load plumbing."""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<|endoftext|>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<mask>",
    "<|reward|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
# Every kind puts the specials first, so their ids agree across kinds.
NUM_SPECIAL = len(SPECIAL_TOKENS)
SPECIAL_IDS: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}

CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1

IdsLike = Sequence[int] | np.ndarray


class TokenizerError(ValueError):
    """A user-facing tokenizer problem; the message is one line: what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        # Callers print these as single log lines, so never let a newline through.
        super().__init__(" ".join(str(message).splitlines()))


def require_str(text: object) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"expected text as str, got {type(text).__name__}; decode bytes to str first")


def byte_token_string(b: int) -> str:
    """Display form of one byte: printable ASCII as itself, anything else as \\xNN."""
    return chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}"


def utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`, with a TokenizerError (not UnicodeEncodeError) for unpaired surrogates."""
    require_str(text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise TokenizerError(
            f"text has an unpaired surrogate {bad!r} at index {e.start}, which is not valid Unicode; "
            "decode the source file with errors='replace' (or fix it) before tokenizing"
        ) from None


class Tokenizer(abc.ABC):
    """Maps text to int ids and back; ids 0..len(SPECIAL_TOKENS)-1 are the special tokens."""

    kind: ClassVar[str]

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size: int = int(vocab_size)
        self._special_mask = np.zeros(self.vocab_size, dtype=bool)
        self._special_mask[:NUM_SPECIAL] = True

    # ---- special tokens -------------------------------------------------------------------------

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(SPECIAL_IDS)

    @property
    def pad_id(self) -> int:
        return SPECIAL_IDS["<pad>"]

    @property
    def eot_id(self) -> int:
        return SPECIAL_IDS["<|endoftext|>"]

    @property
    def bos_id(self) -> int:
        return SPECIAL_IDS["<bos>"]

    @property
    def eos_id(self) -> int:
        return SPECIAL_IDS["<eos>"]

    @property
    def unk_id(self) -> int:
        return SPECIAL_IDS["<unk>"]

    @property
    def mask_id(self) -> int:
        return SPECIAL_IDS["<mask>"]

    @property
    def reward_id(self) -> int:
        return SPECIAL_IDS["<|reward|>"]

    # ---- encoding -------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids for `text`; literal special-token strings in the text are encoded as ordinary text."""

    @abc.abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as `encode`, as an int32 array of shape [n_tokens], fast for large corpora."""

    def encode_unseen(self, text: str) -> np.ndarray:
        """`encode_array` for text the tokenizer was not trained on (held-out text): what it has no id for
        becomes <unk>. Only a char vocabulary lacks anything; byte, BPE (byte fallback) and word
        tokenizers encode any text already."""
        return self.encode_array(text)

    # ---- decoding -------------------------------------------------------------------------------

    def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
        """Text for `ids`; special ids render as their names (e.g. "<|endoftext|>") unless skip_special."""
        arr = self._check_ids(ids)
        is_special = self._special_mask[arr]
        if not is_special.any():
            return self._decode_run(arr)
        parts: list[str] = []
        start = 0
        for pos in np.flatnonzero(is_special).tolist():
            if pos > start:
                parts.append(self._decode_run(arr[start:pos]))
            if not skip_special:
                parts.append(SPECIAL_TOKENS[int(arr[pos])])
            start = pos + 1
        if start < arr.size:
            parts.append(self._decode_run(arr[start:]))
        return "".join(parts)

    @abc.abstractmethod
    def _decode_run(self, ids: np.ndarray) -> str:
        """Text for a run of non-special ids (shape [n])."""

    def token_strings(self, ids: IdsLike) -> list[str]:
        """A readable string per id (specials by name); meant for display, not for decoding."""
        return [
            SPECIAL_TOKENS[i] if i < NUM_SPECIAL else self._token_string(i)
            for i in self._check_ids(ids).tolist()
        ]

    @abc.abstractmethod
    def _token_string(self, token_id: int) -> str:
        """Readable string for one non-special id."""

    def _check_ids(self, ids: IdsLike) -> np.ndarray:
        """`ids` as an int64 array of shape [n], with every id in [0, vocab_size)."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1:
            raise TokenizerError(
                f"expected a 1-D sequence of token ids, got shape {arr.shape}; decode each row separately"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(f"token ids must be integers, got dtype {arr.dtype}; cast them to int")
        arr = arr.astype(np.int64, copy=False)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenizerError(
                f"token id {bad} is outside this {self.kind} tokenizer's vocabulary [0, {self.vocab_size}); "
                "the ids were probably made by a different tokenizer (check the run's tokenizer directory)"
            )
        return arr

    # ---- identity and persistence ---------------------------------------------------------------

    @abc.abstractmethod
    def _definition_bytes(self) -> bytes:
        """Bytes that, with kind and specials, fully define the vocabulary (hashed into the fingerprint)."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex of kind + specials + vocabulary/model; equal iff the tokenizers encode alike."""
        header = json.dumps(
            {"kind": self.kind, "vocab_size": self.vocab_size, "special_ids": SPECIAL_IDS},
            sort_keys=True,
        )
        h = hashlib.sha256(header.encode("utf-8"))
        h.update(b"\0")
        h.update(self._definition_bytes())
        return h.hexdigest()

    def _config(self) -> dict[str, Any]:
        """Kind-specific entries for tokenizer.json."""
        return {}

    def _save_files(self, directory: Path) -> None:
        """Write kind-specific files next to tokenizer.json."""

    @classmethod
    @abc.abstractmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> Tokenizer:
        """Rebuild from a parsed tokenizer.json (and files next to it) in `directory`."""

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json (and any model file) into `directory`, creating it."""
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._save_files(path)
            config = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "vocab_size": self.vocab_size,
                "special_ids": SPECIAL_IDS,
                "fingerprint": self.fingerprint,
                **self._config(),
            }
            write_atomic(path / CONFIG_FILE, (json.dumps(config, indent=1) + "\n").encode("utf-8"))
        except OSError as e:
            raise TokenizerError(
                f"cannot save the tokenizer to {str(path)!r}: {e.strerror or e}; choose a writable directory"
            ) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def as_text_iterable(texts: Iterable[str] | str) -> Iterable[str]:
    """A lone str would otherwise be iterated character by character."""
    return [texts] if isinstance(texts, str) else texts
