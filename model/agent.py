"""The agent loop: sampling in which a row may stop to call a tool and then go on.

A row pauses when it emits `pause_id` (the chat template's <|tool|>, which closes a call). Between
decode chunks the host asks `answer(row, tokens so far, calls so far)` for the tokens to append —
the tool's result and what the template writes after it — and `extend` writes them into that slot's
KV cache at its own column (or, when they do not fit, restarts the slot's cache from its tail); the row then emits its next token from the same random stream
and goes on, while the other rows keep decoding in the same chunks. Forced tokens do not count
against a row's max_new_tokens and are reported by position (`Completion.forced`), with log-probs 0.
Knowing nothing of tokenizers or tools, the loop takes `answer` from its caller
(tokenizer/chat.py: tool_answerer builds one from a run's tokenizer and a set of tools). A row is
answered at most max_calls + 1 times (the last answer is the caller's refusal); a row that calls
again after that ends there, so a reply's length stays bounded by its budget and its answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.decode import (
    Emitted,
    Rows,
    SlotDecoder,
    Slots,
    _batch_axes,
    _choose,
    _host,
    _per_row,
    _prefill_window,
    _put,
    _stop_set,
)
from plutao.model.sampling import CHUNK, Completion, SamplingConfig, SamplingError, prompt_width

Answer = Callable[[int, list[int], int], list[int]]  # (row, its new tokens so far, calls so far) → tokens


# --- appending forced tokens to a live slot ----------------------------------------------------

def _gathered(slots: Slots, ids_N, axes: list[int]):
    """The cache rows of slots ids_N."""
    leaves, treedef = jax.tree.flatten(slots.cache)
    return jax.tree.unflatten(treedef, [jnp.take(leaf, ids_N, axis=a, mode="clip") for leaf, a in zip(leaves, axes)])


def _go_on(slots: Slots, ids_N, axes, cache_N, window_NC, index_N, logits_NV) -> tuple[Slots, Emitted]:
    """Rows ids_N, given a new cache, emit their next token from their own stream and budget."""
    N = ids_N.shape[0]
    rows_N = Rows(*(jnp.take(x, ids_N, axis=0, mode="clip") for x in slots.rows))
    produced_N = jnp.take(slots.produced_B, ids_N, mode="clip")
    token_N, sampler_lp_N, model_lp_N, stops_N = _choose(logits_NV, rows_N, produced_N)
    slots = _put(slots, ids_N, axes, cache_N, window_BC=window_NC, index_B=index_N, token_B=token_N,
                 produced_B=produced_N + 1, active_B=~stops_N)
    return slots, Emitted(token_N, sampler_lp_N, model_lp_N, jnp.ones((N,), bool))


def _extend(graphdef, params, slots: Slots, ids_N, tokens_NK, count_N, context: int):
    """Rows ids_N feed count_n tokens each (their newest token, not yet fed, then the forced ones; the
    rest of the K columns is padding) at their own cache columns, then emit their next token. The
    padding lands beyond the row's index, where nothing attends before it is overwritten."""
    model = nnx.merge(graphdef, params)
    axes = _batch_axes(model, context)
    N, K = tokens_NK.shape
    index_N = jnp.take(slots.index_B, ids_N, mode="clip")
    out = model(tokens_NK, cache=_gathered(slots, ids_N, axes), cache_index=index_N)
    last_N = count_N - 1
    logits_NV = model.logits(jnp.take_along_axis(out.hidden_BTD, last_N[:, None, None], axis=1)[:, 0])
    cols_NK = index_N[:, None] + jnp.arange(K)
    cols_NK = jnp.where((jnp.arange(K)[None] < count_N[:, None]) & (cols_NK < context), cols_NK, context)
    window_NC = jnp.take(slots.window_BC, ids_N, axis=0, mode="clip").at[jnp.arange(N)[:, None], cols_NK].set(
        tokens_NK, mode="drop")
    return _go_on(slots, ids_N, axes, out.cache, window_NC, index_N + count_N, logits_NV)


def _reprefill(graphdef, params, slots: Slots, ids_N, tokens_NW, lengths_N, context: int):
    """Rows ids_N start a fresh cache from the given tokens (the tail of what they hold, and the
    forced tokens: when those do not fit after it) and emit their next token, their stream going on."""
    logits_NV, cache_N, window_NC = _prefill_window(graphdef, params, tokens_NW, lengths_N, context)
    return _go_on(slots, ids_N, _batch_axes(nnx.merge(graphdef, params), context), cache_N, window_NC, lengths_N,
                  logits_NV)


_extend_jit = jax.jit(_extend, static_argnums=(0, 6), donate_argnums=2)
_reprefill_jit = jax.jit(_reprefill, static_argnums=(0, 6), donate_argnums=2)


def extend(decoder: SlotDecoder, slots: Slots, slot_ids: Sequence[int], forced: Sequence[Sequence[int]]
       ) -> tuple[Slots, Emitted]:
    """Append `forced[i]` to stopped slot slot_ids[i] after its newest token (the one it stopped
    on, e.g. the <|tool|> closing a call) and let it go on: it emits its next token from the same
    random stream, with the same settings and budget. A row whose cache cannot take them starts a
    fresh cache from its last context // 2 tokens (or as many as the forced ones need)."""
    if getattr(nnx.merge(decoder.graphdef, decoder.params), "state_carries_padding", False):
        raise SamplingError("appending tokens to a live slot (a tool's result) needs a Transformer decoder: a "
                            "recurrent model's state would run through the padding")
    ids = np.asarray(slot_ids, np.int32)
    index, window, token = (np.asarray(x) for x in _host((slots.index_B, slots.window_BC, slots.token_B)))
    fed = [[int(token[b]), *map(int, f)] for b, f in zip(ids, forced)]
    fits = [index[b] + len(f) <= decoder.context for b, f in zip(ids, fed)]
    emitted = []
    for keep in (True, False):
        part = [i for i, ok in enumerate(fits) if ok == keep]
        if not part:
            continue
        n = 1 << max(len(part) - 1, 0).bit_length()  # (padded to a power of two: few programs)
        part_ids = np.full(n, len(index), np.int32)  # (ids past the last slot change nothing)
        part_ids[:len(part)] = ids[part]
        if keep:
            width = prompt_width(max(len(fed[i]) for i in part), decoder.context)
            tokens = np.full((n, width), decoder.pad_id, np.int32)
            counts = np.ones(n, np.int32)
            for j, i in enumerate(part):
                tokens[j, :len(fed[i])], counts[j] = fed[i], len(fed[i])
            slots, e = _extend_jit(decoder.graphdef, decoder.params, slots, part_ids, tokens, counts, decoder.context)
        else:
            tails = [list(window[ids[i], :index[ids[i]]]) + fed[i] for i in part]
            keep_n = [max(decoder.context // 2, len(fed[i])) for i in part]
            if max(keep_n) > decoder.context:
                raise SamplingError(f"{max(len(fed[i]) for i in part)} forced tokens do not fit the model's "
                                    f"context of {decoder.context}; cut the tool result shorter")
            tails = [t[-k:] for t, k in zip(tails, keep_n)]
            tails += [tails[-1]] * (n - len(part))
            tokens, lengths = decoder._padded(tails)
            slots, e = _reprefill_jit(decoder.graphdef, decoder.params, slots, part_ids, tokens, lengths, decoder.context)
        emitted.append((part, e))
    out = [None] * len(ids)
    for part, e in emitted:
        e = _host(e)
        for j, i in enumerate(part):
            out[i] = tuple(np.asarray(x)[j] for x in e)
    return slots, Emitted(*(np.array([o[k] for o in out]) for k in range(4)))


def final_answer(tokens: Sequence[int], forced: Sequence[int]) -> list[int]:
    """A reply's tokens after its last forced one: the assistant's final answer (the whole reply when
    it called nothing)."""
    return list(tokens[max(forced) + 1:]) if len(forced) else list(tokens)


def complete_with_tools(model: nnx.Module, prompts: Sequence[Sequence[int]],
                        sampling: SamplingConfig | Sequence[SamplingConfig], *, eot_id: int, pad_id: int,
                        pause_id: int, answer: Answer, max_calls: int = 4, chunk: int = CHUNK,
                        on_tokens: Callable[[int, list[int], bool], None] | None = None) -> list[Completion]:
    """`decode.complete` with tool calls: each row's new tokens (forced ones included, marked), their
    log-probs, and the stop token that ended it (never the pause). `on_tokens(row, tokens, forced)` sees
    them as they come (streaming)."""
    samplings = _per_row(sampling, len(prompts))
    paused = [dataclasses.replace(s, stop_ids=s.stop_ids + (pause_id,)) for s in samplings]
    decoder = SlotDecoder.of(model, eot_id=eot_id, pad_id=pad_id)
    tokens: list[list[int]] = [[] for _ in prompts]
    sampler_lp: list[list[float]] = [[] for _ in prompts]
    model_lp: list[list[float]] = [[] for _ in prompts]
    forced: list[list[int]] = [[] for _ in prompts]
    calls = [0] * len(prompts)

    def take(emitted):
        t, s, m, v = (np.asarray(x) for x in emitted)
        if t.ndim == 1:
            t, s, m, v = t[:, None], s[:, None], m[:, None], v[:, None]
        for b in range(len(prompts)):
            keep = v[b]
            if on_tokens is not None and keep.any():
                on_tokens(b, t[b][keep].tolist(), False)
            tokens[b] += t[b][keep].tolist()
            sampler_lp[b] += s[b][keep].tolist()
            model_lp[b] += m[b][keep].tolist()

    slots, first = decoder.start(prompts, paused)
    first, active = _host((first, slots.active_B))
    take(first)
    while True:
        own = [len(tokens[b]) - len(forced[b]) for b in range(len(prompts))]
        waiting = [b for b in range(len(prompts)) if not active[b] and tokens[b] and tokens[b][-1] == pause_id
                   and own[b] < samplings[b].max_new_tokens and calls[b] <= max_calls]
        if waiting:
            extra = [list(answer(b, list(tokens[b]), calls[b])) for b in waiting]
            for b, f in zip(waiting, extra):
                if on_tokens is not None:
                    on_tokens(b, list(f), True)
                calls[b] += 1
                forced[b] += range(len(tokens[b]), len(tokens[b]) + len(f))
                tokens[b] += f
                sampler_lp[b] += [0.0] * len(f)
                model_lp[b] += [0.0] * len(f)
            slots, e = extend(decoder, slots, waiting, extra)
            for j, b in enumerate(waiting):
                if on_tokens is not None:
                    on_tokens(b, [int(e.tokens[j])], False)
                tokens[b].append(int(e.tokens[j]))
                sampler_lp[b].append(float(e.sampler_logprobs[j]))
                model_lp[b].append(float(e.model_logprobs[j]))
            active = np.asarray(_host(slots.active_B))
            continue
        if not active.any():
            break
        slots, out = decoder.run(slots, chunk)
        out, active = _host((out, slots.active_B))
        take(out)
    out = []
    for b, s in enumerate(samplings):
        stop = tokens[b][-1] if tokens[b] and tokens[b][-1] in _stop_set(s, eot_id) else None
        out.append(Completion(tokens[b], sampler_lp[b], model_lp[b], stop, tuple(forced[b])))
    return out
