"""Rollouts: prompts → replies from the policy (the jitted KV-cache sampler) → training rows.

A rollout batch is a pure function of (policy parameters, seed, RL step): the prompts of step k are
a fixed slice of the prompt source, reply j of row b draws from its own seed, so a resumed run
samples exactly what the uninterrupted one did.

Rows are laid out as training rows (right-padded prompt + reply, `targets` = tokens shifted by one):
position t holds the prediction of token t + 1, and `loss_weights` is 1 at the positions whose
target is a reply token the policy chose (its stop token included: ending is an action too). The
reward model reads the same token ids, not a re-encoding of the decoded text: prompt + reply +
<|end|> (when the reply ended with it) + <|reward|>, its score read at <|reward|>.

With rl.tools (a policy whose tokenizer has the tool tokens) the replies come from the agent loop
(model/agent.py): a tool's result sits inside the row where the runtime wrote it, with loss weight 0
and no sampler log-prob (a hole in the mask: GAE and the losses skip it), the reward model reads the
whole row, tool turns included, and the gold checker reads the assistant's final answer (the text
after the last tool turn), never the tool's output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from plutao.model.agent import complete_with_tools, final_answer
from plutao.model.decode import complete
from plutao.model.sampling import SamplingConfig, prompt_width
from plutao.tokenizer import Tokenizer
from plutao.tokenizer.chat import (
    MAX_CALLS,
    ChatError,
    fitted_prompt_ids,
    reply_stop_ids,
    result_tokens,
    tool_answerer,
)
from plutao.tools import ToolError, tools_named
from plutao.train.config.errors import UserError
from plutao.train.data.conversations import read_problems, single_path
from plutao.train.worlds import arith


@dataclasses.dataclass(frozen=True)
class Prompt:
    messages: list[dict]
    answer: str | None = None  # the verifiable answer (None: no gold judge for this prompt)
    digits: int = 0  # the arithmetic world's digit count (0 = not from the world)


def gold_reward(prompt: Prompt, reply: str, ended: bool) -> float | None:
    """1 when the reply's answer (its last number, or the whole reply for a non-numeric answer) is the
    expected one and the reply ended with <|end|>, else 0; None without an answer to check against."""
    if prompt.answer is None:
        return None
    try:
        want = int(prompt.answer)
    except ValueError:
        return float(ended and reply.strip() == prompt.answer)
    return float(ended and arith.answer_of(reply) == want)


class PromptSource:
    """The prompts of each RL step: the world's fresh questions (an endless stream) or a JSONL file's
    problems ({"messages": [...], "answer": "..."} per line), taken in order and cycled; the file's
    last tenth is held out for the greedy evaluation."""

    def __init__(self, cfg):
        self.world = cfg.world
        path = single_path(cfg.data)
        self.builtin = path == "builtin:arith"
        if not self.builtin:
            if path is None or not path.endswith(".jsonl"):
                raise UserError(f"data.path={cfg.data.path!r}: rollout prompts come from builtin:arith or a .jsonl "
                                "file of problems ({\"messages\": [...], \"answer\": \"...\"} per line)")
            items = [Prompt(m, a) for m, a in read_problems(path)]
            if len(items) < 2:
                raise UserError(f"{path} holds {len(items)} problem(s); give at least 2 (the last tenth is held out "
                                "for evaluation)")
            cut = len(items) - max(1, len(items) // 10)
            self.items, self.held = items[:cut], items[cut:]
        self.name = "builtin:arith" if self.builtin else path

    def prompt(self, index: int) -> Prompt:
        if self.builtin:
            messages, p = arith.rl_prompt(self.world, index)
            return Prompt(messages, str(p.answer), p.digits)
        return self.items[index % len(self.items)]

    def step(self, step: int, n: int) -> list[Prompt]:
        return [self.prompt(step * n + i) for i in range(n)]

    def held_out(self, per_digits: int) -> list[Prompt]:
        """Greedy-evaluation problems: per digit count 1–5 (the world) or the file's first ones."""
        if self.builtin:
            return [Prompt(m, str(p.answer), d) for d in range(1, arith.MAX_DIGITS + 1)
                    for m, p in (arith.evaluation_problem(self.world, d, 100_000 + i) for i in range(per_digits))]
        return self.held[:per_digits * arith.MAX_DIGITS]


@dataclasses.dataclass
class Rollout:
    """One rollout batch on the host: N rows (prompts × replies per prompt)."""

    prompts: list[Prompt]  # one per row
    tokens: np.ndarray  # (N, W) int32: prompt + reply, right-padded
    targets: np.ndarray  # (N, W) int32
    loss_weights: np.ndarray  # (N, W) float32: 1 at the reply's actions
    sampler_logprobs: np.ndarray  # (N, W) float32: the sampler's model log-probs at the actions
    rm_tokens: np.ndarray  # (N, W') int32: what the reward model reads
    rm_index: np.ndarray  # (N,) int32: where it reads (the <|reward|> token)
    replies: list[str]
    lengths: np.ndarray  # (N,) reply tokens (the stop token included)
    ended: np.ndarray  # (N,) bool: the reply ended with <|end|>
    calls: np.ndarray  # (N,) int32: tool calls the runtime answered in the reply

    @property
    def n(self) -> int:
        return len(self.prompts)

    def gold(self) -> np.ndarray:
        """(N,) the gold reward of each row (NaN where the prompt has no answer)."""
        return np.array([np.nan if (g := gold_reward(p, r, bool(e))) is None else g
                         for p, r, e in zip(self.prompts, self.replies, self.ended)], np.float32)




def check_tools(tools: str, tokenizer: Tokenizer) -> None:
    """rl.tools must name known tools, and the policy must have the tokens to call them."""
    try:
        tools_named(tools)
    except ToolError as e:
        raise UserError(f"rl.tools={tools}: {e}") from None
    if tools and not tokenizer.has_tools:
        raise UserError(f"rl.tools={tools}: the policy's tokenizer has no tool tokens; start from an SFT run trained "
                        "to call tools (data.add_specials and world.tool_rate)")


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens kept (older turns dropped first) so prompt + reply + <|reward|> fit the context."""
    return max(context - max_new_tokens - 1, context // 2, 1)


def sample(model, tokenizer: Tokenizer, prompts: list[Prompt], seeds: list[int], *, context: int,
           max_new_tokens: int, temperature: float, tools: str | list[str] = "") -> Rollout:
    """Replies to `prompts` (row b drawing from seeds[b]) in one batched sampler call, as training rows;
    with `tools` (names) through the agent loop, a tool's result marked as not the policy's."""
    try:
        ids = [fitted_prompt_ids(p.messages, tokenizer, prompt_budget(context, max_new_tokens))[0] for p in prompts]
    except ChatError as e:
        raise UserError(str(e)) from None
    stops = reply_stop_ids(tokenizer)
    samplings = [SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, seed=s, stop_ids=stops)
                 for s in seeds]
    if tools:
        answer = tool_answerer(tokenizer, tools_named(tools), max_calls=MAX_CALLS,
                               max_result_tokens=result_tokens(context, max_new_tokens, MAX_CALLS))
        completions = complete_with_tools(model, ids, samplings, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id,
                                          pause_id=tokenizer.tool_id, answer=answer, max_calls=MAX_CALLS)
    else:
        completions = complete(model, ids, samplings, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
    return pack(tokenizer, prompts, ids, [c.tokens for c in completions],
                [c.model_logprobs for c in completions], context, [c.forced for c in completions])


def pack(tokenizer: Tokenizer, prompts: list[Prompt], prompt_ids: list[list[int]], replies: list[list[int]],
         logprobs: list[list[float]], context: int, forced: list | None = None) -> Rollout:
    """Training rows (and reward-model rows) of prompts and the sampled reply tokens; `forced[b]`: the
    positions of reply b the runtime wrote (a tool's result), which are no action of the policy."""
    N = len(prompts)
    forced = forced or [()] * N
    if max(len(r) for r in replies) >= context:
        raise UserError(f"a reply of {max(len(r) for r in replies)} tokens (tool turns included) leaves no room for its "
                        f"prompt in the {context}-token context; lower rl.max_new_tokens")
    # (a prompt and reply longer than the context lose the prompt's oldest tokens, never the reply's)
    prompt_ids = [list(p)[max(len(p) + len(r) - context, 0):] for p, r in zip(prompt_ids, replies)]
    W = prompt_width(max(len(p) + len(r) for p, r in zip(prompt_ids, replies)), context)
    tokens = np.full((N, W), tokenizer.pad_id, np.int32)
    targets = np.full((N, W), tokenizer.pad_id, np.int32)
    weights = np.zeros((N, W), np.float32)
    sampler = np.zeros((N, W), np.float32)
    rm_rows, texts, lengths, ended, calls = [], [], [], [], []
    stops = reply_stop_ids(tokenizer) + (tokenizer.eot_id,)
    # (the reward model's rows end at <|reward|>; an imported tokenizer without one is judged by gold only)
    marker = [tokenizer.reward_id] if tokenizer.has_special("reward") else []
    for b, (p, r, lp, f) in enumerate(zip(prompt_ids, replies, logprobs, forced)):
        seq = list(p) + list(r)
        tokens[b, :len(seq)] = seq
        targets[b, :len(seq) - 1] = seq[1:]
        weights[b, len(p) - 1:len(seq) - 1] = 1.0
        sampler[b, len(p) - 1:len(seq) - 1] = lp
        if len(f):  # (the runtime's tokens: holes in the mask)
            at = len(p) - 1 + np.asarray(f, np.int64)
            weights[b, at], sampler[b, at] = 0.0, 0.0
        done = bool(r) and r[-1] == tokenizer.end_id
        content = r[:-1] if r and r[-1] in stops else r
        rm_rows.append((list(p) + list(content) + ([tokenizer.end_id] if done else []) + marker)[-context:])
        texts.append(tokenizer.decode(final_answer(content, f)))  # (the final answer, never a tool's output)
        lengths.append(len(r))
        ended.append(done)
        calls.append(sum(1 for i in f if i > 0 and (i - 1) not in f))  # (each answered call: one run of forced tokens)
    W2 = prompt_width(max(len(x) for x in rm_rows), context)
    rm_tokens = np.full((N, W2), tokenizer.pad_id, np.int32)
    rm_index = np.zeros(N, np.int32)
    for b, row in enumerate(rm_rows):
        rm_tokens[b, :len(row)] = row
        rm_index[b] = len(row) - 1
    return Rollout(list(prompts), tokens, targets, weights, sampler, rm_tokens, rm_index, texts,
                   np.asarray(lengths, np.int32), np.asarray(ended, bool), np.asarray(calls, np.int32))


def row_seeds(seed: int, step: int, n: int) -> list[int]:
    """The sampler seed of each row of RL step `step` (its own stream per run seed, step and row)."""
    base = np.random.default_rng([seed, 0x5EED, step]).integers(0, 2 ** 31 - n)
    return [int(base) + i for i in range(n)]
