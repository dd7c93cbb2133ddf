"""Held-out metrics of a reward model on rankings: pairwise accuracy (overall, by digit count, on
pairs where one reply is right and the other wrong — what a verifier must get right — and on pairs
where both replies are wrong), the mean margin r_w − r_l, agreement with the gold labeler, Brier
score and calibration of σ(r_w − r_l)."""

from __future__ import annotations

import itertools

import numpy as np

from plutao.train.data.conversations import Ranking, reply_turns


def _pairs(ranks):
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def _accuracy(margins: list[float]) -> float | None:
    if not margins:
        return None
    m = np.asarray(margins)
    return float(np.mean((m > 0) + 0.5 * (m == 0)))


def evaluate_rankings(scorer, rankings: list[Ranking], bins: int = 5) -> dict:
    convs = [r.prompt + reply_turns(x) for r in rankings for x in r.responses]
    ended = [e for r in rankings for e in r.meta.get("ended", [True] * len(r.responses))]
    scores = scorer.score(convs, ended=ended)
    margins, by_digits, both_wrong, right_wrong, gold = [], {}, [], [], []
    at = 0
    for r in rankings:
        s = scores[at:at + len(r.responses)]
        at += len(r.responses)
        correct, digits = r.meta.get("correct"), r.meta.get("digits")
        for i, j in _pairs(r.ranks):
            m = float(s[i] - s[j])
            margins.append(m)
            if digits is not None:
                by_digits.setdefault(str(digits), []).append(m)
            if correct is not None and not correct[i] and not correct[j]:
                both_wrong.append(m)
            if correct is not None and correct[i] != correct[j]:
                right_wrong.append(m if correct[i] else -m)  # (positive: the right reply scored higher)
        if "gold_ranks" in r.meta:
            gold += [float(s[i] - s[j]) for i, j in _pairs(r.meta["gold_ranks"])]
    m = np.asarray(margins)
    p_win = 1.0 / (1.0 + np.exp(-m))
    # Reliability: the probability the model gives its preferred reply, against how often it is right.
    confidence = np.maximum(p_win, 1.0 - p_win)
    right = (m > 0) + 0.5 * (m == 0)
    edges = np.linspace(0.5, 1.0, bins + 1)
    calibration = []
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        if inside.any():
            calibration.append({"predicted": float(confidence[inside].mean()), "observed": float(right[inside].mean()),
                                "pairs": int(inside.sum())})
    return {
        "pairwise_accuracy": _accuracy(margins), "pairs": len(margins), "rankings": len(rankings),
        "margin": float(np.mean(m)) if len(m) else None,  # mean r(better) − r(worse), as the training loop's
        "by_digits": {d: {"accuracy": _accuracy(v), "pairs": len(v)} for d, v in sorted(by_digits.items())},
        "right_vs_wrong_accuracy": _accuracy(right_wrong), "right_vs_wrong_pairs": len(right_wrong),
        "both_wrong_accuracy": _accuracy(both_wrong), "both_wrong_pairs": len(both_wrong),
        "gold_agreement": _accuracy(gold),
        "brier": float(np.mean((p_win - 1.0) ** 2)) if len(m) else None,
        "calibration": calibration,
        "mean_reward": float(np.mean(scores)) if len(scores) else None,
    }
