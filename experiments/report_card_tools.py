"""The report card's rows with tools (`plutao report-card RUNS --tools calculator`): each chat run whose
tokenizer has the tool tokens answers the digit-bucket problems greedily through the agent loop
(model/agent.py), the same problems it also answers without tools, so the two rows sit side by side.

Per reply it keeps the assistant's final answer (the text after the last tool turn: the gold checker
reads that, never the tool's output), how many calls it made, how many of them were answered with an
error (malformed, unknown tool, bad expression), and its length in tokens, forced ones included (the
cost of the call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from plutao.experiments.report_card_stats import Reply
from plutao.model.agent import complete_with_tools, final_answer
from plutao.model.sampling import SamplingConfig
from plutao.tokenizer.chat import MAX_CALLS, reply_stop_ids, result_tokens, tool_answerer
from plutao.tools import tools_named


def tool_replies(run, prompts: Sequence[Sequence[int]], tool_names: Sequence[str], budget: int,
                 rows_per_call: int, log: Callable[[str], None]) -> tuple[list[Reply], list[int], list[int]]:
    """(greedy replies with the tools — text = the final answer —, calls per reply, error results per reply)."""
    tok, model = run.tokenizer, run.model
    answer = tool_answerer(tok, tools_named(list(tool_names)), max_calls=MAX_CALLS,
                           max_result_tokens=result_tokens(run.cfg.model.context_length, budget, MAX_CALLS))
    error = tok.encode_unseen("error:").tolist()
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=budget, stop_ids=reply_stop_ids(tok))
    replies, calls, errors = [], [], []
    for lo in range(0, len(prompts), rows_per_call):
        part = [list(p) for p in prompts[lo:lo + rows_per_call]]
        log(f"report-card: {run.run_dir.name}: {len(part)} greedy replies with {', '.join(tool_names)}")
        for c in complete_with_tools(model, part, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id,
                                     pause_id=tok.tool_id, answer=answer, max_calls=MAX_CALLS):
            final = final_answer(c.tokens, c.forced)
            content = final[:-1] if c.stop_token is not None else final
            results = [i for i in c.forced if i > 0 and c.tokens[i - 1] == tok.tool_id]  # (each result's start)
            replies.append(Reply(tok.decode(content), len(c.tokens), c.stop_token, tuple(c.tokens)))
            calls.append(len(results))
            errors.append(sum(c.tokens[i:i + len(error)] == error for i in results))
    return replies, calls, errors
