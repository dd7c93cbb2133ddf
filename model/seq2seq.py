"""Decoding an encoder-decoder model: greedy and beam search over KV caches.

The source is encoded once; each decoder layer's cross-attention keys and values are computed once
from it; the decoder's self-attention keys and values are cached, so each step computes only the
newest token. Both decoders are one jitted `while_loop` that ends when every row has emitted <eos>.

Beam search keeps the K highest-scoring prefixes (sums of log-probabilities) per source alive, and
moves each hypothesis that ends in <eos> to a pool of the K best finished ones, ranked by
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
        live = nnx.merge(graphdef, params)
        out = live.decode(token_B[:, None], kv, src_valid_BS, cache=cache, cache_index=i)
        cache = out.cache
        logp_BV = jax.nn.log_softmax(live.logits(out.hidden_BTD[:, 0]))
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
    hypotheses sorted best first. Tokens after a hypothesis' <eos> are padding.

    K prefixes stay alive; a hypothesis that emits <eos> leaves them for a separate pool of the K best
    finished ones, ranked by score / lp(length) (as GNMT, fairseq and Hugging Face do), so a finished
    short hypothesis never holds a beam slot that a longer, better-normalised one needed. Each step
    takes the top 2K continuations: at most K of them end in <eos> (one per alive prefix), so K
    alive ones always remain. A row is done when its worst finished hypothesis beats the best score
    any alive prefix could still reach (its log-probability can only fall, and lp is largest at
    max_len); prefixes that reach max_len without <eos> compete with the finished ones at the end.
    """
    model = nnx.merge(graphdef, params)
    B, K = src_BS.shape[0], beam_size
    memory_BSD, _ = model.encode(src_BS, src_valid_BS)
    # Every beam of a source shares its encoder output: repeat rows K times (row b·K + k).
    memory_NSD = jnp.repeat(memory_BSD, K, axis=0)
    valid_NS = jnp.repeat(src_valid_BS, K, axis=0)
    kv = model.memory_kv(memory_NSD)
    cache = model.init_cache(B * K, max_len)
    lp_max = length_penalty(jnp.int32(max_len), alpha)
    empty_BKL = jnp.full((B, K, max_len), pad_id, jnp.int32)
    none_BK = jnp.full((B, K), NEG_INF, jnp.float32)
    # Only beam 0 is live at the start, so the first step's candidates are K different tokens.
    alive = {"tokens": empty_BKL, "raw": jnp.tile(jnp.array([0.0] + [NEG_INF] * (K - 1), jnp.float32), (B, 1)),
             "last": jnp.full((B, K), bos_id, jnp.int32)}
    finished = {"tokens": empty_BKL, "norm": none_BK, "raw": none_BK}
    state = (jnp.int32(0), alive, finished, cache, jnp.zeros((B,), bool), params, kv)

    def gather(tree, index_BK):
        """Entries along axis 1 (the hypotheses) of every (B, X, ...) array in the tree."""
        return jax.tree.map(lambda a: jnp.take_along_axis(a, index_BK.reshape(*index_BK.shape, *[1] * (a.ndim - 2)),
                                                          axis=1), tree)

    def cond(s):
        return (s[0] < max_len) & ~jnp.all(s[4])

    def body(s):
        i, alive, finished, cache, done_B, params, kv = s
        live = nnx.merge(graphdef, params)
        out = live.decode(alive["last"].reshape(B * K, 1), kv, valid_NS, cache=cache, cache_index=i)
        cache = out.cache
        logits_NV = live.logits(out.hidden_BTD[:, 0])
        V = logits_NV.shape[-1]
        logp_BKV = jax.nn.log_softmax(logits_NV).reshape(B, K, V)
        raw_B2K, flat_B2K = jax.lax.top_k((alive["raw"][:, :, None] + logp_BKV).reshape(B, K * V), 2 * K)
        beam_B2K, tok_B2K = flat_B2K // V, (flat_B2K % V).astype(jnp.int32)
        tokens_B2KL = jnp.take_along_axis(alive["tokens"], beam_B2K[:, :, None], axis=1).at[:, :, i].set(tok_B2K)
        ends_B2K = (tok_B2K == eos_id) & (raw_B2K > NEG_INF / 2)
        # Finished: the pool and this step's <eos> candidates, the best K by normalised score.
        pool = {"tokens": jnp.concatenate([finished["tokens"], tokens_B2KL], 1),
                "raw": jnp.concatenate([finished["raw"], jnp.where(ends_B2K, raw_B2K, NEG_INF)], 1)}
        norm_B2K = jnp.where(ends_B2K, raw_B2K / length_penalty(i + 1, alpha), NEG_INF)
        norm_BK, best_BK = jax.lax.top_k(jnp.concatenate([finished["norm"], norm_B2K], 1), K)
        new_finished = gather(pool, best_BK) | {"norm": norm_BK}
        # Alive: the best K continuations that did not end.
        raw_BK, grow_BK = jax.lax.top_k(jnp.where(ends_B2K, NEG_INF, raw_B2K), K)
        tokens_BKL, tok_BK, beam_BK = gather((tokens_B2KL, tok_B2K, beam_B2K), grow_BK)
        cache = jax.tree.map(lambda c: c[(jnp.arange(B)[:, None] * K + beam_BK).reshape(B * K)], cache)
        new_alive = {"tokens": tokens_BKL, "raw": raw_BK, "last": tok_BK}
        # Rows already done keep what they had.
        keep = functools.partial(jax.tree.map, lambda old, new: jnp.where(
            done_B.reshape(B, *[1] * (old.ndim - 1)), old, new))
        new_finished, new_alive = keep(finished, new_finished), keep(alive, new_alive)
        done_B = done_B | (jnp.min(new_finished["norm"], axis=1) > new_alive["raw"][:, 0] / lp_max)
        return i + 1, new_alive, new_finished, cache, done_B, params, kv

    i, alive, finished, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    # Prefixes that ran to max_len without <eos> are complete hypotheses too (if the loop got there).
    at_limit_BK = jnp.where((i == max_len) & (alive["raw"] > NEG_INF / 2), alive["raw"] / lp_max, NEG_INF)
    pool = {"tokens": jnp.concatenate([finished["tokens"], alive["tokens"]], 1),
            "raw": jnp.concatenate([finished["raw"], alive["raw"]], 1)}
    norm_BK, best_BK = jax.lax.top_k(jnp.concatenate([finished["norm"], at_limit_BK], 1), K)
    best = gather(pool, best_BK)
    return best["tokens"], norm_BK, best["raw"]


def strip(tokens: np.ndarray, eos_id: int, pad_id: int) -> list[int]:
    """The ids of one output row up to (not including) its first <eos>, without padding."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == eos_id:
            break
        if t != pad_id:
            out.append(t)
    return out
