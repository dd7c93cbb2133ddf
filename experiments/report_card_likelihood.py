"""The report card's rows that read fixed token sequences instead of sampling: KL to the reference and
entropy over a column's own temperature-1 replies, and the log-probability each run gives the gold
answer (the demonstrator's direct reply) — how much of its mass sits on the right answer, which
accuracy alone does not show (RL sharpens a distribution; a base model spreads it)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from plutao.experiments.report_card_stats import Reply
from plutao.model.heads import forward_logits
from plutao.train.losses import token_logprobs
from plutao.train.rl.rollouts import Prompt, pack


def kl_and_entropy(run, reference, prompt_ids: Sequence[Sequence[int]], replies: Sequence[Reply],
                   rows: int = 128) -> tuple[float, float]:
    """(mean KL(run ‖ reference) per reply, mean entropy per reply token) over replies sampled from the
    run at temperature 1: Σ over each reply's positions of the exact KL of the next-token
    distributions (an unbiased estimate of the sequence-level KL, ≥ 0), on the run's own tokens."""

    tok, context = run.tokenizer, run.cfg.model.context_length
    graph_a, params_a = nnx.split(run.model)
    graph_b, params_b = nnx.split(reference.model)
    both = _kl_pass(graph_a, graph_b)
    kl, ent, n_tok = [], 0.0, 0
    for lo in range(0, len(replies), rows):
        part = list(range(lo, min(lo + rows, len(replies))))
        part += [part[-1]] * (rows - len(part))
        roll = pack(tok, [Prompt([])] * rows, [list(prompt_ids[i]) for i in part],
                    [list(replies[i].tokens) for i in part], [[0.0] * len(replies[i].tokens) for i in part], context)
        kl_BT, ent_BT = (np.asarray(x) for x in both(params_a, params_b, roll.tokens))
        n = min(rows, len(replies) - lo)
        mask = roll.loss_weights[:n]
        kl += (kl_BT[:n] * mask).sum(1).tolist()
        ent += float((ent_BT[:n] * mask).sum())
        n_tok += int(mask.sum())
    return float(np.mean(kl)), ent / max(n_tok, 1)


@functools.cache
def _kl_pass(graph_a, graph_b):
    from plutao.train.rl.objectives import entropy, kl_exact

    def run(params_a, params_b, tokens):
        logits_a, _ = forward_logits(nnx.merge(graph_a, params_a), tokens)
        logits_b, _ = forward_logits(nnx.merge(graph_b, params_b), tokens)
        return kl_exact(logits_a, logits_b), entropy(logits_a)

    return jax.jit(run)


def gold_logprobs(run, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                  rows: int = 128) -> list[float]:
    """log p(answer | prompt) under the run, summed over the answer's tokens, per (prompt, answer)."""
    tok, context = run.tokenizer, run.cfg.model.context_length
    graph, params = nnx.split(run.model)
    score = _logprob_pass(graph)
    out = []
    for lo in range(0, len(answer_ids), rows):
        part = list(range(lo, min(lo + rows, len(answer_ids))))
        n = len(part)
        part += [part[-1]] * (rows - n)
        roll = pack(tok, [Prompt([])] * rows, [list(prompt_ids[i]) for i in part],
                    [list(answer_ids[i]) for i in part], [[0.0] * len(answer_ids[i]) for i in part], context)
        logp_BT = np.asarray(score(params, roll.tokens, roll.targets))
        out += (logp_BT[:n] * roll.loss_weights[:n]).sum(1).tolist()
    return [float(x) for x in out]


@functools.cache
def _logprob_pass(graph):
    def run(params, tokens, targets):
        logits, _ = forward_logits(nnx.merge(graph, params), tokens)
        return token_logprobs(logits, targets)

    return jax.jit(run)
