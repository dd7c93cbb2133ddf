"""Count-based n-gram language models (interpolated Kneser-Ney, add-k): the baseline before neural LMs.

Pure numpy, no per-token Python loops. Every distinct context gets an integer id per order: the
k-gram ending at position i is the pair (id of the (k-1)-gram ending at i-1, token i), stored as
the int64 key `ctx * V + token`; np.unique over those keys gives the k-gram table (sorted), its
counts, and the ids of the order-k contexts in one pass. Lookups are np.searchsorted on the sorted
keys, and all k-grams sharing a context form one contiguous slice of the table, so a full next-token
distribution costs O(V) per order.

Smoothing (Chen & Goodman 1998, interpolated Kneser-Ney with one discount per order):

    p_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k · N1+(h •) · p_{k-1}(w | h')) / c_k(h •)
    p_0(w)     = 1 / V                                   (so no probability is ever 0)

where h' drops the oldest token of h, c_n are the raw counts at the highest order, c_k for k < n are
continuation counts N1+(• h w) (how many distinct tokens precede h w), and
D_k = n1 / (n1 + 2 n2) from the count-of-counts of c_k. A context with c_k(h •) = 0 passes
p_{k-1} through unchanged. The corpus start acts as one extra distinct left neighbour of the first
k-gram of each order (as a padded <s> would). order=1 is the raw unigram counts interpolated with
uniform the same way.

add-k: p(w | h) = (c(h w) + k) / (c(h •) + k V) on the raw counts of the highest order.

Contexts shorter than order - 1 (at the start of a text) use the lower orders: Kneser-Ney starts
its recursion at order len(context) + 1 (identical to padding with a start symbol never seen in
training), add-k uses the raw counts of order len(context) + 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Smoothing = Literal["kneser_ney", "add_k"]
SMOOTHINGS: tuple[str, ...] = ("kneser_ney", "add_k")
FORMAT_VERSION = 1
# Discount when the count-of-counts give no estimate (no singletons, as on tiny or deduplicated data).
_FALLBACK_DISCOUNT = 0.5


def _as_tokens(tokens: Sequence[int] | np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """`tokens` as an int64 array of shape [n], with every id in [0, vocab_size)."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D sequence of int token ids, got shape {arr.shape} {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} has token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size}); "
            "use the tokenizer the model was fitted with"
        )
    return arr


def discount(counts: np.ndarray) -> float:
    """Kneser-Ney discount n1 / (n1 + 2 n2) from the count-of-counts (Ney, Essen & Kneser 1994)."""
    n1 = int(np.count_nonzero(counts == 1))
    n2 = int(np.count_nonzero(counts == 2))
    return n1 / (n1 + 2 * n2) if n1 > 0 else _FALLBACK_DISCOUNT


class NGramLM:
    """An order-n count model: per order k = 1..n, sorted k-gram keys and their (smoothing's) counts.

    keys[k-1][j] = ctx * V + token, ctx being the row of the (k-1)-gram context in keys[k-2] (0 for
    k = 1); counts[k-1][j] is the raw count (add-k, and the top order of Kneser-Ney) or the
    continuation count (lower orders of Kneser-Ney).
    """

    def __init__(
        self,
        vocab_size: int,
        order: int,
        smoothing: Smoothing,
        k: float,
        keys: Sequence[np.ndarray],
        counts: Sequence[np.ndarray],
        discounts: Sequence[float] | np.ndarray,
    ) -> None:
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {smoothing!r}; choose one of: {', '.join(SMOOTHINGS)}")
        if not (isinstance(order, (int, np.integer)) and order >= 1):
            raise ValueError(f"order must be an int >= 1 (1 = unigram), got {order!r}")
        if not (isinstance(vocab_size, (int, np.integer)) and vocab_size >= 1):
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if smoothing == "add_k" and not (np.isfinite(k) and k > 0):
            raise ValueError(f"add-k smoothing needs k > 0 (k = 0 leaves unseen tokens at 0), got {k!r}")
        if len(keys) != order or len(counts) != order or len(discounts) != order:
            raise ValueError(f"an order-{order} model needs {order} key, count and discount arrays")
        self.vocab_size = int(vocab_size)
        self.order = int(order)
        self.smoothing: Smoothing = smoothing
        self.k = float(k)
        self.keys = [np.asarray(a, dtype=np.int64) for a in keys]
        self.counts = [np.asarray(a, dtype=np.int64) for a in counts]
        self.discounts = np.asarray(discounts, dtype=np.float64)
        # Per order k, indexed by context row: c_k(h •) and N1+(h •), plus a trailing 0 that row -1
        # (an unseen context) indexes, so lookups need no masking and work on empty tables.
        self._ctx_total: list[np.ndarray] = []
        self._ctx_types: list[np.ndarray] = []
        for lvl in range(self.order):
            n_ctx = 1 if lvl == 0 else self.keys[lvl - 1].size
            ctx = self.keys[lvl] // self.vocab_size
            total = np.bincount(ctx, weights=self.counts[lvl], minlength=n_ctx)
            types = np.bincount(ctx, minlength=n_ctx).astype(np.float64)
            self._ctx_total.append(np.append(total, 0.0))
            self._ctx_types.append(np.append(types, 0.0))

    # ---- fitting --------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        tokens: Sequence[int] | np.ndarray,
        vocab_size: int,
        order: int,
        smoothing: Smoothing = "kneser_ney",
        k: float = 1.0,
    ) -> NGramLM:
        """Count every k-gram (k = 1..order) of the 1-D token stream `tokens` and smooth."""
        if not (isinstance(vocab_size, (int, np.integer)) and vocab_size >= 1):
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if not (isinstance(order, (int, np.integer)) and order >= 1):
            raise ValueError(f"order must be an int >= 1 (1 = unigram), got {order!r}")
        t_N = _as_tokens(tokens, vocab_size, "the training tokens")
        if t_N.size == 0:
            raise ValueError("no training tokens; pass a non-empty 1-D array of token ids")
        V = int(vocab_size)
        n_tok = t_N.size
        keys: list[np.ndarray] = []
        raw: list[np.ndarray] = []
        # row_k[i - k + 1] = row in keys[k-1] of the k-gram ending at position i (defined for i >= k-1).
        rows: list[np.ndarray] = []
        prev_row = np.zeros(n_tok, dtype=np.int64)  # the empty context, at every position
        for lvl in range(1, order + 1):
            if n_tok < lvl:
                keys.append(np.zeros(0, dtype=np.int64))
                raw.append(np.zeros(0, dtype=np.int64))
                rows.append(np.zeros(0, dtype=np.int64))
                continue
            # k-grams ending at i = lvl-1 .. n-1: context = the (lvl-1)-gram ending at i-1.
            key = prev_row[: n_tok - lvl + 1] * V + t_N[lvl - 1 :]
            uniq, row = np.unique(key, return_inverse=True)
            keys.append(uniq)
            raw.append(np.bincount(row, minlength=uniq.size))
            rows.append(row)
            prev_row = row
        if smoothing == "kneser_ney":
            counts = list(raw)
            for lvl in range(1, order):
                # Continuation count of each k-gram: the number of distinct (k+1)-grams it ends.
                n_grams = keys[lvl - 1].size
                if n_grams == 0:
                    continue
                cont = np.zeros(n_grams, dtype=np.int64)
                if keys[lvl].size:
                    suffix_of = np.empty(keys[lvl].size, dtype=np.int64)
                    # The (k+1)-gram ending at i has the k-gram ending at i as its suffix.
                    suffix_of[rows[lvl]] = rows[lvl - 1][1:]
                    cont = np.bincount(suffix_of, minlength=n_grams)
                cont[rows[lvl - 1][0]] += 1  # the corpus start precedes the first k-gram
                counts[lvl - 1] = cont
            discounts = [discount(c) for c in counts]
        elif smoothing == "add_k":
            counts = raw
            discounts = [0.0] * order
        else:
            raise ValueError(f"unknown smoothing {smoothing!r}; choose one of: {', '.join(SMOOTHINGS)}")
        return cls(V, order, smoothing, k, keys, counts, discounts)

    @classmethod
    def from_config(cls, tokens: Sequence[int] | np.ndarray, config: Any) -> NGramLM:
        """Fit with a ModelConfig's vocab_size, ngram_order, ngram_smoothing and ngram_k."""
        return cls.fit(tokens, config.vocab_size, config.ngram_order, config.ngram_smoothing, config.ngram_k)

    # ---- lookups --------------------------------------------------------------------------------

    def _find(self, lvl: int, key: np.ndarray) -> np.ndarray:
        """Rows of `key` in keys[lvl-1], -1 where absent."""
        table = self.keys[lvl - 1]
        if table.size == 0:
            return np.full(key.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(table, key), table.size - 1)
        return np.where(table[pos] == key, pos, -1)

    def _context_rows(self, t_N: np.ndarray) -> np.ndarray:
        """rows_CN[j, i] = row of the j-gram t[i-j:i] in keys[j-1] (0 for j = 0), -1 if unseen or i < j."""
        n = t_N.size
        rows_CN = np.full((self.order, n), -1, dtype=np.int64)
        rows_CN[0] = 0
        for j in range(1, self.order):
            prev = rows_CN[j - 1, :-1]
            found = self._find(j, np.maximum(prev, 0) * self.vocab_size + t_N[:-1])
            rows_CN[j, 1:] = np.where(prev >= 0, found, -1)
        return rows_CN

    # ---- probabilities --------------------------------------------------------------------------

    def distribution(self, context: Sequence[int] | np.ndarray) -> np.ndarray:
        """P(next token | the last order-1 tokens of `context`), float64 of shape [V], summing to 1."""
        ctx = _as_tokens(context, self.vocab_size, "the context")
        ctx = ctx[max(0, ctx.size - (self.order - 1)) :]
        m = ctx.size
        # Column m of the rows for ctx + one dummy token holds the rows of every suffix of ctx.
        rows = self._context_rows(np.append(ctx, 0))[:, m]
        V = self.vocab_size
        if self.smoothing == "add_k":
            c_V, total = self._counts_after(m + 1, int(rows[m]))
            return (c_V + self.k) / (total + self.k * V)
        p_V = np.full(V, 1.0 / V)
        for lvl in range(1, m + 2):
            c_V, total = self._counts_after(lvl, int(rows[lvl - 1]))
            if total > 0:
                d = self.discounts[lvl - 1]
                types = self._ctx_types[lvl - 1][rows[lvl - 1]]
                p_V = (np.maximum(c_V - d, 0.0) + d * types * p_V) / total
        return p_V

    def _counts_after(self, lvl: int, row: int) -> tuple[np.ndarray, float]:
        """(counts of every next token after context `row` at order `lvl`, their sum); zeros if unseen."""
        c_V = np.zeros(self.vocab_size)
        if row < 0:
            return c_V, 0.0
        table = self.keys[lvl - 1]
        lo, hi = np.searchsorted(table, [row * self.vocab_size, (row + 1) * self.vocab_size])
        c_V[table[lo:hi] - row * self.vocab_size] = self.counts[lvl - 1][lo:hi]
        return c_V, float(self._ctx_total[lvl - 1][row])

    def logprobs(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """ln P(t_i | t_<i) for i = 1..n-1 (t_0 only conditions), shape [n-1]."""
        t_N = _as_tokens(tokens, self.vocab_size, "the tokens")
        if t_N.size < 2:
            return np.zeros(0)
        rows_CN = self._context_rows(t_N)[:, 1:]
        w_M = t_N[1:]
        V = self.vocab_size
        if self.smoothing == "add_k":
            # Context length min(i, order-1): the top order except for the first order-2 positions.
            length_M = np.minimum(np.arange(1, t_N.size), self.order - 1)
            c_M = np.zeros(w_M.size)
            total_M = np.zeros(w_M.size)
            for j in np.unique(length_M).tolist():
                at = length_M == j
                c, total = self._count_of(j + 1, rows_CN[j, at], w_M[at])
                c_M[at], total_M[at] = c, total
            return np.log((c_M + self.k) / (total_M + self.k * V))
        p_M = np.full(w_M.size, 1.0 / V)
        for lvl in range(1, self.order + 1):
            row = rows_CN[lvl - 1]
            c_M, total_M = self._count_of(lvl, row, w_M)
            seen = total_M > 0
            d = self.discounts[lvl - 1]
            types_M = self._ctx_types[lvl - 1][row]
            mixed_M = (np.maximum(c_M - d, 0.0) + d * types_M * p_M) / np.where(seen, total_M, 1.0)
            p_M = np.where(seen, mixed_M, p_M)
        return np.log(p_M)

    def _count_of(self, lvl: int, row_M: np.ndarray, w_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count of (context row, w), total of the context) per position; 0 where the context is unseen."""
        found = self._find(lvl, np.maximum(row_M, 0) * self.vocab_size + w_M)
        found[row_M < 0] = -1
        c_M = np.zeros(w_M.size)
        hit = found >= 0
        c_M[hit] = self.counts[lvl - 1][found[hit]]
        return c_M, self._ctx_total[lvl - 1][row_M]  # row -1 reads the trailing 0

    def perplexity(self, tokens: Sequence[int] | np.ndarray) -> float:
        """exp(-mean ln P(t_i | t_<i)) over i = 1..n-1."""
        lp = self.logprobs(tokens)
        if lp.size == 0:
            raise ValueError("perplexity needs at least 2 tokens (the first one only conditions)")
        return float(np.exp(-lp.mean()))

    def generate(
        self, context: Sequence[int] | np.ndarray, n_tokens: int, seed: int, temperature: float = 1.0
    ) -> list[int]:
        """`n_tokens` ids sampled one by one from `distribution` (temperature 0 = greedy)."""
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        history = _as_tokens(context, self.vocab_size, "the context").tolist()
        rng = np.random.default_rng(seed)
        out: list[int] = []
        for _ in range(int(n_tokens)):
            p_V = self.distribution(history[max(0, len(history) - (self.order - 1)) :])
            if temperature == 0:
                tok = int(np.argmax(p_V))
            else:
                if temperature != 1.0:
                    logits = np.log(p_V) / temperature
                    p_V = np.exp(logits - logits.max())
                cdf = np.cumsum(p_V)
                tok = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
                tok = min(tok, self.vocab_size - 1)  # guards the u * cdf[-1] == cdf[-1] rounding edge
            out.append(tok)
            history.append(tok)
        return out

    # ---- size and persistence -------------------------------------------------------------------

    def table_size(self) -> dict[str, Any]:
        """Stored n-grams per order against the V^k possible ones: the curse of dimensionality."""
        stored = {k: int(self.keys[k - 1].size) for k in range(1, self.order + 1)}
        possible = {k: self.vocab_size**k for k in range(1, self.order + 1)}  # Python ints: no overflow
        arrays = [*self.keys, *self.counts, *self._ctx_total, *self._ctx_types, self.discounts]
        return {
            "order": self.order,
            "vocab_size": self.vocab_size,
            "ngrams": stored,
            "total": sum(stored.values()),
            "possible": possible,
            "fraction_stored": {k: stored[k] / possible[k] for k in stored},
            "bytes": int(sum(a.nbytes for a in arrays)),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model to `path` (an .npz archive of plain arrays, no pickle)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "order": self.order,
            "smoothing": self.smoothing,
            "k": self.k,
        }
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        arrays["discounts"] = self.discounts
        for lvl in range(1, self.order + 1):
            arrays[f"keys_{lvl}"] = self.keys[lvl - 1]
            arrays[f"counts_{lvl}"] = self.counts[lvl - 1]
        # A file object, so np.savez writes exactly `path` instead of appending ".npz".
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NGramLM:
        """Read a model written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            try:
                meta = json.loads(z["meta"].tobytes().decode("utf-8"))
                if meta.get("format_version") != FORMAT_VERSION:
                    raise ValueError(
                        f"{path} has n-gram format_version {meta.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; refit the model"
                    )
                order = int(meta["order"])
                keys = [z[f"keys_{lvl}"] for lvl in range(1, order + 1)]
                counts = [z[f"counts_{lvl}"] for lvl in range(1, order + 1)]
                discounts = z["discounts"]
            except KeyError as e:
                raise ValueError(f"{path} is not a saved n-gram model (no {e}); save it again") from None
        return cls(meta["vocab_size"], order, meta["smoothing"], meta["k"], keys, counts, discounts)
