"""Train a tokenizer by kind name, or load a saved one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .base import Tokenizer
from .bpe import BPETokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .hf import HFTokenizer
from .specials import CONFIG_FILE, FORMAT_VERSION, SpecialTokens, TokenizerError
from .word import WordTokenizer

TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {
    "char": CharTokenizer,
    "byte": ByteTokenizer,
    "bpe": BPETokenizer,
    "word": WordTokenizer,
    "hf": HFTokenizer,  # (imported with a model, never trained here)
}


def _check_kind(kind: object) -> str:
    if kind not in TOKENIZER_KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")
    return str(kind)


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    specials: SpecialTokens | Mapping[str, int] | None = None,
) -> Tokenizer:
    """Train a `kind` tokenizer on `texts`; vocab_size is required for bpe, caps word (None = every word)
    and is ignored by char and byte, whose vocabularies are fixed by the data (char) or by design (byte).
    `specials` declares the special tokens' ids (None: the historical layout, SPECIAL_TOKENS at 0..10)."""
    kind = _check_kind(kind)
    if kind == "hf":
        raise TokenizerError("an hf tokenizer comes with the model it belongs to; import one with `plutao import-hf "
                             "DIR --workdir RUN` and start from that run (train.init_from=RUN)")
    if kind == "char":
        return CharTokenizer.train(texts, specials)
    if kind == "byte":
        return ByteTokenizer(specials)
    if kind == "word":
        return WordTokenizer.train(texts, vocab_size, specials)
    if vocab_size is None:
        raise TokenizerError("a bpe tokenizer needs a vocab_size; set data.vocab_size (e.g. 8192)")
    return BPETokenizer.train(texts, vocab_size, specials)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer written by Tokenizer.save; its fingerprint is checked against tokenizer.json."""
    path = Path(directory)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise TokenizerError(
            f"no tokenizer directory at {str(path)!r}; train a tokenizer and save it there first "
            "(or point to the directory that holds tokenizer.json)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(
            f"{str(path)!r} has no {CONFIG_FILE}; train a tokenizer and save it there first "
            "(or point to the directory that holds tokenizer.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(
            f"cannot read {str(config_path)!r} ({type(e).__name__}: {e}); it is corrupt, "
            "delete the directory and save the tokenizer again"
        ) from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{str(config_path)!r} is not a JSON object; save the tokenizer again")
    version = config.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise TokenizerError(
            f"{str(config_path)!r} has format_version {version!r} but this code reads {FORMAT_VERSION}; "
            "use a matching plutao version or retrain the tokenizer"
        )
    kind = config.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise TokenizerError(
            f"{str(config_path)!r} has unknown kind {kind!r} (expected one of: {', '.join(TOKENIZER_KINDS)}); "
            "it is corrupt, save the tokenizer again"
        )
    tok = TOKENIZER_KINDS[kind]._from_config(config, path)
    expected = {
        "vocab_size": tok.vocab_size,
        "special_ids": tok.specials,
        "fingerprint": tok.fingerprint,
    }
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise TokenizerError(
                f"{str(config_path)!r} says {key}={config[key]!r} but its vocabulary gives {value!r}; "
                "the files do not belong together, save the tokenizer again"
            )
    return tok


def grown(tokenizer: Tokenizer, names: Iterable[str]) -> Tokenizer:
    """The same tokenizer with the special tokens `names` declared at the ids after its vocabulary, in
    order (those it declares already are kept where they are): every id it had encodes and decodes as
    before, so a model grows by new embedding rows only. Growing by nothing new returns it unchanged."""
    new = [n for n in dict.fromkeys(names) if not tokenizer.has_special(n)]
    if not new:
        return tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        tokenizer._grow_files(Path(d), new)
        config = json.loads((Path(d) / CONFIG_FILE).read_text())
        config["special_ids"] = dict(config["special_ids"]) | {n: tokenizer.vocab_size + i for i, n in enumerate(new)}
        config["vocab_size"] = tokenizer.vocab_size + len(new)
        out = type(tokenizer)._from_config(config, Path(d))
    if out.vocab_size != config["vocab_size"] or out.ordinary_ids.tolist() != tokenizer.ordinary_ids.tolist():
        raise TokenizerError(f"a {tokenizer.kind} tokenizer cannot grow by {', '.join(new)} without moving its ids")
    return out
