"""Decoding an encoder-decoder model: greedy and beam search over KV caches.

The source is encoded once; each decoder layer's cross-attention keys and values are computed once
from it; the decoder's self-attention keys and values are cached, so each step computes only the
newest token. Both decoders are one jitted `while_loop` that ends when every row has emitted <eos>.

Beam search keeps the K highest-scoring prefixes (sum of log-probabilities) per source. A finished
hypothesis keeps its score and only "extends" by padding. At the end hypotheses are ranked by
score / lp(length) with GNMT's length penalty lp(n) = ((5 + n) / 6)^α (α = 0: raw log-probability,
which favours short outputs; larger α favours longer ones).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
NEG_INF = -1e9  # finite: sums of several stay comparable and never become NaN


def length_penalty(length: Array, alpha: float) -> Array:
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def greedy_decode(graphdef, params, src_BS: Array, src_valid_BS: Array, bos_id, eos_id, *, max_len: int):
    """(tokens (B, max_len) ending in <eos> then <eos> padding, log-prob of each row's output (B,))."""
    model = nnx.merge(graphdef, params)
    B = src_BS.shape[0]
    memory_BSD, _ = model.encode(src_BS, src_valid_BS)
    kv = model.memory_kv(memory_BSD)
    cache = model.init_cache(B, max_len)
    state = (jnp.int32(0), jnp.full((B,), bos_id, jnp.int32), cache, jnp.zeros((B,), bool),
             jnp.full((B, max_len), eos_id, jnp.int32), jnp.zeros((B,), jnp.float32), params, kv)

    def cond(s):
        return (s[0] < max_len) & ~jnp.all(s[3])

    def body(s):
        i, token_B, cache, done_B, out_BL, score_B, params, kv = s
        logits_B1V, cache, _ = nnx.merge(graphdef, params).decode(token_B[:, None], kv, src_valid_BS, cache=cache,
                                                                  cache_index=i)
        logp_BV = jax.nn.log_softmax(logits_B1V[:, 0])
        nxt_B = jnp.argmax(logp_BV, axis=-1).astype(jnp.int32)
        score_B = score_B + jnp.where(done_B, 0.0, jnp.take_along_axis(logp_BV, nxt_B[:, None], axis=-1)[:, 0])
        nxt_B = jnp.where(done_B, eos_id, nxt_B)
        return (i + 1, nxt_B, cache, done_B | (nxt_B == eos_id), out_BL.at[:, i].set(nxt_B), score_B, params, kv)

    _, _, _, _, out_BL, score_B, _, _ = jax.lax.while_loop(cond, body, state)
    return out_BL, score_B


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "beam_size", "alpha"))
def beam_search(graphdef, params, src_BS: Array, src_valid_BS: Array, bos_id, eos_id, pad_id, *, max_len: int,
                beam_size: int, alpha: float):
    """Hypotheses (B, K, max_len), their length-normalised scores (B, K) and raw log-probs (B, K), each row's
    hypotheses sorted best first. Tokens after a hypothesis' <eos> are padding."""
    model = nnx.merge(graphdef, params)
    B, K = src_BS.shape[0], beam_size
    memory_BSD, _ = model.encode(src_BS, src_valid_BS)
    # Every beam of a source shares its encoder output: repeat rows K times (row b·K + k).
    memory_NSD = jnp.repeat(memory_BSD, K, axis=0)
    valid_NS = jnp.repeat(src_valid_BS, K, axis=0)
    kv = model.memory_kv(memory_NSD)
    cache = model.init_cache(B * K, max_len)
    # Only beam 0 is live at the start, so the first step's K candidates are K different tokens.
    score_BK = jnp.tile(jnp.array([0.0] + [NEG_INF] * (K - 1), jnp.float32), (B, 1))
    state = (jnp.int32(0), jnp.full((B, K), bos_id, jnp.int32), cache, jnp.zeros((B, K), bool),
             jnp.full((B, K, max_len), pad_id, jnp.int32), score_BK, jnp.zeros((B, K), jnp.int32), params, kv)

    def cond(s):
        return (s[0] < max_len) & ~jnp.all(s[3])

    def body(s):
        i, token_BK, cache, done_BK, out_BKL, score_BK, length_BK, params, kv = s
        logits_N1V, cache, _ = nnx.merge(graphdef, params).decode(token_BK.reshape(B * K, 1), kv, valid_NS,
                                                                  cache=cache, cache_index=i)
        V = logits_N1V.shape[-1]
        logp_BKV = jax.nn.log_softmax(logits_N1V[:, 0]).reshape(B, K, V)
        # A finished hypothesis has exactly one continuation (padding) that leaves its score unchanged.
        finished_V = jnp.full((V,), NEG_INF).at[pad_id].set(0.0)
        logp_BKV = jnp.where(done_BK[:, :, None], finished_V, logp_BKV)
        cand_BX = (score_BK[:, :, None] + logp_BKV).reshape(B, K * V)
        score_BK, flat_BK = jax.lax.top_k(cand_BX, K)
        beam_BK, tok_BK = flat_BK // V, (flat_BK % V).astype(jnp.int32)
        take = functools.partial(jnp.take_along_axis, indices=beam_BK, axis=1)
        was_done_BK = take(done_BK)
        out_BKL = jnp.take_along_axis(out_BKL, beam_BK[:, :, None], axis=1).at[:, :, i].set(tok_BK)
        length_BK = take(length_BK) + (~was_done_BK).astype(jnp.int32)
        done_BK = was_done_BK | (tok_BK == eos_id)
        rows_N = (jnp.arange(B)[:, None] * K + beam_BK).reshape(B * K)
        cache = jax.tree.map(lambda c: c[rows_N], cache)
        return i + 1, tok_BK, cache, done_BK, out_BKL, score_BK, length_BK, params, kv

    _, _, _, done_BK, out_BKL, score_BK, length_BK, _, _ = jax.lax.while_loop(cond, body, state)
    norm_BK = jnp.where(done_BK | (length_BK == max_len), score_BK / length_penalty(length_BK, alpha), NEG_INF)
    order_BK = jnp.argsort(-norm_BK, axis=1)
    sort = functools.partial(jnp.take_along_axis, indices=order_BK, axis=1)
    return jnp.take_along_axis(out_BKL, order_BK[:, :, None], axis=1), sort(norm_BK), sort(score_BK)


def strip(tokens: np.ndarray, eos_id: int, pad_id: int) -> list[int]:
    """The ids of one output row up to (not including) its first <eos>, without padding."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == eos_id:
            break
        if t != pad_id:
            out.append(t)
    return out
