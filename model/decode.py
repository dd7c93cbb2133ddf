"""KV-cache generation over decoding slots, with the per-row sampling of model/sampling.py.

Two programs do the work:

- a prefill of N left-padded prompts into N decoding slots, emitting each row's first token. The
  prompt width is padded up to a power of two (at most the context), so prompt lengths compile
  log2(context) + 1 shapes at most;
- a decode chunk: a `while_loop` of up to `CHUNK` steps (the count is traced) in which every active
  slot emits one token, ending early once every slot has stopped. Only the chunk's tokens travel
  to the host, once per chunk.

Slot b keeps its own tokens at cache columns [0, index_b) and writes its next token at index_b, so
each row overflows the context on its own schedule: it then re-prefills its last `context // 2`
tokens (positions must stay inside the trained range) while the other slots keep decoding. A left-
padded prefill starts at column len_b − width, so its padding never reaches the cache
(model/attention.py: write_cache) and a row's cache does not depend on the width it was padded to.

Randomness per row: the n-th token row b emits draws u ~ U(0, 1) from fold_in(key(seed_b), n), then
walks the cumulative distribution after temperature, top-k and top-p. A row's output therefore
depends on its own prompt, settings and seed alone, never on the other rows of its batch. Each row
also carries its banned ids as a row of a (B, V) boolean mask (a traced input as wide as the
vocabulary), so rows with different bans share one program too.

`SlotDecoder` is the engine a continuous-batching server drives: `fill` prefills new prompts into
chosen slots while the others keep their state, `step` advances every active slot by one token
with its own settings; model/agent.py's `extend` appends tokens a row did not choose (a tool's
result) to a live slot. `generate`, `complete` and `stream` are built on it.

Only `_prefill` and `_decode_step` call the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.sampling import (
    CHUNK,
    MAX_STOP_IDS,
    Array,
    Completion,
    SamplingConfig,
    SamplingError,
    prompt_width,
    sample_rows,
    to_host,
)


class Rows(NamedTuple):
    """Per-row sampling settings as arrays: the traced form of one SamplingConfig per row."""

    temperature_B: Array  # float32; 0 = greedy
    top_k_B: Array  # int32; 0 = off
    top_p_B: Array  # float32; 1 = off
    seed_B: Array  # uint32
    max_new_B: Array  # int32
    stop_BS: Array  # int32 (B, MAX_STOP_IDS); -1 = none
    banned_BV: Array  # bool (B, V): ids the row never emits


class Slots(NamedTuple):
    """A batch of decoding slots: every row carries its own cache column, random stream and settings."""

    cache: Any  # the model's cache for B rows
    window_BC: Array  # int32: the token at each cache column (what a re-prefill reads back)
    index_B: Array  # int32: columns filled, i.e. where the next token is written
    token_B: Array  # int32: the newest token, emitted but not yet fed to the model
    produced_B: Array  # int32: tokens emitted so far, the step of the row's random stream
    active_B: Array  # bool: still producing (filled, not stopped, below max_new_tokens)
    rows: Rows


class Emitted(NamedTuple):
    """What one call produced, per slot: (B,) for a fill or a step, (B, CHUNK) for a chunk."""

    tokens: Array  # int32
    sampler_logprobs: Array  # float32: under the filtered, tempered distribution (0 for greedy)
    model_logprobs: Array  # float32: log_softmax(logits) at the token, temperature 1, no filtering
    valid: Array  # bool: the slot emitted this token (inactive slots and steps past a stop do not)


def _row_uniforms(seed_B: Array, produced_B: Array) -> Array:
    """Row b's draw for its produced_b-th token: a stream of its own seed and step alone."""
    return jax.vmap(lambda seed, n: jax.random.uniform(jax.random.fold_in(jax.random.key(seed), n), ()))(
        seed_B, produced_B)


def _choose(logits_BV: Array, rows: Rows, produced_B: Array) -> tuple[Array, Array, Array, Array]:
    """The next token of each row and whether the row stops with it (a stop id, or max_new reached)."""
    token_B, sampler_lp_B, model_lp_B = sample_rows(logits_BV, _row_uniforms(rows.seed_B, produced_B),
                                                    rows.temperature_B, rows.top_k_B, rows.top_p_B, rows.banned_BV)
    stops_B = jnp.any(rows.stop_BS == token_B[:, None], axis=-1) | (produced_B + 1 >= rows.max_new_B)
    return token_B, sampler_lp_B, model_lp_B, stops_B


# --- the model calls -------------------------------------------------------------------------------

def _prefill(model, tokens_NW: Array, lengths_N: Array, context: int) -> tuple[Array, Any]:
    """Left-padded prompts through the model into a fresh cache; row n's real tokens land at columns
    [0, len_n) (the write starts at column len_n − W; padding falls before the cache and is dropped).
    Returns the logits for each row's next token and the cache."""
    N, W = tokens_NW.shape
    cache = model.init_cache(N, context)
    out = model(tokens_NW, cache=cache, cache_index=lengths_N - W, first_valid_B=jnp.zeros((N,), jnp.int32))
    return model.logits(out.hidden_BTD[:, -1]), out.cache  # (the LM head at the last position only)


def _decode_step(model, token_B: Array, cache, index_B: Array) -> tuple[Array, Any]:
    """Feed one token per row at its own cache column index_b; only that token is computed."""
    out = model(token_B[:, None], cache=cache, cache_index=index_B)
    return model.logits(out.hidden_BTD[:, 0]), out.cache


# --- slots -----------------------------------------------------------------------------------------

def _batch_axes(model, context: int) -> list[int]:
    """Which axis of each cache leaf is the batch (leaves in tree order): where a 1-row and a 2-row
    cache differ. Works for any model's cache layout (per-layer lists, scanned stacks, RNN states)."""
    one, two = (jax.tree.leaves(jax.eval_shape(lambda b=b: model.init_cache(b, context))) for b in (1, 2))
    return [next(i for i, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q) for a, b in zip(one, two)]


def _put(slots: Slots, ids_N: Array, axes: list[int], cache_N, **fields_N) -> Slots:
    """Slots with rows ids_N of the cache (and of the named fields) replaced; an id out of range
    (≥ B) changes nothing."""
    def put(big, small, axis=0):
        return big.at[(slice(None),) * axis + (ids_N,)].set(small.astype(big.dtype), mode="drop")

    leaves, treedef = jax.tree.flatten(slots.cache)
    cache = jax.tree.unflatten(treedef, [put(b, s, a) for b, s, a in zip(leaves, jax.tree.leaves(cache_N), axes)])
    if "rows" in fields_N:
        fields_N["rows"] = Rows(*(put(b, s) for b, s in zip(slots.rows, fields_N["rows"])))
    return slots._replace(cache=cache, **{k: v if k == "rows" else put(getattr(slots, k), v)
                                          for k, v in fields_N.items()})


def _prefill_window(graphdef, params, tokens_NW, lengths_N, context: int):
    """Prefill left-padded rows: (logits for each row's next token, cache, the token at each cache column)."""
    W = tokens_NW.shape[1]
    logits_NV, cache_N = _prefill(nnx.merge(graphdef, params), tokens_NW, lengths_N, context)
    column_C = jnp.arange(context)
    source_NC = jnp.clip((W - lengths_N)[:, None] + column_C, 0, W - 1)
    window_NC = jnp.where(column_C < lengths_N[:, None], jnp.take_along_axis(tokens_NW, source_NC, axis=1), 0)
    return logits_NV, cache_N, window_NC


def _vocab(model) -> int:
    """The width of the model's logits (its vocabulary, padded rows included)."""
    return int(model.cfg.vocab_size)


def _empty(graphdef, params, n_slots: int, context: int) -> Slots:
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(n_slots, context)
    zeros_B = jnp.zeros((n_slots,), jnp.int32)
    rows = Rows(jnp.zeros((n_slots,), jnp.float32), zeros_B, jnp.ones((n_slots,), jnp.float32),
                jnp.zeros((n_slots,), jnp.uint32), zeros_B, jnp.full((n_slots, MAX_STOP_IDS), -1, jnp.int32),
                jnp.zeros((n_slots, _vocab(model)), bool))
    return Slots(cache, jnp.zeros((n_slots, context), jnp.int32), zeros_B, zeros_B, zeros_B,
                 jnp.zeros((n_slots,), bool), rows)


def _fill(graphdef, params, slots: Slots, ids_N, tokens_NW, lengths_N, rows_N: Rows, context: int):
    """Prefill new prompts into slots ids_N (fresh caches, fresh random streams) and emit their first
    tokens; the other slots are untouched."""
    N = tokens_NW.shape[0]
    logits_NV, cache_N, window_NC = _prefill_window(graphdef, params, tokens_NW, lengths_N, context)
    token_N, sampler_lp_N, model_lp_N, stops_N = _choose(logits_NV, rows_N, jnp.zeros((N,), jnp.int32))
    slots = _put(slots, ids_N, _batch_axes(nnx.merge(graphdef, params), context), cache_N, window_BC=window_NC,
                 index_B=lengths_N, token_B=token_N, produced_B=jnp.ones((N,), jnp.int32), active_B=~stops_N,
                 rows=rows_N)
    return slots, Emitted(token_N, sampler_lp_N, model_lp_N, jnp.ones((N,), bool))


def _start(graphdef, params, tokens_NW, lengths_N, rows_N: Rows, context: int):
    """N fresh slots filled with N prompts: one program for a whole `generate` batch's prefill."""
    N = tokens_NW.shape[0]
    return _fill(graphdef, params, _empty(graphdef, params, N, context), jnp.arange(N), tokens_NW, lengths_N,
                 rows_N, context)


def _overflowing(slots: Slots, context: int) -> Array:
    """Active rows whose cache is full: their next token needs a re-prefill, not a decode step."""
    return slots.active_B & (slots.index_B >= context)


def _emit(slots: Slots, logits_BV: Array, emit_B: Array) -> tuple[Slots, Emitted]:
    """Rows emit_B choose their next token from logits_BV; the others keep their state."""
    token_B, sampler_lp_B, model_lp_B, stops_B = _choose(logits_BV, slots.rows, slots.produced_B)
    slots = slots._replace(token_B=jnp.where(emit_B, token_B, slots.token_B), produced_B=slots.produced_B + emit_B,
                           active_B=slots.active_B & ~(emit_B & stops_B))
    return slots, Emitted(token_B, sampler_lp_B, model_lp_B, emit_B)


def _refill_one(graphdef, params, slots: Slots, context: int) -> tuple[Slots, Emitted]:
    """The first overflowing row re-prefills its last context // 2 tokens (the last H − 1 cached ones
    and its newest token, not yet fed) into a fresh cache and emits its next token."""
    B, C = slots.index_B.shape[0], context
    H = max(C // 2, 1)
    r = jnp.argmax(_overflowing(slots, C))
    tail_1H = jnp.concatenate([jax.lax.dynamic_slice_in_dim(slots.window_BC, r, 1, 0)[:, C - H + 1:],
                               jax.lax.dynamic_slice_in_dim(slots.token_B, r, 1, 0)[:, None]], axis=1)
    lengths_1 = jnp.full((1,), H, jnp.int32)
    logits_1V, cache_1, window_1C = _prefill_window(graphdef, params, tail_1H, lengths_1, C)
    slots = _put(slots, r[None], _batch_axes(nnx.merge(graphdef, params), C), cache_1, window_BC=window_1C,
                 index_B=lengths_1)
    logits_BV = jnp.zeros((B, logits_1V.shape[-1]), logits_1V.dtype).at[r].set(logits_1V[0])
    return _emit(slots, logits_BV, jnp.arange(B) == r)


def _decode_rows(graphdef, params, slots: Slots, skip_B: Array, context: int) -> tuple[Slots, Emitted]:
    """Every active row with room in its cache (and not in skip_B) feeds its newest token at its own
    column and emits the next one."""
    B, C = slots.index_B.shape[0], context
    fed_B = slots.active_B & (slots.index_B < C) & ~skip_B
    logits_BV, cache = _decode_step(nnx.merge(graphdef, params), slots.token_B, slots.cache, slots.index_B)
    window_BC = slots.window_BC.at[jnp.arange(B), jnp.where(fed_B, slots.index_B, C)].set(slots.token_B,
                                                                                           mode="drop")
    slots = slots._replace(cache=cache, window_BC=window_BC, index_B=slots.index_B + fed_B)
    return _emit(slots, logits_BV, fed_B)


def _decode_chunk(graphdef, params, slots: Slots, n_steps, context: int) -> tuple[Slots, Emitted]:
    """Up to min(n_steps, CHUNK) steps in one program, ending early once no slot is active. At every
    step each active slot emits one token (column i of the output).

    Rows whose cache is full re-prefill one after another, then every other active row decodes in
    the same step. The loops are nested this way round, re-prefills outside and a plain decoding
    loop inside, because control flow inside the per-token loop costs at every token (a conditional
    copies the cache it carries; a nested loop adds a fixed overhead), while re-prefills are rare.
    The parameters travel in every carry so that the module is built at the trace level of the
    loop body that runs it (NNX transforms inside the model, such as the scan over layers, check it).
    """
    B, C = slots.index_B.shape[0], context
    out = Emitted(jnp.zeros((B, CHUNK), jnp.int32), jnp.zeros((B, CHUNK), jnp.float32),
                  jnp.zeros((B, CHUNK), jnp.float32), jnp.zeros((B, CHUNK), bool))
    n_steps = jnp.minimum(n_steps, CHUNK)

    def write(out, i, e):
        return Emitted(*(o.at[:, i].set(jnp.where(e.valid, x, o[:, i])) for o, x in zip(out, e)))

    def refills(i, slots, out, params):
        def pending(carry):
            return jnp.any(_overflowing(carry[0], C))

        def body(carry):
            slots, out, refilled_B, params = carry
            slots, e = _refill_one(graphdef, params, slots, C)
            return slots, write(out, i, e), refilled_B | e.valid, params

        slots, out, refilled_B, _ = jax.lax.while_loop(pending, body, (slots, out, jnp.zeros((B,), bool), params))
        return slots, out, refilled_B

    def decoding(i, slots, out, skip_B, params):
        def cond(carry):
            i, slots, _, _, _ = carry
            return (i < n_steps) & jnp.any(slots.active_B) & ~jnp.any(_overflowing(slots, C))

        def body(carry):
            i, slots, out, skip_B, params = carry
            slots, e = _decode_rows(graphdef, params, slots, skip_B, C)
            return i + 1, slots, write(out, i, e), jnp.zeros_like(skip_B), params

        i, slots, out, _, _ = jax.lax.while_loop(cond, body, (i, slots, out, skip_B, params))
        return i, slots, out

    def outer_cond(carry):
        i, slots, _, _ = carry
        return (i < n_steps) & jnp.any(slots.active_B)

    def outer_body(carry):
        i, slots, out, params = carry
        slots, out, refilled_B = refills(i, slots, out, params)
        i_next, slots, out = decoding(i, slots, out, refilled_B, params)
        # If the re-prefilled rows were the only active ones and they stopped, step i still happened.
        return jnp.maximum(i_next, i + jnp.any(refilled_B)), slots, out, params

    _, slots, out, _ = jax.lax.while_loop(outer_cond, outer_body, (jnp.int32(0), slots, out, params))
    return slots, out


_empty_jit = jax.jit(_empty, static_argnums=(0, 2, 3))
_fill_jit = jax.jit(_fill, static_argnums=(0, 7), donate_argnums=2)
_start_jit = jax.jit(_start, static_argnums=(0, 5))
_decode_chunk_jit = jax.jit(_decode_chunk, static_argnums=(0, 4), donate_argnums=2)


# --- the host side ---------------------------------------------------------------------------------

def _check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SamplingError("every prompt needs at least one token (start from the end-of-text token)")
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise SamplingError(f"the prompt has {longest} tokens but the model's context is {context}; shorten it")


def _per_row(sampling: SamplingConfig | Sequence[SamplingConfig], n: int) -> list[SamplingConfig]:
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise SamplingError(f"{len(sampling)} sampling configs for {n} prompts; give one, or one per prompt")
    return sampling


def _stop_set(sampling: SamplingConfig, eot_id: int) -> tuple[int, ...]:
    return ((eot_id,) if sampling.stop_at_eot else ()) + sampling.stop_ids


def _rows(samplings: Sequence[SamplingConfig], eot_id: int, vocab: int) -> Rows:
    stop_BS = np.full((len(samplings), MAX_STOP_IDS), -1, np.int32)
    banned_BV = np.zeros((len(samplings), vocab), bool)
    for b, s in enumerate(samplings):
        ids = _stop_set(s, eot_id)
        stop_BS[b, :len(ids)] = ids
        if s.banned_ids:
            if s.banned_ids[-1] >= vocab:
                raise SamplingError(f"banned id {s.banned_ids[-1]} is outside the model's vocabulary of {vocab} ids")
            if len(s.banned_ids) >= vocab:
                raise SamplingError(f"every one of the model's {vocab} ids is banned; nothing could be sampled")
            banned_BV[b, list(s.banned_ids)] = True
    return Rows(np.array([s.temperature for s in samplings], np.float32),
                np.array([s.top_k for s in samplings], np.int32),
                np.array([s.top_p for s in samplings], np.float32),
                np.array([s.seed % 2**32 for s in samplings], np.uint32),  # as jax.random.key(seed) reads it
                np.array([s.max_new_tokens for s in samplings], np.int32), stop_BS, banned_BV)


def _left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


@dataclasses.dataclass(frozen=True)
class SlotDecoder:
    """A batch of decoding slots over one model, for a continuous-batching server (or any caller).

    `empty(n)` makes n idle slots; `fill(slots, ids, prompts, samplings)` prefills new prompts into
    slots `ids` and emits their first tokens, leaving every other slot as it was; `step(slots)`
    advances every active slot by one token with its own settings; `run(slots, n)` runs up to n
    steps (at most CHUNK) in one program. Each call returns the new slots and what was emitted
    (device arrays; `valid` marks the slots that emitted). A slot stops at its stop ids or its
    max_new_tokens and then emits nothing until it is filled again. The slots passed in are donated:
    use only the ones returned.

    Row b's tokens equal a solo `complete` of the same prompt and settings, however the slots were
    interleaved: its cache, columns and random stream are its own.
    """

    graphdef: Any
    params: Any
    context: int
    eot_id: int
    pad_id: int

    @classmethod
    def of(cls, model: nnx.Module, *, eot_id: int, pad_id: int) -> SlotDecoder:
        graphdef, params = nnx.split(model)
        return cls(graphdef, params, model.cfg.context_length, eot_id, pad_id)

    @functools.cached_property
    def vocab(self) -> int:
        """The width of the model's logits: the width of each row's banned-ids mask."""
        return _vocab(nnx.merge(self.graphdef, self.params))

    def _padded(self, prompts: Sequence[Sequence[int]], min_width: int = 1) -> tuple[np.ndarray, np.ndarray]:
        _check_prompts(prompts, self.context)
        width = prompt_width(max(min_width, *(len(p) for p in prompts)), self.context)
        return _left_pad(prompts, width, self.pad_id)

    def empty(self, n_slots: int) -> Slots:
        return _empty_jit(self.graphdef, self.params, n_slots, self.context)

    def start(self, prompts: Sequence[Sequence[int]],
              samplings: Sequence[SamplingConfig]) -> tuple[Slots, Emitted]:
        """len(prompts) fresh slots, filled (one program per prompt-width bucket)."""
        tokens, lengths = self._padded(prompts)
        return _start_jit(self.graphdef, self.params, tokens, lengths, _rows(samplings, self.eot_id, self.vocab), self.context)

    def fill(self, slots: Slots, slot_ids: Sequence[int], prompts: Sequence[Sequence[int]],
             samplings: Sequence[SamplingConfig], min_width: int = 1) -> tuple[Slots, Emitted]:
        """Prefill `prompts` into slots `slot_ids` (left-padded to at least `min_width`: fewer programs)."""
        tokens, lengths = self._padded(prompts, min_width)
        return _fill_jit(self.graphdef, self.params, slots, np.asarray(slot_ids, np.int32), tokens, lengths,
                         _rows(samplings, self.eot_id, self.vocab), self.context)

    def run(self, slots: Slots, n_steps: int = CHUNK) -> tuple[Slots, Emitted]:
        return _decode_chunk_jit(self.graphdef, self.params, slots, np.int32(n_steps), self.context)

    def step(self, slots: Slots) -> tuple[Slots, Emitted]:
        slots, out = self.run(slots, 1)
        return slots, Emitted(*(a[:, 0] for a in out))


def _host(tree):
    """Device results as numpy in one transfer (per array where they span other processes' devices)."""
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return jax.tree.map(to_host, tree)


def _completions(decoder: SlotDecoder, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingConfig],
                 chunk: int) -> Iterator[list[tuple[list[int], list[float], list[float]]]]:
    """Per chunk, each row's new (tokens, sampler log-probs, model log-probs): the prefill's first
    tokens, then up to `chunk` steps at a time (one transfer to the host each) until every row stops."""
    slots, first = decoder.start(prompts, samplings)
    first, active = _host((first, slots.active_B))
    yield [([int(t)], [float(s)], [float(m)]) for t, s, m in zip(*first[:3])]
    while active.any():
        slots, out = decoder.run(slots, chunk)
        out, active = _host((out, slots.active_B))
        yield [(row_t[valid].tolist(), row_s[valid].tolist(), row_m[valid].tolist())
               for row_t, row_s, row_m, valid in zip(*out)]


def complete(model: nnx.Module, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig | Sequence[SamplingConfig], *, eot_id: int, pad_id: int,
             chunk: int = CHUNK) -> list[Completion]:
    """Continue each prompt under its own settings (one SamplingConfig for all, or one per prompt):
    the new tokens of every row with their log-probs and the stop token that ended it."""
    samplings = _per_row(sampling, len(prompts))
    decoder = SlotDecoder.of(model, eot_id=eot_id, pad_id=pad_id)
    rows: list[tuple[list[int], list[float], list[float]]] = [([], [], []) for _ in prompts]
    for chunk_rows in _completions(decoder, prompts, samplings, chunk):
        for row, new in zip(rows, chunk_rows):
            for acc, xs in zip(row, new):
                acc.extend(xs)
    out = []
    for (tokens, sampler_lp, model_lp), s in zip(rows, samplings):
        stop = tokens[-1] if tokens and tokens[-1] in _stop_set(s, eot_id) else None
        out.append(Completion(tokens, sampler_lp, model_lp, stop))
    return out


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig | Sequence[SamplingConfig], *, eot_id: int, pad_id: int) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens, stopping at its stop tokens (not returned)."""
    return [c.content for c in complete(model, prompts, sampling, eot_id=eot_id, pad_id=pad_id)]


def stream(model: nnx.Module, prompt: Sequence[int], sampling: SamplingConfig, *, eot_id: int,
           pad_id: int, chunk: int = 8) -> Iterator[int]:
    """Yield new tokens one at a time; the same tokens as `generate` gives for this prompt and seed.
    They arrive `chunk` steps at a time from one jitted loop (the first one straight after the prefill)."""
    stops = _stop_set(sampling, eot_id)
    decoder = SlotDecoder.of(model, eot_id=eot_id, pad_id=pad_id)
    for [(tokens, _, _)] in _completions(decoder, [prompt], [sampling], chunk):
        for token in tokens:
            if token in stops:
                return
            yield token
