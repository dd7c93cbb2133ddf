"""From logits to a token: temperature, greedy, top-k and top-p, per row, as traced arrays.

Every request setting (temperature, top-k, top-p, seed, max-new-tokens, stop ids, banned ids) is a
per-row array traced into the program, not a static argument, so a batch of mixed settings shares
one compiled program and a stream of varied requests compiles nothing new. Banned ids (e.g. the
special tokens that are not meant to be written: <pad>, <bos>, ...) are a (B, V) boolean mask, as
wide as the logits: a banned id is never chosen, greedy or sampled, whatever its logit.

Randomness per row: the n-th token row b emits draws u ~ U(0, 1) from fold_in(key(seed_b), n), then
walks the cumulative distribution after temperature, top-k and top-p. A row's output therefore
depends on its own prompt, settings and seed alone, never on the other rows of its batch.

The KV-cache generation over decoding slots that uses these is model/decode.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
CHUNK = 32  # the most decode steps one chunk runs: the width of its output buffer
MAX_STOP_IDS = 8  # stop ids per row (<|endoftext|> included), padded with -1: one static width
TOP_K_WIDTH = 64  # top-k up to this k takes lax.top_k of this static width, a larger one a full sort


class SamplingError(ValueError):
    """Invalid sampling arguments (one line: what is wrong and the valid range)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus filtering
    max_new_tokens: int = 200  # a stop token counts as one of them
    seed: int = 0
    stop_at_eot: bool = True
    stop_ids: tuple[int, ...] = ()  # further ids that end the row, e.g. the chat end token <|end|>
    banned_ids: tuple[int, ...] = ()  # ids never sampled (e.g. specials that are not text, like <pad>)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"--top-k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise SamplingError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if any(i < 0 for i in self.stop_ids) or len(self.stop_ids) > MAX_STOP_IDS - 1:
            raise SamplingError(f"stop ids must be token ids ≥ 0, at most {MAX_STOP_IDS - 1} of them, got "
                                f"{list(self.stop_ids)}")
        object.__setattr__(self, "banned_ids", tuple(sorted({int(i) for i in self.banned_ids})))
        if any(i < 0 for i in self.banned_ids):
            raise SamplingError(f"banned ids must be token ids ≥ 0, got {list(self.banned_ids)}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One row's new tokens with their log-probabilities.

    `tokens` ends with the stop token when one ended the row (`stop_token`; None when the row ran to
    max_new_tokens), so every token the sampler chose has its log-probs. `content` leaves it out.
    `sampler_logprobs` are under the distribution the token was drawn from (after temperature,
    top-k and top-p; 0 for greedy rows, a point mass). `model_logprobs` are the model's own
    log-softmax at temperature 1 without filtering: what a policy-gradient update needs.
    """

    tokens: list[int]
    sampler_logprobs: list[float]
    model_logprobs: list[float]
    stop_token: int | None
    # Positions in `tokens` the runtime wrote, not the model (a tool's result: model/agent.py); their
    # log-probs are 0 and mean nothing. Empty without tools.
    forced: tuple[int, ...] = ()

    @property
    def content(self) -> list[int]:
        return self.tokens[:-1] if self.stop_token is not None else self.tokens


# --- choosing a token ------------------------------------------------------------------------------

def filter_rows(logits_BV: Array, temperature_B: Array, top_k_B: Array, top_p_B: Array) -> Array:
    """Scale row b by 1/T_b, then set every token outside its top-k_b (0 = off) and outside its top-p_b
    nucleus (1 = off) to -inf.

    k is a per-row value, not a static one: the k-th largest value of row b is sorted_b[k_b − 1], and
    tokens below it go. Sorting is the costly part (XLA's CPU sort most of all), so the work depends
    on what the rows ask for: nothing when no row filters; `lax.top_k` with a static width of
    TOP_K_WIDTH when only top-k is asked for and every k fits in it; otherwise one descending argsort
    serves both filters (the nucleus is a prefix of the same order: tokens the top-k removed sort
    last, with no mass).
    """
    B, V = logits_BV.shape
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature_B, 1e-6).astype(jnp.float32)[:, None]
    use_k_B = (top_k_B > 0) & (top_k_B < V)
    use_p_B = top_p_B < 1.0
    width = min(V, TOP_K_WIDTH)

    def cut_below(x_BV, sorted_BW):
        kth_B1 = jnp.take_along_axis(sorted_BW, jnp.clip(top_k_B - 1, 0, sorted_BW.shape[-1] - 1)[:, None], axis=-1)
        return jnp.where(use_k_B[:, None] & (x_BV < kth_B1), -jnp.inf, x_BV)

    def top_k_narrow(x_BV):
        return cut_below(x_BV, jax.lax.top_k(x_BV, width)[0])

    def top_k_and_p(x_BV):
        order_BV = jnp.argsort(-x_BV, axis=-1)
        x_BV = cut_below(x_BV, jnp.take_along_axis(x_BV, order_BV, axis=-1))
        sorted_probs_BV = jnp.take_along_axis(jax.nn.softmax(x_BV, axis=-1), order_BV, axis=-1)
        # Keep token i (in sorted order) while the mass before it is < p: the smallest prefix with mass ≥ p.
        mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
        keep_sorted_BV = (mass_before_BV < top_p_B[:, None]) | ~use_p_B[:, None]
        keep_BV = jnp.zeros_like(keep_sorted_BV).at[jnp.arange(B)[:, None], order_BV].set(keep_sorted_BV)
        return jnp.where(keep_BV, x_BV, -jnp.inf)

    narrow = jnp.all(~use_k_B | (top_k_B <= width))
    branch = jnp.where(jnp.any(use_p_B) | (jnp.any(use_k_B) & ~narrow), 2, jnp.where(jnp.any(use_k_B), 1, 0))
    return jax.lax.switch(branch, [lambda x_BV: x_BV, top_k_narrow, top_k_and_p], scaled_BV)


def sample_rows(logits_BV: Array, u_B: Array, temperature_B: Array, top_k_B: Array,
                top_p_B: Array, banned_BV: Array | None = None) -> tuple[Array, Array, Array]:
    """(token, sampler log-prob, model log-prob) per row, given one uniform draw u_b per row.

    Greedy rows (temperature 0) take the argmax. The others walk the cumulative distribution after
    filtering to the first token whose cumulative mass exceeds u_b · total. Ids where banned_BV is
    True are out of both (their logits become -inf before any filter); the model log-prob is still
    the model's own, over the whole vocabulary.
    """
    V = logits_BV.shape[-1]
    greedy_B = temperature_B == 0
    allowed_BV = logits_BV.astype(jnp.float32)
    if banned_BV is not None:
        if banned_BV.shape != logits_BV.shape:
            raise SamplingError(f"the banned-ids mask has shape {banned_BV.shape}, the logits {logits_BV.shape}; "
                                "give one mask row per row, as wide as the vocabulary")
        allowed_BV = jnp.where(banned_BV, -jnp.inf, allowed_BV)
    filtered_BV = filter_rows(allowed_BV, temperature_B, jnp.where(greedy_B, 0, top_k_B),
                              jnp.where(greedy_B, 1.0, top_p_B))
    probs_BV = jax.nn.softmax(filtered_BV, axis=-1)
    cdf_BV = jnp.cumsum(probs_BV, axis=-1)
    r_B1 = u_B[:, None] * cdf_BV[:, -1:]
    drawn_B = jnp.sum(cdf_BV <= r_B1, axis=-1)
    # Float round-off could step past the last token with mass; land on the highest-mass one instead.
    last_valid_B = V - 1 - jnp.argmax(probs_BV[:, ::-1] > 0, axis=-1)
    drawn_B = jnp.minimum(drawn_B, last_valid_B)
    token_B = jnp.where(greedy_B, jnp.argmax(allowed_BV, axis=-1), drawn_B).astype(jnp.int32)

    def at_token(x_BV):
        return jnp.take_along_axis(x_BV, token_B[:, None], axis=-1)[:, 0]

    sampler_lp_B = jnp.where(greedy_B, 0.0, at_token(jax.nn.log_softmax(filtered_BV, axis=-1)))
    model_lp_B = at_token(jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1))
    return token_B, sampler_lp_B, model_lp_B


_filter_rows_jit = jax.jit(filter_rows)
_sample_rows_jit = jax.jit(sample_rows)


def _broadcast(B: int, temperature, top_k, top_p) -> tuple[Array, Array, Array]:
    return (jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,)),
            jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,)),
            jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,)))


def filter_logits(logits_BV: Array, temperature, top_k, top_p) -> Array:
    """Scale by 1/T, then set every token outside the top-k and outside the top-p nucleus to -inf.
    Each setting is one value for every row or one per row (B,)."""
    return _filter_rows_jit(logits_BV, *_broadcast(logits_BV.shape[0], temperature, top_k, top_p))


def next_token(logits_BV: Array, key: Array, temperature, top_k, top_p) -> Array:
    """Greedy when temperature is 0; otherwise draw r ~ U(0, 1) and walk the cumulative distribution.
    The rows share `key` (B draws from it); settings are one value or one per row (B,)."""
    u_B = jax.random.uniform(key, (logits_BV.shape[0],))
    return _sample_rows_jit(logits_BV, u_B, *_broadcast(logits_BV.shape[0], temperature, top_k, top_p))[0]


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


# --- the host side ---------------------------------------------------------------------------------

def prompt_width(length: int, context: int) -> int:
    """The padded width a prompt of `length` tokens is prefilled at: the next power of two, at most
    the context, so varied prompt lengths share log2(context) + 1 programs."""
    return min(context, 1 << max(length - 1, 0).bit_length())

