"""Special-token declarations: which token string sits at which id and which role it plays.

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

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
    # Tool use (tokenizer/chat.py): never in the historical layout; a run gains them at the end of its
    # vocabulary (`tokenizer.grown`), so every id it had keeps its meaning.
    "call": "<|call|>",
    "tool": "<|tool|>",
}
TOOL_TOKENS: tuple[str, ...] = ("<|call|>", "<|tool|>")

CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1

# How many declared names an unknown-name error lists before "...".
_MAX_LISTED = 12


class TokenizerError(ValueError):
    """A user-facing tokenizer problem; the message is one line: what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        # Callers print these as single log lines, so never let a newline through.
        super().__init__(" ".join(str(message).splitlines()))


def listed(names: Iterable[str]) -> str:
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
                    f"declare it or choose one of: {listed(ids)}"
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
