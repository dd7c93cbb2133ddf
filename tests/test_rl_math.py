"""The RL mathematics (train/rl/objectives.py) against naive loops and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plutao.train.rl import objectives as rl


def _rows(seed=0, B=5, T=12):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):  # a contiguous run of actions per row (the reply), one row without any
        if b == B - 1:
            continue
        start = int(rng.integers(0, T // 2))
        mask[b, start:start + int(rng.integers(1, T - start + 1))] = 1
    return rng, mask


def naive_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[b])
        last = 0.0
        for j in reversed(range(len(steps))):
            t = steps[j]
            next_v = values[b, steps[j + 1]] if j + 1 < len(steps) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def assert_gae_equals_naive(rng, mask, gamma, lam):
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    values = rng.normal(size=mask.shape).astype(np.float32) * mask
    adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    want_adv, want_ret = naive_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, atol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_naive_loop(gamma, lam):
    rng, mask = _rows()
    assert_gae_equals_naive(rng, mask, gamma, lam)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_links_the_actions_across_holes_in_the_mask(gamma, lam):
    """Replies interrupted by positions that are not the policy's (a tool's result, a user turn): credit
    flows across the hole as if the actions were adjacent (the naive loop over each row's actions)."""
    rng = np.random.default_rng(3)
    B, T = 6, 24
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        spans = sorted(rng.choice(np.arange(1, T - 1), size=4, replace=False))
        mask[b, spans[0]:spans[1]] = 1  # an action span, a hole, another span
        mask[b, spans[2]:spans[3] + 1] = 1
    assert any((np.diff(row) > 0).sum() > 1 for row in mask)  # (there are holes)
    assert_gae_equals_naive(rng, mask, gamma, lam)


def test_gae_with_lambda_one_is_the_reward_to_go_minus_the_value():
    rng, mask = _rows(1)
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    values = rng.normal(size=mask.shape).astype(np.float32) * mask
    adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
    to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(np.asarray(ret), to_go, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adv), (to_go - values) * mask, atol=1e-5)


def test_token_rewards_put_the_score_at_the_last_action():
    _, mask = _rows(2)
    kl = np.full(mask.shape, 0.5, np.float32)
    score = np.arange(mask.shape[0], dtype=np.float32) + 1
    r = np.asarray(rl.token_rewards(jnp.asarray(score), jnp.asarray(kl), jnp.asarray(mask), 0.1))
    for b in range(mask.shape[0]):
        steps = np.flatnonzero(mask[b])
        want = -0.1 * 0.5 * mask[b]
        if len(steps):
            want[steps[-1]] += score[b]
        np.testing.assert_allclose(r[b], want, atol=1e-6)
    assert r[-1].sum() == 0  # (a row without actions gets nothing, not the score at position 0)


def test_clipped_policy_loss_matches_its_closed_form():
    old = np.log(np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], np.float32))
    new = np.log(np.array([0.7, 0.7, 0.3, 0.3, 0.55, 0.55], np.float32))  # ρ = 1.4, 1.4, 0.6, 0.6, 1.1, 1.1
    adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0, -2.0], np.float32)
    loss, ratio = rl.clipped_policy_loss(jnp.asarray(new)[None], jnp.asarray(old)[None], jnp.asarray(adv)[None], 0.2)
    np.testing.assert_allclose(np.asarray(ratio)[0], [1.4, 1.4, 0.6, 0.6, 1.1, 1.1], rtol=1e-5)
    # A > 0: −A·min(ρ, 1+ε); A < 0: −A·max(ρ, 1−ε) (the pessimistic bound).
    want = [-1.2, 1.4, -0.6, 0.8, -2.2, 2.2]
    np.testing.assert_allclose(np.asarray(loss)[0], want, rtol=1e-5)


def test_clipped_policy_gradient_vanishes_outside_the_trust_region():
    adv = jnp.asarray([[1.0, -1.0]])
    old = jnp.log(jnp.asarray([[0.5, 0.5]]))

    def total(new):
        return rl.clipped_policy_loss(new, old, adv, 0.2)[0].sum()

    g = jax.grad(total)(jnp.log(jnp.asarray([[0.7, 0.3]])))  # ρ = 1.4 with A > 0, 0.6 with A < 0: clipped
    np.testing.assert_allclose(np.asarray(g), 0.0)
    g = jax.grad(total)(jnp.log(jnp.asarray([[0.55, 0.45]])))  # inside: −A·ρ
    np.testing.assert_allclose(np.asarray(g), [[-1.1, 0.9]], rtol=1e-5)


def test_clipped_value_loss_matches_its_closed_form():
    v = jnp.asarray([[1.0, 0.0, 0.5]])
    old = jnp.asarray([[0.0, 0.0, 0.4]])
    ret = jnp.asarray([[2.0, -1.0, 0.0]])
    got = np.asarray(rl.clipped_value_loss(v, old, ret, 0.2))[0]
    # row 0: plain (1-2)² = 1, clipped (0.2-2)² = 3.24 → max; row 1: both 1; row 2: plain .25, clipped (.5-0)²=.25
    np.testing.assert_allclose(got, [0.5 * 3.24, 0.5, 0.5 * 0.25], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rl.clipped_value_loss(v, old, ret, 0.0))[0], [0.5, 0.5, 0.125], rtol=1e-5)


def test_kl_estimators_are_non_negative_and_zero_at_the_reference():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 7, 11)).astype(np.float32))
    ref = jnp.asarray(rng.normal(size=(3, 7, 11)).astype(np.float32))
    tokens = jnp.asarray(rng.integers(0, 11, size=(3, 7)))
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    rp = jnp.take_along_axis(jax.nn.log_softmax(ref), tokens[..., None], -1)[..., 0]
    assert float(jnp.min(rl.kl_k3(lp, rp))) >= 0
    assert float(jnp.min(rl.kl_exact(logits, ref))) >= 0
    assert float(jnp.min(rl.kl_k1(lp, rp))) < 0  # (k1 is not: why it is a penalty, not the metric)
    np.testing.assert_allclose(np.asarray(rl.kl_k3(lp, lp)), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(rl.kl_exact(logits, logits)), 0.0, atol=1e-6)
    # The exact KL is the expectation of k1 (and of k3) under π.
    p = jax.nn.softmax(logits)
    full_k3 = jnp.sum(p * rl.kl_k3(jax.nn.log_softmax(logits), jax.nn.log_softmax(ref)), -1)
    np.testing.assert_allclose(np.asarray(full_k3), np.asarray(rl.kl_exact(logits, ref)), rtol=1e-4, atol=1e-6)


def test_group_advantages():
    equal = jnp.full((2, 4), 0.7)
    for baseline in ("group", "rloo"):
        adv = np.asarray(rl.group_advantages(equal, baseline))
        assert np.all(np.isfinite(adv)) and np.all(adv == 0)
    r = jnp.asarray([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    g = np.asarray(rl.group_advantages(r, "group"))
    np.testing.assert_allclose(g.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(g[0], (np.array([1, 0, 0, 1]) - 0.5) / (np.std([1, 0, 0, 1], ddof=1) + 1e-4), rtol=1e-5)
    loo = np.asarray(rl.group_advantages(r, "rloo"))
    want = [[x - (row.sum() - x) / 3 for x in row] for row in np.asarray(r)]
    np.testing.assert_allclose(loo, want, rtol=1e-5)


def test_dpo_loss_closed_form_log2_at_the_reference_and_gradient_direction():
    c, rj, rc, rr = (jnp.asarray([x]) for x in (-3.0, -5.0, -4.0, -4.5))
    loss, r_w, r_l = rl.dpo_loss(c, rj, rc, rr, 0.1)
    margin = 0.1 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    np.testing.assert_allclose(float(loss[0]), math.log1p(math.exp(-margin)), rtol=1e-6)
    np.testing.assert_allclose([float(r_w[0]), float(r_l[0])], [0.1, -0.05], rtol=1e-5)
    at_ref = rl.dpo_loss(rc, rr, rc, rr, 0.1)[0]
    np.testing.assert_allclose(float(at_ref[0]), math.log(2), rtol=1e-6)
    g_c, g_r = jax.grad(lambda a, b: rl.dpo_loss(a, b, rc, rr, 0.1)[0].sum(), argnums=(0, 1))(rc, rr)
    assert float(g_c[0]) < 0 < float(g_r[0])  # descent raises the chosen log-prob and lowers the rejected


def test_whiten_and_explained_variance():
    _, mask = _rows(4)
    x = np.random.default_rng(5).normal(3.0, 2.0, size=mask.shape).astype(np.float32)
    w = np.asarray(rl.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    on = mask > 0
    np.testing.assert_allclose(w[on].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(w[on].std(), 1.0, atol=1e-3)
    assert np.all(w[~on] == 0)
    assert rl.explained_variance(x, x, mask) == pytest.approx(1.0)
    assert rl.explained_variance(np.zeros_like(x) + x[on].mean(), x, mask) == pytest.approx(0.0, abs=1e-5)


def test_adaptive_beta_moves_toward_the_target():
    assert rl.adaptive_beta(0.1, 12.0, 6.0, 100, 1000) == pytest.approx(0.1 * math.exp(0.02))  # (error clipped at +0.2)
    assert rl.adaptive_beta(0.1, 3.0, 6.0, 100, 1000) == pytest.approx(0.1 * math.exp(-0.02))
    assert rl.adaptive_beta(0.1, 6.0, 6.0, 100, 1000) == pytest.approx(0.1)
    assert rl.adaptive_beta(0.1, 100.0, 6.0, 10_000, 10) > 0  # never ≤ 0, however many rows a step has


@pytest.mark.parametrize("start", [0.02, 2.0])
def test_adaptive_beta_reaches_its_target_within_a_preset_run(start):
    """A policy whose KL falls as 1/β (KL = c/β) is leashed to the target KL within the PPO preset's
    steps (40) of 64 rows, from a β 10× too small or too large, at the default rl.kl_horizon."""
    from plutao.train.config.presets import STAGE_PRESETS
    from plutao.train.config.schema import RLConfig

    horizon, rows, steps = RLConfig().kl_horizon, STAGE_PRESETS["ppo"]["rl.prompts"], STAGE_PRESETS["ppo"]["train.steps"]
    c, target = 0.12, 0.6  # the β that gives the target: 0.2
    beta = start
    for _ in range(steps):
        beta = rl.adaptive_beta(beta, c / beta, target, rows, horizon)
    assert c / beta == pytest.approx(target, rel=0.1), (start, beta)
