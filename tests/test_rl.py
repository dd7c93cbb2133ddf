"""Learning from rollouts on tiny random models: rollout log-probs equal the training forward pass's,
the reward model reads the policy's own tokens, the PPO update moves the policy toward what is paid
for (and a large β holds it near the reference), GRPO's group advantages."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plutao.model.config import ModelConfig
from plutao.model.heads import forward_logits
from plutao.tokenizer import train_tokenizer
from plutao.tokenizer.chat import prompt_ids, reward_ids
from plutao.train.config.schema import Config, DataConfig, OptimConfig, RLConfig, TrainConfig
from plutao.train.losses import token_logprobs
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel import sharding
from plutao.train.rl.loop import score_rollout, update
from plutao.train.rl.rollouts import Prompt, row_seeds, sample
from plutao.train.step import Trainer
from plutao.train.tasks import TokenIds
from plutao.train.tasks.grpo import GRPO
from plutao.train.tasks.ppo import PPO

CONTEXT = 64


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("char", ["abcdefxyz 0123456789 what is plus minus?"])


def _trainer(tok, task_cls=PPO, **rl):
    model = ModelConfig(vocab_size=tok.vocab_size, context_length=CONTEXT, n_layers=2, d_model=32, n_heads=2)
    rl_cfg = RLConfig(**({"reward": "unused", "prompts": 16, "epochs": 2, "minibatches": 2, "max_new_tokens": 6,
                          "whiten_rewards": False, "unfinished_penalty": 0.0} | rl))
    cfg = Config(model=model, data=DataConfig(path="builtin:arith"), rl=rl_cfg,
                 train=TrainConfig(task=task_cls.name, steps=40, seed=0),
                 optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
    task = task_cls(cfg, TokenIds.of(tok))
    mesh = sharding.make_mesh(cfg.mesh)
    probe = Trainer(model, None, None, mesh, 0, task=task)
    tx = make_optimizer(cfg.optim, task.updates(), probe.param_roles(), task.optim_groups())
    trainer = Trainer(model, tx, lr_schedule(cfg.optim, task.updates()), mesh, 0, task=task)
    state = trainer.init_state()
    # The reference is the policy's starting point (as the SFT weights are for both in a real run).
    state["frozen"]["reference"] = jax.tree.map(jnp.copy, state["params"]["policy"])
    return cfg, trainer, state


PROMPTS = [Prompt([{"role": "user", "content": "what is 1 plus 2?"}], "3", 1),
           Prompt([{"role": "system", "content": "abc"}, {"role": "user", "content": "xyz"}], "0", 1),
           Prompt([{"role": "user", "content": "9"}], "9", 1)]


def test_sampler_logprobs_equal_the_training_forward_pass_with_left_padding(tok):
    _, trainer, state = _trainer(tok)
    policy = trainer.model(trainer.inference_params(state))["policy"]
    prompts = PROMPTS * 3  # different prompt lengths: the sampler left-pads them in one batch
    roll = sample(policy, tok, prompts, row_seeds(0, 0, len(prompts)), context=CONTEXT, max_new_tokens=12,
                  temperature=1.0)
    first_action = roll.loss_weights.argmax(1)  # (= prompt length − 1: the prompts differ, so the sampler left-padded)
    assert len(set(first_action.tolist())) == 3
    logits, _ = forward_logits(policy, jnp.asarray(roll.tokens))
    forward = np.asarray(token_logprobs(logits, jnp.asarray(roll.targets)))
    mask = roll.loss_weights > 0
    assert mask.sum() >= len(prompts)
    np.testing.assert_allclose(forward[mask], roll.sampler_logprobs[mask], atol=1e-5)
    # The scoring pass the update's ratio uses is the same computation.
    scored = score_rollout(trainer, state, roll)
    np.testing.assert_allclose(scored["logprobs"][mask], roll.sampler_logprobs[mask], atol=1e-5)
    np.testing.assert_allclose(scored["kl"][mask], 0.0, atol=1e-6)  # (policy = reference)


def test_the_reward_model_reads_the_policy_tokens_as_the_chat_template_renders_them(tok):
    _, trainer, state = _trainer(tok)
    policy = trainer.model(trainer.inference_params(state))["policy"]
    roll = sample(policy, tok, PROMPTS * 2, list(range(6)), context=CONTEXT, max_new_tokens=8, temperature=1.0)
    compared = 0
    for b, (p, reply, ended) in enumerate(zip(roll.prompts, roll.replies, roll.ended)):
        want = reward_ids(p.messages + [{"role": "assistant", "content": reply}], tok, ended=bool(ended))
        row = roll.rm_tokens[b, :roll.rm_index[b] + 1].tolist()
        assert row[-1] == tok.reward_id
        head = prompt_ids(p.messages, tok)
        assert row[:len(head)] == head
        content = row[len(head):len(row) - 1 - int(ended)]
        # (a random policy also emits specials such as <pad>, whose text does not encode back to them:
        # there the tokens, not a re-encoding of the text, are what the reward model must read)
        if [int(i) for i in tok.encode_unseen(tok.decode(content))] == content:
            assert row == want
            compared += 1
    assert compared >= 1


def _train(tok, beta, steps=30, target="x"):
    """PPO with a reward paying for every `target` token of the reply; returns (share of it, KL) per step."""
    cfg, trainer, state = _trainer(tok, beta=beta)
    x = tok.encode(target)[0]
    prompts = [PROMPTS[i % 3] for i in range(cfg.rl.prompts)]
    history = []
    for step in range(steps):
        policy = trainer.model(trainer.inference_params(state))["policy"]
        roll = sample(policy, tok, prompts, row_seeds(0, step, len(prompts)), context=CONTEXT,
                      max_new_tokens=cfg.rl.max_new_tokens, temperature=1.0)
        paid = (roll.targets == x) * roll.loss_weights
        scores = paid.sum(1) / cfg.rl.max_new_tokens
        scored = score_rollout(trainer, state, roll)
        kl = float((scored["kl"] * roll.loss_weights).sum(1).mean())
        history.append((float(paid.sum() / roll.loss_weights.sum()), kl))
        state, learned, _ = update(trainer, state, roll, scored, scores, beta, 0, step)
        assert np.isfinite(learned["loss"])
    return history


def test_ppo_learns_to_emit_the_token_it_is_paid_for_and_a_large_beta_holds_it_near_the_reference(tok):
    free = _train(tok, beta=0.0)
    start, end = np.mean([s for s, _ in free[:3]]), np.mean([s for s, _ in free[-3:]])
    assert start < 0.2 and end > 0.6, (start, end)
    leashed = _train(tok, beta=2.0)
    kl_free, kl_leashed = free[-1][1], leashed[-1][1]
    assert kl_leashed < 0.25 * kl_free and kl_leashed < 0.5, (kl_free, kl_leashed)


def test_grpo_group_advantages_of_equal_rewards_are_zero(tok):
    _, trainer, state = _trainer(tok, GRPO, prompts=4, group=4, reward="gold", beta=0.0)
    policy = trainer.model(trainer.inference_params(state))["policy"]
    prompts = [q for q in (PROMPTS + PROMPTS[:1]) for _ in range(4)]
    roll = sample(policy, tok, prompts, row_seeds(0, 0, 16), context=CONTEXT, max_new_tokens=6, temperature=1.0)
    scored = score_rollout(trainer, state, roll)
    assert "rm_score" not in scored and "values" not in scored  # (gold: no reward model, and no critic)
    scores = np.repeat([0.0, 1.0, 1.0, 0.5], 4)  # every group's replies score alike
    before = jax.tree.map(np.asarray, state["params"]["policy"])  # (the update donates the state)
    new_state, learned, metrics = update(trainer, state, roll, scored, scores, 0.0, 0, 0)
    assert metrics["groups_without_signal"] == 1.0
    assert learned["pg_loss"] == 0.0 and np.isfinite(learned["loss"])
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new_state["params"]["policy"], before)
    assert max(jax.tree.leaves(moved)) == 0.0  # (β = 0: nothing to learn, nothing changes)


@pytest.mark.parametrize("uninformative", ["drop", "keep"])
def test_grpo_drops_the_rows_of_groups_without_signal_from_the_token_mean(tok, uninformative):
    """rl.uninformative=drop: the rows of a group whose replies all score alike get loss weight 0, so the
    minibatch's token mean runs over the replies that carry a signal; keep: they stay (advantage 0)."""
    _, trainer, state = _trainer(tok, GRPO, prompts=4, group=4, reward="gold", beta=0.0, uninformative=uninformative)
    policy = trainer.model(trainer.inference_params(state))["policy"]
    prompts = [q for q in (PROMPTS + PROMPTS[:1]) for _ in range(4)]
    roll = sample(policy, tok, prompts, row_seeds(0, 0, 16), context=CONTEXT, max_new_tokens=6, temperature=1.0)
    scored = score_rollout(trainer, state, roll)
    scores = np.array([0, 1, 0, 1] + [1.0] * 4 + [0.0] * 4 + [1, 0, 0, 0], np.float32)  # groups 2 and 3 alike
    inputs = {"old_logprobs": scored["logprobs"] * roll.loss_weights, "ref_logprobs": scored["ref_logprobs"]}
    batch, metrics = trainer.active_task.advantages(roll, inputs, scores, 0.0)
    assert metrics["groups_without_signal"] == 0.5
    informative = np.repeat([True, False, False, True], 4)
    weights = batch["loss_weights"]
    np.testing.assert_array_equal(weights[informative], roll.loss_weights[informative])
    if uninformative == "drop":
        assert not weights[~informative].any()
    else:
        np.testing.assert_array_equal(weights, roll.loss_weights)
    assert not batch["advantages"][~informative].any() and batch["advantages"][informative].any()


def test_rl_problems_are_user_errors():
    from plutao.train.tasks.policy import PolicyGradient

    base = Config(model=ModelConfig(context_length=64), train=TrainConfig(task="grpo"))
    assert any("G ≥ 2" in p for p in GRPO.problems(dataclasses.replace(base, rl=RLConfig(group=1, max_new_tokens=8))))
    assert any("divide" in p for p in PolicyGradient.problems(
        dataclasses.replace(base, rl=RLConfig(prompts=6, minibatches=4, max_new_tokens=8))))
    assert any("gold" in p for p in PPO.problems(dataclasses.replace(base, rl=RLConfig(reward="gold", max_new_tokens=8))))
    # Rollouts at another temperature than the update's would be off-policy: refused, not silently used.
    for t in (0.7, 1.3, 0.0):
        assert any("off-policy" in p for p in PolicyGradient.problems(
            dataclasses.replace(base, rl=RLConfig(temperature=t, max_new_tokens=8))))
    assert not any("temperature" in p for p in PolicyGradient.problems(
        dataclasses.replace(base, rl=RLConfig(temperature=1.0, max_new_tokens=8))))
