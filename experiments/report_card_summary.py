"""report.json from the report card's replies: per column its rows, and between columns the gold and
correctness win rates and the leaderboard. Pure: the replies in, the JSON object out (the sampling is
experiments/report_card.py)."""

from __future__ import annotations

import numpy as np

from plutao.experiments.report_card_stats import (
    BITS_PER_BYTE_TOKENS,
    BOOTSTRAP_SAMPLES,
    DIGITS,
    DISTINCT_SAMPLES,
    accuracy_by_digits,
    correctness_keys,
    distinct_answers,
    few_shot_answer,
    format_ok,
    leaderboard,
    matches,
    mean_by_digits,
    pass_at_k,
    win_rates,
    win_rates_by_digits,
)
from plutao.train.worlds import arith


def _accuracy(problems, replies, digits_P, name: str, by_digits: str, cut=lambda text: text) -> dict:
    correct = [arith.correct(p, cut(r.text)) for p, r in zip(problems, replies)]
    return {name: float(np.mean(correct)), by_digits: accuracy_by_digits(correct, digits_P)}


def column_row(c, problems, plan, bits: dict, *, end_id: int, user_id: int) -> dict:
    """One column's rows of the card."""
    digits_P, probs = problems.digits_P, problems.problems
    correct = [arith.correct(p, r.text) for p, r in zip(probs, c.greedy)]
    correct_t1 = [arith.correct(p, r.text) for p, r in zip(probs, c.t1)]
    row = {"run": str(c.run_dir), "step": c.step, "kind": c.kind,
           "accuracy": float(np.mean(correct)), "accuracy_by_digits": accuracy_by_digits(correct, digits_P),
           "accuracy_t1": float(np.mean(correct_t1)), "accuracy_by_digits_t1": accuracy_by_digits(correct_t1, digits_P)}
    sampled = [[arith.correct(probs[i], text) for text in group] for i, group in zip(problems.distinct, c.distinct)]
    row["pass_at_8"] = pass_at_k(sampled, DISTINCT_SAMPLES)
    row["pass_at_8_by_digits"] = {str(d): pass_at_k([g for i, g in zip(problems.distinct, sampled)
                                                     if probs[i].digits == d], DISTINCT_SAMPLES)
                                  for d in DIGITS if any(probs[i].digits == d for i in problems.distinct)}
    if c.best_of:
        row["best_of"] = c.best_of
    if c.few_shot is not None:
        row |= _accuracy(probs, c.few_shot, digits_P, "accuracy_few_shot", "accuracy_by_digits_few_shot",
                         few_shot_answer)
    if "few_shot_worked" in c.extra:
        row |= _accuracy(probs, c.extra["few_shot_worked"], digits_P, "accuracy_few_shot_worked",
                         "accuracy_by_digits_few_shot_worked", few_shot_answer)
    for key, shots in c.shots.items():
        row[f"few_{key}"] = float(np.mean(shots))  # examples that fit the context, on average (of 4)
    for name in ("step_by_step", "direct"):
        if name in c.extra:
            row |= _accuracy(probs, c.extra[name], digits_P, f"{name}_accuracy", f"{name}_accuracy_by_digits")
            row[f"{name}_worked_share"] = float(np.mean([arith.reply_form(r.text) == "worked" for r in c.extra[name]]))
    if "tools" in c.extra:  # (the same problems answered with the tools: experiments/report_card_tools.py)
        row |= _accuracy(probs, c.extra["tools"], digits_P, "tool_accuracy", "tool_accuracy_by_digits")
        calls, errors = np.asarray(c.counts["tool_calls"]), np.asarray(c.counts["tool_errors"])
        row |= {"tool_call_rate": float(np.mean(calls > 0)),
                "tool_call_rate_by_digits": mean_by_digits(calls > 0, digits_P),
                "tool_calls_per_reply": float(calls.mean()),
                "tool_calls_malformed": float(errors.sum() / calls.sum()) if calls.sum() else None,
                "tool_tokens_per_reply": float(np.mean([r.length for r in c.extra["tools"]]))}
    if "held_out" in c.extra:
        row["held_out_accuracy"] = float(np.mean([arith.correct(p, r.text) for (_, p), r
                                                  in zip(problems.held_out, c.extra["held_out"])]))
    row |= {"format_ok": float(np.mean([format_ok(r, end_id=end_id, user_id=user_id) for r in c.greedy])),
            "worked_share": float(np.mean([arith.reply_form(r.text) == "worked" for r in c.greedy])),
            "ran_on": float(np.mean([r.stop == user_id for r in c.greedy])),
            "mean_length": float(np.mean([r.length for r in c.greedy])),
            "distinct": distinct_answers(c.distinct), "bits_per_byte": bits.get(c.name)}
    if c.rewards is not None:
        row["mean_reward"] = float(np.mean(c.rewards))
    if plan.file_problems is not None:
        row["problems_file_accuracy"] = float(np.mean([matches(r.text, answer, plan.match) for r, (_, answer)
                                                       in zip(c.file_replies, plan.file_problems)]))
    return row


def summarize(columns, problems, plan, bits: dict, notes: list[str], *, end_id: int, user_id: int) -> dict:
    """report.json from the replies: per column its rows; between columns the correctness win rates
    (right beats wrong, anything else a tie) per digit bucket, the full gold labeler's win rates, and
    the leaderboard (Elo from the gold labeler's pairwise judgements)."""
    probs = problems.problems
    runs = {c.name: column_row(c, problems, plan, bits, end_id=end_id, user_id=user_id) for c in columns}
    gold = {c.name: [arith.gold_key(p, r.text, r.stop == end_id) for p, r in zip(probs, c.greedy)] for c in columns}
    right = {c.name: correctness_keys([arith.correct(p, r.text) for p, r in zip(probs, c.greedy)]) for c in columns}
    report = {"runs": runs,
              "correctness_win_rates": win_rates_by_digits(right, problems.digits_P, seed=plan.seed),
              "win_rates": win_rates(gold, seed=plan.seed),
              "leaderboard": leaderboard(gold, seed=plan.seed)}
    if all(c.rewards is not None for c in columns) and plan.reward:
        report["rm_win_rates"] = win_rates({c.name: c.rewards.tolist() for c in columns}, seed=plan.seed)
    report["settings"] = {
        "problems_per_digit_count": plan.problems, "digit_counts": list(DIGITS), "seed": plan.seed,
        "reply_tokens": problems.budget, "training_digits": problems.world.max_digits,
        "held_out_problems": len(problems.held_out), "best_of": plan.best_of,
        "reward": str(plan.reward) if plan.reward else None, "systems": {"step_by_step": arith.STEP_BY_STEP,
                                                                        "direct": arith.NUMBER_ONLY},
        "bootstrap_samples": BOOTSTRAP_SAMPLES, "distinct": {"problems": len(problems.distinct),
                                                             "samples": DISTINCT_SAMPLES},
        "bits_per_byte_tokens_per_source": BITS_PER_BYTE_TOKENS,
        "match": plan.match, "problems_file": len(plan.file_problems) if plan.file_problems is not None else None,
        "tools": list(plan.tools)}
    report["notes"] = notes
    return report
