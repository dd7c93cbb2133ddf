"""The mathematics of learning from rewards, as pure functions of arrays.

Every per-token array is laid out like a training row: position t of a (B, T) array belongs to the
token the model predicts there (targets[t] = tokens[t + 1]), and `mask_BT` is 1 at the positions
whose targets are reply tokens the policy chose (the actions). So the log-prob, the value, the
reward and the advantage of an action all sit at the same index.

- KL estimators between the policy π and the reference π_ref at the sampled token x (Schulman's
  k1 = log π(x) − log π_ref(x), unbiased but of either sign; k3 = (r − 1) − log r with
  r = π_ref(x)/π(x), unbiased and ≥ 0 everywhere), and the exact KL over the vocabulary.
- Per-token rewards for PPO (InstructGPT): −β·k1 at every action, the reward model's score added
  at the last one.
- GAE(γ, λ) by a reverse scan; PPO's clipped surrogate and clipped value loss; advantage whitening.
- Group-relative advantages for GRPO (score minus the group mean, over the group std) and RLOO
  (score minus the mean of the other G − 1).
- The DPO loss, −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]).
- The adaptive KL coefficient of Ziegler et al. (2019).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
EPS = 1e-8


# --- KL ---------------------------------------------------------------------------------------------

def kl_k1(logp_BT: Array, ref_logp_BT: Array) -> Array:
    """log π(x) − log π_ref(x) per token (unbiased, of either sign)."""
    return logp_BT - ref_logp_BT


def kl_k3(logp_BT: Array, ref_logp_BT: Array) -> Array:
    """(r − 1) − log r with r = π_ref(x)/π(x): ≥ 0 on every token, 0 where π = π_ref."""
    log_r = ref_logp_BT - logp_BT
    return jnp.expm1(log_r) - log_r


def kl_exact(logits_BTV: Array, ref_logits_BTV: Array) -> Array:
    """KL(π‖π_ref) over the whole vocabulary at every position, (B, T), ≥ 0."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    ref = jax.nn.log_softmax(ref_logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.maximum(jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1), 0.0)


def entropy(logits_BTV: Array) -> Array:
    """The policy's entropy (nats) at every position, (B, T)."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# --- rewards and advantages -------------------------------------------------------------------------

def last_index(mask_BT: Array) -> Array:
    """(B,) the position of each row's last action (0 for a row without any)."""
    T = mask_BT.shape[1]
    return jnp.max(jnp.where(mask_BT > 0, jnp.arange(T), 0), axis=1)


def token_rewards(score_B: Array, kl_BT: Array, mask_BT: Array, beta) -> Array:
    """InstructGPT's per-token rewards: −β·KL at every action, plus the sequence's score at its last one."""
    r_BT = -beta * kl_BT * mask_BT
    at_end_BT = jax.nn.one_hot(last_index(mask_BT), mask_BT.shape[1]) * (mask_BT.sum(1, keepdims=True) > 0)
    return r_BT + at_end_BT * score_B[:, None]


def gae(rewards_BT: Array, values_BT: Array, mask_BT: Array, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Array, Array]:
    """(advantages, returns) by generalised advantage estimation over each row's actions, the masked
    positions, which need not be contiguous: a hole (a tool's result, another speaker's turn) is skipped
    and the actions on either side are linked. With t' the row's next action after t:
    δ_t = r_t + γ·V_t' − V_t (V after the last action is 0), A_t = δ_t + γλ·A_t'; returns = A + V.
    Both are 0 off the mask."""
    m = mask_BT.astype(jnp.float32)

    def back(carry, xs):
        next_v_B, next_a_B = carry  # (the value and advantage of the row's next action)
        r_B, v_B, m_B = xs
        a_B = r_B + gamma * next_v_B - v_B + gamma * lam * next_a_B
        action_B = m_B > 0
        carry = (jnp.where(action_B, v_B, next_v_B), jnp.where(action_B, a_B, next_a_B))
        return carry, jnp.where(action_B, a_B, 0.0)

    zeros_B = jnp.zeros(m.shape[0], jnp.float32)
    _, adv_TB = jax.lax.scan(back, (zeros_B, zeros_B), (rewards_BT.T, values_BT.T, m.T), reverse=True)
    adv = adv_TB.T * m
    return adv, (adv + values_BT) * m


def masked_whiten(x_BT: Array, mask_BT: Array, shift_mean: bool = True) -> Array:
    """x standardised over the masked entries (mean 0 unless shift_mean=False, std 1); 0 off the mask."""
    m = mask_BT.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = (x_BT * m).sum() / n
    var = (((x_BT - mean) ** 2) * m).sum() / n
    out = (x_BT - mean) * jax.lax.rsqrt(var + EPS)
    return (out if shift_mean else out + mean) * m


def group_advantages(score_PG: Array, baseline: str = "group", scale: bool = True) -> Array:
    """(P, G) per-reply advantages from the rewards of G replies to each of P prompts.
    "group" (GRPO): (r − mean) / (std + ε) when `scale`, else r − mean; "rloo": r − the mean of the
    other G − 1 replies. A group whose rewards are all equal gets 0 (never NaN)."""
    G = score_PG.shape[1]
    mean = score_PG.mean(axis=1, keepdims=True)
    if baseline == "rloo":
        return (score_PG - mean) * (G / (G - 1))
    centred = score_PG - mean
    if not scale:
        return centred
    std = jnp.sqrt((centred ** 2).sum(axis=1, keepdims=True) / max(G - 1, 1))
    return centred / (std + 1e-4)


# --- losses -----------------------------------------------------------------------------------------

def clipped_policy_loss(logp_BT: Array, old_logp_BT: Array, adv_BT: Array, clip: float) -> tuple[Array, Array]:
    """PPO's per-token surrogate loss max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = π/π_old, and ρ."""
    ratio = jnp.exp(logp_BT - old_logp_BT)
    return jnp.maximum(-adv_BT * ratio, -adv_BT * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)), ratio


def clipped_value_loss(v_BT: Array, old_v_BT: Array, returns_BT: Array, clip: float) -> Array:
    """½·max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²) per token (clip ≤ 0: unclipped)."""
    plain = (v_BT - returns_BT) ** 2
    if clip <= 0:
        return 0.5 * plain
    clipped = (old_v_BT + jnp.clip(v_BT - old_v_BT, -clip, clip) - returns_BT) ** 2
    return 0.5 * jnp.maximum(plain, clipped)


def dpo_loss(chosen_B: Array, rejected_B: Array, ref_chosen_B: Array, ref_rejected_B: Array,
             beta: float) -> tuple[Array, Array, Array]:
    """(per-pair loss, implicit reward of the chosen, of the rejected): rewards β·(log π − log π_ref)
    of whole replies, loss −log σ(r_w − r_l) (log 2 where π = π_ref)."""
    r_w = beta * (chosen_B - ref_chosen_B)
    r_l = beta * (rejected_B - ref_rejected_B)
    return -jax.nn.log_sigmoid(r_w - r_l), r_w, r_l


def explained_variance(values, returns, mask) -> float:
    """1 − Var[R − V]/Var[R] over the masked entries (1 = perfect, ≤ 0 = no better than a constant)."""
    m = mask > 0
    r, v = returns[m], values[m]
    var = float(((r - r.mean()) ** 2).mean()) if r.size else 0.0
    return float("nan") if var == 0 else 1.0 - float(((r - v - (r - v).mean()) ** 2).mean()) / var


def adaptive_beta(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller in log space: β·exp(clip(KL/target − 1, ±0.2)·n/horizon)
    (their β·(1 + e·n/horizon) to first order, and never ≤ 0 however many rows a step has)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * math.exp(error * n_steps / horizon)
