"""A Hugging Face `tokenizers` tokenizer (a model's tokenizer.json) behind plutao's interface.

Its ids are the original's: `encode` is `tokenizers`' encoding without the post-processor's added
tokens (no BOS), and literal special-token strings in the text are encoded as text, as every kind
here does. The special tokens are the file's added special tokens, at their own ids; which role each
plays (eot, eos, bos, pad, and the chat roles where the model's template has them) is declared by
whoever builds it (train/interop/hf_tokenizer.py reads that from tokenizer_config.json).

Saved as tokenizer.json (plutao's, as for every kind) beside the original files in hf/, so a model
exported back (`plutao export-hf`) carries them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import Tokenizer, require_str, write_atomic
from .specials import SpecialTokens, TokenizerError

FILES_DIR = "hf"
TOKENIZER_FILE = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("an hf tokenizer needs the `tokenizers` package; pip install tokenizers") from None
    return tokenizers


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from its JSON definition, with the specials declared at its ids."""

    kind = "hf"

    def __init__(self, definition: str | bytes, specials: SpecialTokens | Mapping[str, int] | None,
                 extra_files: Mapping[str, bytes] | None = None) -> None:
        self.definition = definition.decode("utf-8") if isinstance(definition, bytes) else str(definition)
        try:
            tok = _tokenizers().Tokenizer.from_str(self.definition)
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file)
            raise TokenizerError(f"the Hugging Face tokenizer.json cannot be read ({str(e).splitlines()[0][:200]}); "
                                 "it is corrupt or from a newer `tokenizers`") from None
        tok.encode_special_tokens = True  # (a literal "<|endoftext|>" in the text is text)
        self._tok = tok
        self.extra_files = dict(extra_files or {})  # the original's other files (tokenizer_config.json, ...)
        declared = SpecialTokens.coerce(specials)
        for name, i in declared.ids.items():
            if tok.id_to_token(i) != name:
                raise TokenizerError(f"special token {name!r} is declared at id {i}, but the Hugging Face "
                                     f"tokenizer has {tok.id_to_token(i)!r} there")
        super().__init__(tok.get_vocab_size(with_added_tokens=True), declared)

    def encode(self, text: str) -> list[int]:
        require_str(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        # (in one call: a cut anywhere, even between lines, can change how a pre-tokenizer splits)
        return np.asarray(self.encode(text), np.int32)

    def _decode_run(self, ids: np.ndarray) -> str:
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def _token_string(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or f"<{token_id}>"

    def _definition_bytes(self) -> bytes:
        return self.definition.encode("utf-8")

    def _config(self) -> dict[str, Any]:
        return {"files": FILES_DIR}

    def _save_files(self, directory: Path) -> None:
        (directory / FILES_DIR).mkdir(exist_ok=True)
        write_atomic(directory / FILES_DIR / TOKENIZER_FILE, self.definition.encode("utf-8"))
        for name, data in self.extra_files.items():
            write_atomic(directory / FILES_DIR / name, data)

    def _grow_files(self, directory: Path, names: list[str]) -> None:
        """Add `names` as special tokens at the next ids."""
        tok = _tokenizers().Tokenizer.from_str(self.definition)
        tok.add_special_tokens([_tokenizers().AddedToken(n, special=True, normalized=False) for n in names])
        write_atomic(directory / FILES_DIR / TOKENIZER_FILE, tok.to_str().encode("utf-8"))

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> HFTokenizer:
        files = directory / str(config.get("files", FILES_DIR))
        try:
            definition = (files / TOKENIZER_FILE).read_text(encoding="utf-8")
            extra = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file() and p.name != TOKENIZER_FILE}
        except OSError as e:
            raise TokenizerError(f"cannot read the Hugging Face tokenizer in {str(files)!r}: {e.strerror or e}; "
                                 "import the model again (`plutao import-hf`)") from None
        return cls(definition, SpecialTokens.from_config(config, directory), extra)
