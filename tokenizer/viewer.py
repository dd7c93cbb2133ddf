"""Human-readable token table: what a text costs in tokens."""

from __future__ import annotations

import unicodedata

from .base import Tokenizer
from .specials import TokenizerError

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _visible(s: str) -> str:
    """`s` with control/invisible characters escaped so each token stays on one table row."""
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c != " " and unicodedata.category(c)[0] in "CZ":
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def format_tokens(tok: Tokenizer, text: str, price_per_1k: float | None = None) -> str:
    """Table of (index, id, token) for `text`, a count line, and a cost line if a price is given."""
    if price_per_1k is not None and not price_per_1k >= 0:
        raise TokenizerError(f"price_per_1k must be a non-negative number, got {price_per_1k!r}")
    ids = tok.encode(text)
    strings = tok.token_strings(ids)
    index_w = max(len("index"), len(str(max(len(ids) - 1, 0))))
    id_w = max(len("id"), len(str(tok.vocab_size - 1)))
    lines = [f"{'index':>{index_w}}  {'id':>{id_w}}  token"]
    lines += [f"{i:>{index_w}}  {t:>{id_w}}  '{_visible(s)}'" for i, (t, s) in enumerate(zip(ids, strings))]
    n = len(ids)
    ratio = f"{len(text) / n:.2f}" if n else "n/a"
    lines.append(
        f"tokens: {n}  chars: {len(text)}  chars/token: {ratio}  ({tok.kind}, vocab_size {tok.vocab_size})"
    )
    if price_per_1k is not None:
        lines.append(f"cost: ${n * price_per_1k / 1000:.6f} at ${price_per_1k:g} per 1k tokens")
    return "\n".join(lines)
