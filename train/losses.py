"""Next-token cross-entropy, with label smoothing and a per-token weight mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_sum(logits_BTV: Array, targets_BT: Array, weights_BT: Array | None = None,
                      label_smoothing: float = 0.0, support_V: Array | None = None) -> tuple[Array, Array]:
    """(Σ weighted loss, Σ weights). Divide by max(count, 1) for the mean, so an all-masked batch is 0, not NaN.

    With smoothing ε the target distribution is (1-ε)·onehot + ε·uniform over the ids in `support_V`
    (a boolean mask over the vocabulary: the ids a target can be; default every id), so the loss is
    (1-ε)·(−log p_y) + ε·mean_{v∈support}(−log p_v), computed from logsumexp without materialising log p.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    loss_BT = logz_BT - target_logit_BT
    if label_smoothing:
        if support_V is None:
            mean_logit_BT = jnp.mean(logits_BTV, axis=-1)
        else:
            support_V = support_V.astype(jnp.float32)
            mean_logit_BT = (logits_BTV @ support_V) / jnp.sum(support_V)
        loss_BT = (1.0 - label_smoothing) * loss_BT + label_smoothing * (logz_BT - mean_logit_BT)
    if weights_BT is None:
        weights_BT = jnp.ones_like(loss_BT)
    weights_BT = weights_BT.astype(jnp.float32)
    return jnp.sum(loss_BT * weights_BT), jnp.sum(weights_BT)


def token_logprobs(logits_BTV: Array, targets_BT: Array) -> Array:
    """log P(target_t | tokens < t) for every position."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def ranking_loss_sums(r_BK: Array, rank_BK: Array) -> dict[str, Array]:
    """InstructGPT's reward-model loss over every pair of each prompt's K responses, all in one batch
    element (each response encoded once): prompt b contributes −1/P_b · Σ_{i better than j} log σ(r_i − r_j),
    P_b its number of ordered pairs (C(K, 2) without ties). rank −1 = no response; equal ranks tie (no pair).

    Returns sums to divide once: {"loss": Σ_b, "count": prompts with a pair, "correct": pairs ordered
    right (ties ½), "pairs": pairs, "brier": Σ (σ(r_w − r_l) − 1)²}."""
    r_BK = r_BK.astype(jnp.float32)
    valid_BK = rank_BK >= 0
    better_BKK = (rank_BK[:, :, None] < rank_BK[:, None, :]) & valid_BK[:, :, None] & valid_BK[:, None, :]
    margin_BKK = r_BK[:, :, None] - r_BK[:, None, :]
    pairs_B = better_BKK.sum((1, 2)).astype(jnp.float32)
    nll_B = -jnp.sum(jnp.where(better_BKK, jax.nn.log_sigmoid(margin_BKK), 0.0), axis=(1, 2))
    return {
        "loss": jnp.sum(nll_B / jnp.maximum(pairs_B, 1.0)),
        "count": jnp.sum(pairs_B > 0).astype(jnp.float32),
        "correct": (jnp.sum(better_BKK & (margin_BKK > 0)) + 0.5 * jnp.sum(better_BKK & (margin_BKK == 0))
                    ).astype(jnp.float32),  # (a tie counts half, as in train/eval/reward_model.py)
        "pairs": jnp.sum(pairs_B),
        "brier": jnp.sum(jnp.where(better_BKK, (jax.nn.sigmoid(margin_BKK) - 1.0) ** 2, 0.0)),
    }
