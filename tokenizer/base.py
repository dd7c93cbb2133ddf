"""Shared tokenizer interface: special-token declarations, errors, id validation, save/load plumbing.

Every tokenizer declares its special tokens in a `SpecialTokens`: which token string sits at which id,
and which role each plays (pad, eot, bos, eos, unk, mask, reward, system, user, assistant, end). The ids
need not be contiguous or come first: an imported vocabulary keeps its specials wherever they are, and
every id that is not declared special (and is below the tokenizer's vocab_size) is an ordinary token.
Nothing here or in the kinds assumes more than that. On a tokenizer:

    tok.specials                  {token string: id}, e.g. {"<pad>": 0, "<|endoftext|>": 1, ...}
    tok.special_ids               the same mapping (the name existing callers use)
    tok.sorted_special_ids        tuple of the special ids, ascending
    tok.special_roles             {role: token string}, e.g. {"eot": "<|endoftext|>", ...}
    tok.special_id(name)          id of a token string or a role ("<|user|>" or "user"); TokenizerError if
                                  the tokenizer declares no such special
    tok.has_special(name)         whether special_id(name) would succeed
    tok.pad_id, eot_id, bos_id, eos_id, unk_id, mask_id, reward_id, system_id, user_id, assistant_id,
    end_id                        special_id of that role
    tok.is_special(ids)           bool (for an int) or bool array (for an array) of the same shape
    tok.ordinary_ids              int32 array of the ordinary ids, ascending
    tok.ordinary_mask(vocab_size) bool [vocab_size]: True for ordinary ids below tok.vocab_size, False for
                                  specials and for a model's padded rows past tok.vocab_size

Every kind takes `specials=` (a SpecialTokens, or a plain {token string: id} mapping with default roles)
in its constructor and its train(), e.g. `CharTokenizer.train(texts, specials={"<pad>": 60, ...})`, and
maps its own vocabulary onto the ids the specials leave free, in ascending order.

The declaration is saved in tokenizer.json ("special_ids", "special_roles") and read back. The
fingerprint hashes the same header as before declarations existed, so a tokenizer in the historical
layout keeps its fingerprint; roles enter it only when they are not the defaults. A folder
without a declaration loads with the historical layout, `SpecialTokens.historical()`: the eleven SPECIAL_TOKENS at
ids 0..10 (NUM_SPECIAL of them) in that order, which the char, byte, word and BPE tokenizers trained here
still use unless given another declaration. SPECIAL_TOKENS, NUM_SPECIAL and SPECIAL_IDS describe only that
historical layout; code that handles any tokenizer asks the tokenizer instead.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, overload

import numpy as np

# The historical layout: these eleven specials at ids 0..10, ordinary tokens after them.
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
NUM_SPECIAL = len(SPECIAL_TOKENS)
SPECIAL_IDS: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}

# Role -> the token string that plays it when a declaration does not say otherwise.
DEFAULT_ROLES: dict[str, str] = {
    "pad": "<pad>",
    "eot": "<|endoftext|>",
    "bos": "<bos>",
    "eos": "<eos>",
    "unk": "<unk>",
    "mask": "<mask>",
    "reward": "<|reward|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}

CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1

IdsLike = Sequence[int] | np.ndarray

# How many declared names an unknown-name error lists before "...".
_MAX_LISTED = 12


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


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special tokens: `ids` maps each token string to its id, `roles` maps a role (such as
    "eos") to the token string that plays it. Several roles may share one token (GPT-2's <|endoftext|> is
    eot, bos and eos). Roles not given default to DEFAULT_ROLES for the token strings that are declared,
    so a declaration that keeps the usual strings only needs `ids`."""

    ids: Mapping[str, int]
    roles: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.ids, Mapping):
            raise TokenizerError(
                f"special tokens must be a mapping of token string to id, got {type(self.ids).__name__}"
            )
        ids: dict[str, int] = {}
        for name, i in self.ids.items():
            if not isinstance(name, str) or not name:
                raise TokenizerError(f"special token names must be non-empty strings, got {name!r}")
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
                raise TokenizerError(f"special token {name!r} needs a non-negative int id, got {i!r}")
            ids[name] = int(i)
        by_id: dict[int, str] = {}
        for name, i in ids.items():
            if i in by_id:
                raise TokenizerError(
                    f"special tokens {by_id[i]!r} and {name!r} both claim id {i}; give each its own id"
                )
            by_id[i] = name
        if not isinstance(self.roles, Mapping):
            raise TokenizerError(
                f"special roles must be a mapping of role to token string, got {type(self.roles).__name__}"
            )
        roles = {role: name for role, name in DEFAULT_ROLES.items() if name in ids}
        for role, name in self.roles.items():
            if not isinstance(role, str) or not role:
                raise TokenizerError(f"special role names must be non-empty strings, got {role!r}")
            if name not in ids:
                raise TokenizerError(
                    f"role {role!r} names {name!r}, which is not a declared special token; "
                    f"declare it or choose one of: {_listed(ids)}"
                )
            roles[role] = name
        for role, name in roles.items():
            if role in ids and ids[role] != ids[name]:
                raise TokenizerError(
                    f"{role!r} is both a special token and a role for {name!r}; rename the role or the token"
                )
        # Ids in ascending order, so saved files and error messages read in id order.
        object.__setattr__(self, "ids", dict(sorted(ids.items(), key=lambda kv: kv[1])))
        object.__setattr__(self, "roles", roles)

    @classmethod
    def historical(cls) -> SpecialTokens:
        """SPECIAL_TOKENS at ids 0..10: the layout of every tokenizer saved before declarations existed."""
        return cls(SPECIAL_IDS)

    @classmethod
    def coerce(cls, specials: SpecialTokens | Mapping[str, int] | None) -> SpecialTokens:
        """`specials` as a SpecialTokens: None is the historical layout, a mapping is {token string: id}."""
        if specials is None:
            return cls.historical()
        return specials if isinstance(specials, SpecialTokens) else cls(specials)

    @property
    def has_default_roles(self) -> bool:
        """Whether the roles are exactly what DEFAULT_ROLES gives for these token strings."""
        return dict(self.roles) == {role: name for role, name in DEFAULT_ROLES.items() if name in self.ids}

    def to_config(self) -> dict[str, Any]:
        """Entries for tokenizer.json."""
        return {"special_ids": dict(self.ids), "special_roles": dict(self.roles)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], directory: Path) -> SpecialTokens:
        """The declaration in a parsed tokenizer.json; the historical layout when it has none (folders
        saved before declarations existed record no roles, and the oldest record no ids either)."""
        ids = config.get("special_ids")
        roles = config.get("special_roles", {})
        if ids is None:
            return cls.historical()
        if not isinstance(ids, dict) or not isinstance(roles, dict):
            raise TokenizerError(
                f"{directory}/{CONFIG_FILE} has malformed 'special_ids' or 'special_roles' (expected JSON "
                "objects); it is corrupt, save the tokenizer again"
            )
        try:
            return cls(ids, roles)
        except TokenizerError as e:
            raise TokenizerError(f"{directory}/{CONFIG_FILE}: {e}; save the tokenizer again") from None


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
            f"this {self.kind} tokenizer has no special token {name!r}; it declares {_listed(ids)} "
            f"(roles: {_listed(roles)})"
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
