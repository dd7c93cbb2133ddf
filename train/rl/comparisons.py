"""Rankings for the reward model from the arithmetic world: for fresh prompts, K replies sampled from
the SFT model at temperature 1 (one batched KV-cache call per chunk of rows), ranked by the world's
labeler (the gold order, or with world.labeler_noise a Bradley–Terry draw around it).

Each line is a ranked list (train/data/conversations.py) with the gold facts beside it in "meta", so
held-out metrics can be split by digit count and by whether both replies of a pair are wrong. With
rl.tools the replies are sampled through the agent loop (model/agent.py); a reply that called a tool is
kept as its messages (the call, the result, the final answer), which the reward model reads whole and
the labeler by its final answer only.
"""

from __future__ import annotations

import numpy as np

from plutao.model.agent import complete_with_tools
from plutao.model.decode import complete
from plutao.model.sampling import SamplingConfig
from plutao.tokenizer.chat import (
    MAX_CALLS,
    fitted_prompt_ids,
    reply_messages,
    reply_stop_ids,
    result_tokens,
    tool_answerer,
)
from plutao.tools import tools_named
from plutao.train.data.conversations import final_text
from plutao.train.worlds import arith

ROWS_PER_CALL = 256




def sample_replies(model, tokenizer, prompts: list[list[dict]], seeds: list[int], *, context: int, max_new_tokens: int,
                   temperature: float = 1.0, rows_per_call: int = ROWS_PER_CALL, tools: str = ""):
    """[(reply, reply length in tokens, ended with <|end|>)] for each prompt (its own seed), in calls of
    `rows_per_call` rows (the last one padded; fewer rows: padded to a power of two), so calls reuse a few
    compiled programs. A reply is its text, or with `tools` (names) one that called a tool its messages."""
    stops = reply_stop_ids(tokenizer)
    ids = [fitted_prompt_ids(p, tokenizer, max(context - max_new_tokens, context // 2, 1))[0] for p in prompts]
    answer = tool_answerer(tokenizer, tools_named(tools), max_calls=MAX_CALLS,
                           max_result_tokens=result_tokens(context, max_new_tokens, MAX_CALLS)) if tools else None
    out = []
    for lo in range(0, len(ids), rows_per_call):
        part, part_seeds = ids[lo:lo + rows_per_call], seeds[lo:lo + rows_per_call]
        n = len(part)
        rows = rows_per_call if len(ids) > rows_per_call else max(8, 1 << (n - 1).bit_length())
        part = part + [part[-1]] * (rows - n)  # (a few row counts: one program each)
        samplings = [SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, seed=s, stop_ids=stops)
                     for s in part_seeds + [0] * (len(part) - n)]
        if answer is None:
            done = complete(model, part, samplings, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
        else:
            done = complete_with_tools(model, part, samplings, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id,
                                       pause_id=tokenizer.tool_id, answer=answer, max_calls=MAX_CALLS)
        out += [reply_of(tokenizer, c) for c in done[:n]]
    return out


def reply_of(tokenizer, c) -> tuple[str | list[dict], int, bool]:
    """(reply, its length in tokens, ended with <|end|>) of a sampled completion: its text, or when the
    runtime answered a call the reply's messages (the stop token left out of both)."""
    ended = c.stop_token == tokenizer.end_id
    if c.forced:
        return reply_messages(tokenizer, c.tokens, c.forced), len(c.content), ended
    return tokenizer.decode(c.content), len(c.content), ended


def make_rankings(model, tokenizer, world: arith.World, *, held_out: bool, context: int, n: int,
                  log=lambda msg: None, tools: str = "") -> list[dict]:
    prompts, problems, ks = zip(*(arith.comparison_prompt(world, i, held_out=held_out) for i in range(n)))
    rows, seeds, owner = [], [], []
    for i, (p, k) in enumerate(zip(prompts, ks)):
        for j in range(k):
            rows.append(p)
            seeds.append(int(world.seed * 1_000_003 + (2 * i + held_out) * 17 + j) % (2 ** 31))
            owner.append(i)
    log(f"sampling {len(rows):,} replies for {n:,} {'held-out ' if held_out else ''}prompts (K={world.k_min}..{world.k_max})")
    replies = sample_replies(model, tokenizer, list(rows), seeds, context=context,
                             max_new_tokens=arith.reply_budget(world, context), tools=tools)
    lines, at = [], 0
    for i, (p, prob, k) in enumerate(zip(prompts, problems, ks)):
        group = replies[at:at + k]
        at += k
        keys = [arith.gold_key(prob, final_text(reply), ended) for reply, _, ended in group]
        gold = arith.gold_ranks(keys)
        rng = world.rng(arith.LABELER, 2 * i + held_out)
        labels = arith.labeler_ranks(keys, world.labeler_noise, rng)
        order = np.argsort(labels, kind="stable")
        lines.append({
            "prompt": p, "responses": [group[j][0] for j in order], "ranks": [int(labels[j]) for j in order],
            "meta": {"problem": prob.to_dict(), "digits": prob.digits,
                     "correct": [bool(keys[j][0]) for j in order], "gold_ranks": [int(gold[j]) for j in order],
                     "forms": [arith.reply_form(final_text(group[j][0])) for j in order],
                     "ended": [bool(group[j][2]) for j in order]},
        })
    return lines


def usable(line: dict) -> bool:
    """A ranking with at least two levels (K identical replies teach nothing)."""
    return len(set(line["ranks"])) > 1
