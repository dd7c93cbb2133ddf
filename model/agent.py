"""The agent loop: sampling in which a row may stop to call a tool and then go on.

A row pauses when it emits `pause_id` (the chat template's <|tool|>, which closes a call). Between
decode chunks the host asks `answer(row, tokens so far, calls so far)` for the tokens to append —
the tool's result and what the template writes after it — and `SlotDecoder.extend` writes them into
that slot's cache at its own column; the row then emits its next token from the same random stream
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

import numpy as np
from flax import nnx

from plutao.model.decode import SlotDecoder, _host, _per_row, _stop_set
from plutao.model.sampling import CHUNK, Completion, SamplingConfig

Answer = Callable[[int, list[int], int], list[int]]  # (row, its new tokens so far, calls so far) → tokens


def final_answer(tokens: Sequence[int], forced: Sequence[int]) -> list[int]:
    """A reply's tokens after its last forced one: the assistant's final answer (the whole reply when
    it called nothing)."""
    return list(tokens[max(forced) + 1:]) if len(forced) else list(tokens)


def complete_with_tools(model: nnx.Module, prompts: Sequence[Sequence[int]],
                        sampling: SamplingConfig | Sequence[SamplingConfig], *, eot_id: int, pad_id: int,
                        pause_id: int, answer: Answer, max_calls: int = 4, chunk: int = CHUNK) -> list[Completion]:
    """`decode.complete` with tool calls: each row's new tokens (forced ones included, marked), their
    log-probs, and the stop token that ended it (never the pause)."""
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
                calls[b] += 1
                forced[b] += range(len(tokens[b]), len(tokens[b]) + len(f))
                tokens[b] += f
                sampler_lp[b] += [0.0] * len(f)
                model_lp[b] += [0.0] * len(f)
            slots, e = decoder.extend(slots, waiting, extra)
            for j, b in enumerate(waiting):
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
