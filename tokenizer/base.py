"""The tokenizer interface every kind implements: encode/decode, id validation, save/load plumbing.

The special tokens a tokenizer declares, and their roles, are tokenizer/specials.py.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, overload

import numpy as np

from plutao.tokenizer.specials import (
    CONFIG_FILE,
    FORMAT_VERSION,
    SpecialTokens,
    TokenizerError,
    listed,
)

IdsLike = Sequence[int] | np.ndarray



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
    """Maps text to int ids and back. Its special tokens are whatever its SpecialTokens declares; every
    other id below vocab_size is ordinary, and the kinds map their vocabulary onto those ids in order."""

    kind: ClassVar[str]

    def __init__(self, vocab_size: int, specials: SpecialTokens | Mapping[str, int] | None = None) -> None:
        self.vocab_size: int = int(vocab_size)
        self.special_tokens: SpecialTokens = SpecialTokens.coerce(specials)
        outside = {n: i for n, i in self.special_tokens.ids.items() if i >= self.vocab_size}
        if outside:
            name, i = next(iter(outside.items()))
            raise TokenizerError(
                f"special token {name!r} is declared at id {i}, outside this {self.kind} tokenizer's "
                f"vocabulary [0, {self.vocab_size}); declare ids below {self.vocab_size}"
            )
        self._special_name_of: dict[int, str] = {i: n for n, i in self.special_tokens.ids.items()}
        self._special_mask = np.zeros(self.vocab_size, dtype=bool)
        self._special_mask[list(self._special_name_of)] = True
        ordinary = np.flatnonzero(~self._special_mask).astype(np.int32)
        ordinary.flags.writeable = False
        self._ordinary_ids: np.ndarray = ordinary
        # Id -> its position among the ordinary ids (the kind's vocabulary index), -1 for specials.
        self._ordinary_index = np.full(self.vocab_size, -1, dtype=np.int64)
        self._ordinary_index[ordinary] = np.arange(ordinary.size)

    @staticmethod
    def _count_specials(specials: SpecialTokens | Mapping[str, int] | None) -> int:
        """How many ids a declaration takes, for kinds that size their vocabulary before __init__."""
        return len(SpecialTokens.coerce(specials).ids)

    # ---- special tokens -------------------------------------------------------------------------

    @property
    def specials(self) -> dict[str, int]:
        """{token string: id} for every special token, in id order."""
        return dict(self.special_tokens.ids)

    @property
    def special_ids(self) -> dict[str, int]:
        """Same as `specials`: {token string: id}."""
        return dict(self.special_tokens.ids)

    @property
    def sorted_special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._special_name_of))

    @property
    def special_roles(self) -> dict[str, str]:
        """{role: token string}, e.g. {"eot": "<|endoftext|>", "user": "<|user|>", ...}."""
        return dict(self.special_tokens.roles)

    def has_special(self, name: str) -> bool:
        """Whether `name` is a declared special token string or role."""
        return name in self.special_tokens.ids or name in self.special_tokens.roles

    def special_id(self, name: str) -> int:
        """Id of the special token `name`: a token string ("<|user|>") or a role ("user")."""
        ids, roles = self.special_tokens.ids, self.special_tokens.roles
        if name in ids:
            return ids[name]
        if name in roles:
            return ids[roles[name]]
        raise TokenizerError(
            f"this {self.kind} tokenizer has no special token {name!r}; it declares {listed(ids)} "
            f"(roles: {listed(roles)})"
        )

    @property
    def pad_id(self) -> int:
        return self.special_id("pad")

    @property
    def eot_id(self) -> int:
        return self.special_id("eot")

    @property
    def bos_id(self) -> int:
        return self.special_id("bos")

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    @property
    def unk_id(self) -> int:
        return self.special_id("unk")

    @property
    def mask_id(self) -> int:
        return self.special_id("mask")

    @property
    def reward_id(self) -> int:
        return self.special_id("reward")

    @property
    def system_id(self) -> int:
        return self.special_id("system")

    @property
    def user_id(self) -> int:
        return self.special_id("user")

    @property
    def assistant_id(self) -> int:
        return self.special_id("assistant")

    @property
    def end_id(self) -> int:
        return self.special_id("end")

    @property
    def call_id(self) -> int:
        return self.special_id("call")

    @property
    def tool_id(self) -> int:
        return self.special_id("tool")

    @property
    def has_tools(self) -> bool:
        """Whether it declares the tool-use tokens (<|call|> and <|tool|>: tokenizer/chat.py)."""
        return self.has_special("call") and self.has_special("tool")

    @overload
    def is_special(self, ids: int) -> bool: ...

    @overload
    def is_special(self, ids: IdsLike) -> np.ndarray: ...

    def is_special(self, ids: int | IdsLike) -> bool | np.ndarray:
        """Whether each id is a declared special: a bool for an int, a bool array of the same shape for an
        array. Ids outside [0, vocab_size) are not special (they are no token of this tokenizer)."""
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            return 0 <= ids < self.vocab_size and bool(self._special_mask[ids])
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(f"token ids must be integers, got dtype {arr.dtype}; cast them to int")
        inside = (arr >= 0) & (arr < self.vocab_size)
        out = np.zeros(arr.shape, dtype=bool)
        out[inside] = self._special_mask[arr[inside]]
        return out

    @property
    def ordinary_ids(self) -> np.ndarray:
        """The ids of ordinary (non-special) tokens, ascending, as a read-only int32 array."""
        return self._ordinary_ids

    def ordinary_mask(self, vocab_size: int | None = None) -> np.ndarray:
        """Bool [vocab_size] (default: the tokenizer's): True for ordinary ids, False for specials and for
        ids at or past the tokenizer's vocab_size (a model may pad its vocabulary to a round number)."""
        size = self.vocab_size if vocab_size is None else int(vocab_size)
        if size < self.vocab_size:
            raise TokenizerError(
                f"vocab_size {size} is smaller than this {self.kind} tokenizer's {self.vocab_size} ids; "
                "the model's vocabulary must hold every token id"
            )
        mask = np.zeros(size, dtype=bool)
        mask[self._ordinary_ids] = True
        return mask

    def text_specials(self) -> tuple[int, ...]:
        """Special ids that stand for text and are written like any token (a word tokenizer's line end
        and unknown word); none for the other kinds."""
        return ()

    def unsampled_ids(self, keep: Iterable[int] = (), vocab_size: int | None = None) -> tuple[int, ...]:
        """The ids a sampler should never emit: every special token except <|endoftext|> and <|end|>
        (they end a text or a reply), the specials that stand for text, and `keep` (e.g. a chat's turn
        tokens, which end a reply); with `vocab_size` (a model's, padded past this tokenizer's), also
        the ids from this tokenizer's vocab_size up to it, which decode to nothing."""
        allowed = set(self.text_specials()) | {int(i) for i in keep}
        if self.has_tools:  # (a call and the token closing it are the model's to write)
            allowed |= {self.call_id, self.tool_id}
        allowed |= {self.special_id(role) for role in ("eot", "end") if self.has_special(role)}
        extra = range(self.vocab_size, int(vocab_size)) if vocab_size is not None else range(0)
        return tuple(i for i in self.sorted_special_ids if i not in allowed) + tuple(extra)

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
                parts.append(self._special_name_of[int(arr[pos])])
            start = pos + 1
        if start < arr.size:
            parts.append(self._decode_run(arr[start:]))
        return "".join(parts)

    @abc.abstractmethod
    def _decode_run(self, ids: np.ndarray) -> str:
        """Text for a run of non-special ids (shape [n])."""

    def token_strings(self, ids: IdsLike) -> list[str]:
        """A readable string per id (specials by name); meant for display, not for decoding."""
        name_of = self._special_name_of
        return [name_of[i] if i in name_of else self._token_string(i) for i in self._check_ids(ids).tolist()]

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
        """sha256 hex of kind + specials + vocabulary/model; equal iff the tokenizers encode alike.

        The header is exactly what it was before tokenizers declared their specials (run directories
        record fingerprints and refuse a mismatch); roles enter it only when they differ from the
        defaults, which no tokenizer saved before declarations can have."""
        header: dict[str, Any] = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_ids": dict(self.special_tokens.ids),
        }
        if not self.special_tokens.has_default_roles:
            header["special_roles"] = dict(self.special_tokens.roles)
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
        h.update(b"\0")
        h.update(self._definition_bytes())
        return h.hexdigest()

    def _config(self) -> dict[str, Any]:
        """Kind-specific entries for tokenizer.json."""
        return {}

    def _save_files(self, directory: Path) -> None:
        """Write kind-specific files next to tokenizer.json."""

    def _grow_files(self, directory: Path, names: list[str]) -> None:
        """Make the kind-specific files saved in `directory` reserve `names` at the next ids (the kinds
        whose files hold no ids need nothing: tokenizer/factory.py: grown)."""

    @classmethod
    @abc.abstractmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> Tokenizer:
        """Rebuild from a parsed tokenizer.json (and files next to it) in `directory`; the specials come
        from `SpecialTokens.from_config(config, directory)`."""

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
                **self.special_tokens.to_config(),
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
