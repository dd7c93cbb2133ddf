"""The report card's pure metrics: answers and format checks of replies, accuracy by digit count, win
rates with bootstrap intervals, distinct answers, bits per byte. Functions of the replies alone; the
sampling and the whole report are experiments/report_card.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from plutao.train.worlds import arith

DIGITS = tuple(range(1, arith.MAX_DIGITS + 1))
BOOTSTRAP_SAMPLES = 1000
# Purposes folded into the sampling seeds: each stream independent, the same for every column.
T1, DISTINCT, BEST_OF, BEST_OF_DISTINCT, FILE_BEST_OF, BOOTSTRAP = range(6)
DISTINCT_SAMPLES = 8  # temperature-1 replies per problem of the diversity and pass@8 rows
BITS_PER_BYTE_TOKENS = 20_000  # about this many held-out tokens per pretraining source (whole windows)


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    length: int  # tokens, without the stop token
    stop: int | None  # the token that ended it; None when it ran to the budget
    tokens: tuple[int, ...] = ()  # every token the sampler chose (the stop token included)


def format_ok(reply: Reply, *, end_id: int, user_id: int) -> bool:
    """Ended with <|end|> within the budget, no invented <|user|> turn, and in one of the world's two
    forms: a direct answer (exactly one number) or a well-formed worked one (`arith.reply_form`)."""
    return reply.stop == end_id and reply.stop != user_id and arith.reply_form(reply.text) is not None


def few_shot_answer(continuation: str) -> str:
    """A base model's few-shot answer: its continuation up to the first newline."""
    return continuation.split("\n", 1)[0].strip()


def matches(reply: str, answer: str, mode: str = "last-number") -> bool:
    """--match exact: the whole stripped reply is the answer; last-number: the reply's last number is
    (as text, or as the same integer: "0799" and "799" agree)."""
    answer = answer.strip()
    if mode == "exact":
        return reply.strip() == answer
    found = arith.NUMBER.findall(reply)
    if not found:
        return False
    if found[-1] == answer:
        return True
    return bool(arith.NUMBER.fullmatch(answer)) and int(found[-1]) == int(answer)


def accuracy_by_digits(correct_P: Sequence[bool], digits_P: Sequence[int]) -> dict[str, float]:
    return mean_by_digits(np.asarray(correct_P, bool), digits_P)


def mean_by_digits(values_P: Sequence[float], digits_P: Sequence[int]) -> dict[str, float]:
    values_P, digits_P = np.asarray(values_P), np.asarray(digits_P)
    return {str(d): float(values_P[digits_P == d].mean()) for d in DIGITS if (digits_P == d).any()}


def outcomes(keys_a: Sequence, keys_b: Sequence) -> np.ndarray:
    """Per prompt: 1 where A's reply is better, ½ on a tie, 0 where it is worse (keys compare with >)."""
    if len(keys_a) != len(keys_b):
        raise ValueError(f"{len(keys_a)} replies against {len(keys_b)}; compare on the same prompts")
    return np.array([1.0 if a > b else 0.0 if b > a else 0.5 for a, b in zip(keys_a, keys_b)])


def bootstrap_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n): how often each of n problems appears in each resample (n draws with replacement)."""
    draws_RN = np.random.default_rng([seed, BOOTSTRAP]).integers(0, n, size=(samples, n))
    flat = (draws_RN + n * np.arange(samples)[:, None]).ravel()
    return np.bincount(flat, minlength=samples * n).reshape(samples, n).astype(np.float64)


def win_rates(keys: dict[str, Sequence], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, dict]:
    """{"A vs B": {"rate", "low", "high"}} for every ordered pair of columns: the share of prompts on
    which A's key beats B's (ties ½), with a percentile bootstrap 95% interval from resampling the
    prompts (every pair on the same resamples; the interval always holds the rate)."""
    names = list(keys)
    pairs = [(a, b) for a in names for b in names if a != b]
    if not pairs:
        return {}
    outcome_XP = np.stack([outcomes(keys[a], keys[b]) for a, b in pairs])
    rate_X = outcome_XP.mean(axis=1)
    counts_RP = bootstrap_counts(outcome_XP.shape[1], samples, seed)
    rates_RX = counts_RP @ outcome_XP.T / outcome_XP.shape[1]
    low_X, high_X = np.percentile(rates_RX, [2.5, 97.5], axis=0)
    return {f"{a} vs {b}": {"rate": float(r), "low": float(min(lo, r)), "high": float(max(hi, r))}
            for (a, b), r, lo, hi in zip(pairs, rate_X, low_X, high_X)}


def correctness_keys(correct_P: Sequence[bool]) -> list[int]:
    """Keys for `win_rates` that judge correctness alone: right beats wrong, anything else is a tie."""
    return [int(c) for c in correct_P]


def win_rates_by_digits(keys: dict[str, Sequence], digits_P: Sequence[int], *, seed: int = 0) -> dict[str, dict]:
    """{"A vs B": {"all": {rate, low, high}, "by_digits": {"d": {rate, low, high}}}}: `win_rates` over
    every problem and within each digit bucket."""
    digits_P = np.asarray(digits_P)
    out = {pair: {"all": w, "by_digits": {}} for pair, w in win_rates(keys, seed=seed).items()}
    for d in DIGITS:
        at = np.flatnonzero(digits_P == d)
        if len(at):
            for pair, w in win_rates({k: [v[i] for i in at] for k, v in keys.items()}, seed=seed).items():
                out[pair]["by_digits"][str(d)] = w
    return out


def pass_at_k(groups: Sequence[Sequence[bool]], k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021) averaged over problems: 1 − C(n−c, k)/C(n, k) for n samples
    of which c are right."""
    values = []
    for g in groups:
        n, c = len(g), int(np.sum(g))
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
        values.append(1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k))
    return float(np.mean(values))


ELO_SCALE = 400.0 / math.log(10.0)  # an Elo point difference of 400 is odds of 10 to 1
ELO_MEAN = 1000.0


def bradley_terry(wins_XX: np.ndarray, iters: int = 500, prior: float = 0.5) -> np.ndarray:
    """Bradley–Terry strengths θ (mean 0) from a matrix of wins (wins_XX[i, j]: times i beat j; a tie
    counts ½ to each), by the minorise–maximise updates of Hunter (2004). `prior` adds that many
    virtual wins each way between every pair, so a column that never lost stays finite."""
    w = np.asarray(wins_XX, np.float64) + prior * (1 - np.eye(len(wins_XX)))
    games = w + w.T
    p = np.ones(len(w))
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        p = w.sum(1) / denom
        p /= np.exp(np.log(p).mean())
    return np.log(p) - np.log(p).mean()


def leaderboard(keys: dict[str, Sequence], *, samples: int = 200, seed: int = 0) -> list[dict]:
    """Elo ratings of the columns (Bradley–Terry on every pairwise judgement of the same problems, as
    the chatbot arenas rank models), best first, with a percentile bootstrap 95% interval from
    resampling the problems."""
    names = list(keys)
    if len(names) < 2:
        return [{"name": n, "rating": ELO_MEAN, "low": ELO_MEAN, "high": ELO_MEAN} for n in names]
    outcome = {(a, b): outcomes(keys[a], keys[b]) for a in names for b in names if a != b}
    n_problems = len(next(iter(outcome.values())))

    def ratings(weights_P):
        wins = np.zeros((len(names), len(names)))
        for (a, b), o in outcome.items():
            wins[names.index(a), names.index(b)] = weights_P @ o
        return ELO_MEAN + ELO_SCALE * bradley_terry(wins)

    elo = ratings(np.ones(n_problems))
    boot = np.stack([ratings(c) for c in bootstrap_counts(n_problems, samples, seed)])
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    table = [{"name": n, "rating": float(e), "low": float(min(lo, e)), "high": float(max(hi, e))}
             for n, e, lo, hi in zip(names, elo, low, high)]
    return sorted(table, key=lambda row: -row["rating"])


def distinct_answers(groups: Sequence[Sequence[str]]) -> float:
    """Mean count of distinct answers (`arith.answer_of`; no number at all is one answer too) per prompt."""
    return float(np.mean([len({arith.answer_of(t) for t in g}) for g in groups]))


def combined_bits_per_byte(metrics: Sequence[dict]) -> float:
    """Bits per byte over several sources, weighted by their bytes: total nats / total bytes / ln 2."""
    nats = sum(m["loss"] * m["tokens"] for m in metrics)
    return nats / sum(m["bytes"] for m in metrics) / math.log(2)


def window_cap(tokens: np.ndarray, context: int, cap: int = BITS_PER_BYTE_TOKENS, rows: int = 32) -> np.ndarray:
    """The first whole windows of a token stream, about `cap` tokens: a multiple of `rows` windows
    when there are that many (one compiled evaluation program), else every whole window."""
    windows = (len(tokens) - 1) // context
    if windows < 1:
        return tokens
    keep = min(windows, max(cap // context, 1))
    if keep >= rows:
        keep -= keep % rows
    return tokens[: keep * context + 1]
