"""Embedding probes: cosine neighbours and word analogies over a (V, D) table.

Pure numpy, so a trained model's embedding table (`np.asarray(model.token_embed[...])`) can be
inspected without JAX, and the probes can be tested on hand-built tables whose answers are known.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _unit_rows(table_VD: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1; zero rows stay zero so their cosine is 0 rather than NaN."""
    table = np.asarray(table_VD, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"the table must have shape (V, D), got {table.shape}")
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return np.divide(table, norms, out=np.zeros_like(table), where=norms > 0)


def _unit(vector_D: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector_D, dtype=np.float64)
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else np.zeros_like(vector)


def _check_id(token_id: int, vocab: int, what: str = "token id") -> int:
    if not 0 <= int(token_id) < vocab:
        raise ValueError(f"{what} {token_id} is outside the table (0..{vocab - 1})")
    return int(token_id)


def cosine_similarities(table_VD: np.ndarray, query_D: np.ndarray) -> np.ndarray:
    """Cosine of `query_D` with every row, shape (V,); a zero row or zero query scores 0."""
    unit = _unit_rows(table_VD)
    query = np.asarray(query_D, dtype=np.float64)
    if query.shape != (unit.shape[1],):
        raise ValueError(f"the query must have shape ({unit.shape[1]},), got {query.shape}")
    return unit @ _unit(query)


def _top_k(sims_V: np.ndarray, k: int, excluded: Iterable[int]) -> list[tuple[int, float]]:
    """The k highest scores, descending, ties broken by the smaller id so results are deterministic."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    vocab = sims_V.shape[0]
    keep = np.ones(vocab, dtype=bool)
    for i in excluded:
        keep[_check_id(i, vocab, "excluded id")] = False
    ids = np.flatnonzero(keep)
    order = np.lexsort((ids, -sims_V[ids]))[:k]
    return [(int(ids[i]), float(sims_V[ids[i]])) for i in order]


def nearest_neighbors(
    table_VD: np.ndarray, token_id: int, k: int = 10, exclude: Iterable[int] = ()
) -> list[tuple[int, float]]:
    """The k rows most cosine-similar to row `token_id` (itself and `exclude` left out), best first."""
    unit = _unit_rows(table_VD)
    token_id = _check_id(token_id, unit.shape[0])
    return _top_k(unit @ unit[token_id], k, [token_id, *exclude])


def analogy(
    table_VD: np.ndarray, a: int, b: int, c: int, k: int = 5, exclude: Iterable[int] = ()
) -> list[tuple[int, float]]:
    """Rows closest by cosine to vec(a) − vec(b) + vec(c): king − man + woman ≈ queen.

    This is 3CosAdd on unit vectors, as word2vec computes it: each of a, b, c is normalised first so a
    long (frequent) vector cannot dominate the offset. a, b and c themselves are never answers, since
    the query usually stays closest to a.
    """
    unit = _unit_rows(table_VD)
    vocab = unit.shape[0]
    a, b, c = (_check_id(i, vocab) for i in (a, b, c))
    query = unit[a] - unit[b] + unit[c]
    return _top_k(unit @ _unit(query), k, [a, b, c, *exclude])
