"""From logits to text: temperature, greedy, top-k, top-p, and KV-cache generation.

`next_token` is a pure function of (logits, key). Generation runs a jitted loop per window:
one prefill of the prompt fills the KV cache, then each step feeds only the newest token.
When a sequence outgrows the context, the last `context // 2` tokens are re-prefilled and
decoding continues (positions must stay inside the trained range).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


class SamplingError(ValueError):
    """Invalid sampling arguments (one line: what is wrong and the valid range)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus filtering
    max_new_tokens: int = 200
    seed: int = 0
    stop_at_eot: bool = True

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"--top-k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise SamplingError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")


def filter_logits(logits_BV: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """Scale by 1/T, then set every token outside the top-k and outside the top-p nucleus to -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        order_BV = jnp.argsort(-logits_BV, axis=-1)
        sorted_probs_BV = jnp.take_along_axis(jax.nn.softmax(logits_BV, axis=-1), order_BV, axis=-1)
        # Keep token i (in sorted order) while the mass before it is < p: the smallest prefix with mass ≥ p.
        mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
        keep_sorted_BV = mass_before_BV < top_p
        keep_BV = jnp.zeros_like(keep_sorted_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
        logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
    return logits_BV


def next_token(logits_BV: Array, key: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """Greedy when temperature is 0; otherwise draw r ~ U(0, 1) and walk the cumulative distribution."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    probs_BV = jax.nn.softmax(filter_logits(logits_BV, temperature, top_k, top_p), axis=-1)
    cdf_BV = jnp.cumsum(probs_BV, axis=-1)
    r_B1 = jax.random.uniform(key, (logits_BV.shape[0], 1)) * cdf_BV[:, -1:]
    token_B = jnp.sum(cdf_BV <= r_B1, axis=-1)
    # Float round-off could step past the last token with mass; land on the highest-mass one instead.
    last_valid_B = logits_BV.shape[-1] - 1 - jnp.argmax(probs_BV[:, ::-1] > 0, axis=-1)
    return jnp.minimum(token_B, last_valid_B).astype(jnp.int32)


def top_candidates(logits_V: np.ndarray, k: int, temperature: float = 1.0) -> list[tuple[int, float]]:
    """The k most likely next tokens with their probabilities under softmax(logits / T)."""
    z = logits_V.astype(np.float64) / max(temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    top = np.argsort(-p)[:k]
    return [(int(i), float(p[i])) for i in top]


def to_host(x) -> np.ndarray:
    """A replicated result as numpy, also when it spans devices of other processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    first_valid = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = p
        first_valid[b] = width - len(p)
    return tokens, first_valid


def _prefill(model, tokens_BP, first_valid_B):
    """Run the prompt window through the model once, filling a fresh KV cache."""
    B = tokens_BP.shape[0]
    cache = model.init_cache(B, model.cfg.context_length)
    out = model(tokens_BP, cache=cache, cache_index=0, first_valid_B=first_valid_B)
    return model.logits(out.hidden_BTD[:, -1]), out.cache


def _decode_step(model, token_B, cache, index, first_valid_B):
    """Feed one token per row at cache column `index`; only that token is computed."""
    out = model(token_B[:, None], cache=cache, cache_index=index, first_valid_B=first_valid_B)
    return model.logits(out.hidden_BTD[:, 0]), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "n_steps", "temperature", "top_k", "top_p", "stop"))
def _prefill_and_decode(graphdef, params, tokens_BP, first_valid_B, done_B, base_key, start_index, eot_id,
                        *, n_steps, temperature, top_k, top_p, stop):
    """Prefill the cache with the prompt window, then emit up to n_steps tokens (fewer if all rows stop)."""
    B, P = tokens_BP.shape
    logits_BV, cache = _prefill(nnx.merge(graphdef, params), tokens_BP, first_valid_B)

    def emit(i, logits_BV, done_B):
        token_B = next_token(logits_BV, jax.random.fold_in(base_key, start_index + i), temperature, top_k, top_p)
        token_B = jnp.where(done_B, eot_id, token_B)
        return token_B, done_B | (stop & (token_B == eot_id))

    token_B, done_B = emit(0, logits_BV, done_B)
    out_BN = jnp.full((B, n_steps), eot_id, jnp.int32).at[:, 0].set(token_B)

    def cond(carry):
        i, _, _, done_B, _, _ = carry
        return (i < n_steps) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, done_B, out_BN, params = carry
        # The parameters travel in the carry and the module is rebuilt here: NNX modules (and the
        # scan over layers inside them) must live at the loop body's trace level.
        logits_BV, cache = _decode_step(nnx.merge(graphdef, params), token_B, cache, P + i - 1, first_valid_B)
        token_B, done_B = emit(i, logits_BV, done_B)
        return i + 1, token_B, cache, done_B, out_BN.at[:, i].set(token_B), params

    n, _, _, done_B, out_BN, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token_B, cache, done_B, out_BN,
                                                                 params))
    return out_BN, n, done_B


def _check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SamplingError("every prompt needs at least one token (start from the end-of-text token)")
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise SamplingError(f"the prompt has {longest} tokens but the model's context is {context}; shorten it")


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, eot_id: int,
             pad_id: int) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens (stopping at <|endoftext|> if asked)."""
    context = model.cfg.context_length
    _check_prompts(prompts, context)
    graphdef, params = nnx.split(model)
    base_key = jax.random.key(sampling.seed)
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    produced = 0
    window = seqs
    while produced < sampling.max_new_tokens and not done.all():
        tokens, first_valid = _left_pad(window, pad_id)
        n_steps = min(context - tokens.shape[1] + 1, sampling.max_new_tokens - produced)
        out, n, done_after = _prefill_and_decode(
            graphdef, params, tokens, first_valid, done, base_key, produced, eot_id, n_steps=n_steps,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, stop=sampling.stop_at_eot)
        n = int(to_host(n))
        out = to_host(out)[:, :n]
        for b in range(len(prompts)):
            if done[b]:
                continue
            row = out[b].tolist()
            if sampling.stop_at_eot and eot_id in row:
                row = row[: row.index(eot_id)]
            new[b].extend(row)
            seqs[b].extend(row)
        done = to_host(done_after).copy()
        produced += n
        window = [s[-(context // 2):] for s in seqs]
    return new


_prefill_jit = jax.jit(lambda graphdef, params, tokens, first_valid: _prefill(nnx.merge(graphdef, params), tokens,
                                                                             first_valid), static_argnums=0)
_decode_step_jit = jax.jit(lambda graphdef, params, token, cache, index, first_valid: _decode_step(
    nnx.merge(graphdef, params), token, cache, index, first_valid), static_argnums=0, donate_argnums=3)
_next_token_jit = jax.jit(next_token, static_argnums=(2, 3, 4))


def stream(model: nnx.Module, prompt: Sequence[int], sampling: SamplingConfig, *, eot_id: int,
           pad_id: int) -> Iterator[int]:
    """Yield new tokens one at a time; the same tokens as `generate` gives for this prompt and seed."""
    context = model.cfg.context_length
    _check_prompts([prompt], context)
    graphdef, params = nnx.split(model)
    base_key = jax.random.key(sampling.seed)
    seq, produced, window = list(prompt), 0, list(prompt)
    while produced < sampling.max_new_tokens:
        tokens, first_valid = _left_pad([window], pad_id)
        logits_BV, cache = _prefill_jit(graphdef, params, tokens, first_valid)
        index = tokens.shape[1]
        while True:
            token = int(to_host(_next_token_jit(logits_BV, jax.random.fold_in(base_key, produced), sampling.temperature,
                                              sampling.top_k, sampling.top_p))[0])
            if sampling.stop_at_eot and token == eot_id:
                return
            yield token
            seq.append(token)
            produced += 1
            if produced >= sampling.max_new_tokens or index >= context:
                break
            logits_BV, cache = _decode_step_jit(graphdef, params, np.array([token], np.int32), cache, index,
                                                first_valid)
            index += 1
        window = seq[-(context // 2):]
