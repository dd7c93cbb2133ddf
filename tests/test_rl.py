"""Learning from rollouts on tiny random models: rollout log-probs equal the training forward pass's,
the reward model reads the policy's own tokens, the PPO update moves the policy toward what is paid
for (and a large β holds it near the reference), GRPO's group advantages; at the presets' own
settings (learning rate 3e-5, steps, β) GRPO and PPO move a policy that is sometimes right toward
what is paid for; PPO-ptx's loss and the policy's moving average."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plutao.model.config import ModelConfig
from plutao.model.decode import complete
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig
from plutao.tokenizer import train_tokenizer
from plutao.tokenizer.chat import prompt_ids, reply_stop_ids, reward_ids
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
    # The reference (and the moving average) start at the policy (as at the SFT weights in a real run).
    for slot in state["frozen"].keys() & {"reference", "ema"}:
        state["frozen"][slot] = jax.tree.map(jnp.copy, state["params"]["policy"])
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
    for rl, said in (({"ptx_coef": 0.5}, "rl.ptx_data=PATH"), ({"ptx_coef": -1.0}, "rl.ptx_coef must be ≥ 0"),
                     ({"ema": 1.0}, "rl.ema is a decay"), ({"ptx_coef": 1.0, "ptx_data": ["a", "b"], "ptx_weights": [1.0]},
                                                           "one weight per"),
                     ({"tool_cost": 0.2}, "with rl.tools set"), ({"tool_cost": -0.1, "tools": "calculator"}, "≥ 0")):
        assert any(said in p for p in PolicyGradient.problems(
            dataclasses.replace(base, rl=RLConfig(max_new_tokens=8, **rl)))), rl


def test_ptx_adds_its_coefficient_times_the_pretraining_cross_entropy_to_the_loss(tok):
    """PPO-ptx: the update's loss is the policy terms + rl.ptx_coef × the mean next-token cross-entropy
    of the pretraining rows (their documents kept apart at <|endoftext|>), whatever the reply-token count."""
    from plutao.train.tasks.policy import RolloutData

    rng = np.random.default_rng(0)
    rows, T = 4, 16
    text = tok.encode("what is 12 plus 30? abc xyz") + [tok.eot_id] + tok.encode("0123456789 minus 4")
    ptx = RolloutData(None, type("Rows", (), {"train_rows": lambda self, u: np.stack(
        [np.roll(text, -u - r)[:T + 1] for r in range(rows)]).astype(np.int32)})())
    extra = ptx.pretraining_batch(3, tok.eot_id)
    assert (extra["ptx_positions"][extra["ptx_tokens"] == tok.eot_id] == 0).all()  # (a document starts there)
    losses = {}
    for coef in (0.0, 0.7):
        _, trainer, state = _trainer(tok, GRPO, prompts=2, group=2, minibatches=1, reward="gold", beta=0.0,
                                     ptx_coef=coef, ptx_data="unused")
        task = trainer.active_task
        policy = trainer.model(trainer.inference_params(state))["policy"]
        tokens = rng.integers(10, tok.vocab_size, (rows, T)).astype(np.int32)
        weights = (np.arange(T) >= 10).astype(np.float32)[None].repeat(rows, 0)  # 6 reply tokens per row
        logp = np.asarray(token_logprobs(forward_logits(policy, jnp.asarray(tokens))[0], jnp.asarray(tokens)))
        batch = {"tokens": tokens, "targets": tokens, "loss_weights": weights, "old_logprobs": logp,
                 "ref_logprobs": logp, "advantages": np.zeros_like(weights)} | extra
        sums = task.sums({"policy": policy}, {k: jnp.asarray(v) for k, v in batch.items()}, None, train=True)
        losses[coef] = float(sums["loss"] / sums["count"])
        logits, _ = forward_logits(policy, jnp.asarray(extra["ptx_tokens"]), segment_ids_BT=extra["ptx_segment_ids"],
                                   positions_BT=extra["ptx_positions"])
        want_nll = -float(token_logprobs(logits, jnp.asarray(extra["ptx_targets"])).mean())
        np.testing.assert_allclose(float(sums["ptx_loss"] / sums["count"]), want_nll if coef else 0.0, rtol=1e-5)
        assert set(task.update_keys) >= ({"ptx_tokens", "ptx_targets", "ptx_positions"} if coef else set())
    assert losses[0.0] == pytest.approx(0.0, abs=1e-6)  # (advantage 0, β 0: only the pretraining term is left)
    np.testing.assert_allclose(losses[0.7], 0.7 * want_nll, rtol=1e-5)


def test_ema_is_the_moving_average_of_the_policy_after_each_optimizer_step(tok):
    _, trainer, state = _trainer(tok, GRPO, prompts=4, group=2, epochs=1, minibatches=1, reward="gold", beta=0.0,
                                 ema=0.75)
    assert "ema" in state["frozen"] and trainer.active_task.served_slot == ("frozen", "ema")
    want = jax.tree.map(np.asarray, state["params"]["policy"])
    for step in range(2):
        policy = trainer.model(trainer.inference_params(state))["policy"]
        prompts = [q for q in (PROMPTS[:2] * 2) for _ in range(2)]
        roll = sample(policy, tok, prompts, row_seeds(0, step, 8), context=CONTEXT, max_new_tokens=6, temperature=1.0)
        scored = score_rollout(trainer, state, roll)
        state, _, _ = update(trainer, state, roll, scored, np.tile([0.0, 1.0], 4), 0.0, 0, step)
        now = jax.tree.map(np.asarray, state["params"]["policy"])
        want = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, want, now)
    got = jax.tree.map(np.asarray, state["frozen"]["ema"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(now))) > 0


def _preset_trainer(tok, stage: str, share: float):
    """A policy trained (supervised) to answer every prompt with `x` a `share` of the time and `y`
    otherwise — an SFT model that is sometimes right — and a trainer with the stage preset's
    optimizer and rl.* settings (train/config/presets.py), the reference at the same weights."""
    import optax
    from flax import nnx

    from plutao.tokenizer.chat import prompt_ids
    from plutao.train.config.presets import STAGE_PRESETS

    preset = STAGE_PRESETS[stage]
    rl = {k.removeprefix("rl."): v for k, v in preset.items() if k.startswith("rl.")}
    task_cls = {"ppo": PPO, "grpo": GRPO}[stage]
    cfg, trainer, state = _trainer(tok, task_cls, **rl, reward="gold" if stage == "grpo" else "unused",
                                   max_new_tokens=4)
    o = dataclasses.replace(cfg.optim, **{k.removeprefix("optim."): v for k, v in preset.items()
                                           if k.startswith("optim.")})
    task = trainer.active_task
    tx = make_optimizer(o, task.updates(), trainer.param_roles(), task.optim_groups())
    trainer = Trainer(cfg.model, tx, lr_schedule(o, task.updates()), trainer.mesh, 0, task=task)
    graph, params = nnx.split(trainer.model(trainer.inference_params(state))["policy"])
    x, y = tok.encode("x")[0], tok.encode("y")[0]
    heads = [prompt_ids(q.messages, tok) for q in PROMPTS]
    sup = optax.adam(3e-3)

    @jax.jit
    def sup_step(params, opt, tokens, weights):
        def loss(p):
            logits, _ = forward_logits(nnx.merge(graph, p), tokens[:, :-1])
            return -(token_logprobs(logits, tokens[:, 1:]) * weights).sum() / weights.sum()
        updates, opt = sup.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, updates), opt

    rng, opt = np.random.default_rng(0), sup.init(params)
    width = max(map(len, heads)) + 2
    for _ in range(60):
        tokens = np.full((32, width), tok.pad_id, np.int32)
        weights = np.zeros((32, width - 1), np.float32)
        for b in range(32):
            seq = heads[b % 3] + [x if rng.random() < share else y, tok.end_id]
            tokens[b, :len(seq)] = seq
            weights[b, len(seq) - 3:len(seq) - 1] = 1.0
        params, opt = sup_step(params, opt, tokens, weights)
    warm = nnx.to_pure_dict(nnx.state(nnx.merge(graph, params), nnx.Param))
    state = trainer.init_state()
    for part, slot in (("params", "policy"), ("frozen", "reference")):
        state[part][slot] = jax.tree.map(jnp.array, warm)
    return cfg, trainer, state, x


def _learns_at_the_preset(tok, stage: str) -> list[float]:
    """The share of replies starting with the paid-for `x`, per RL step, over the preset's steps."""
    from plutao.train.config.presets import STAGE_PRESETS

    cfg, trainer, state, x = _preset_trainer(tok, stage, share=0.3)
    r, rows = cfg.rl, cfg.rl.prompts * cfg.rl.group
    prompts = [PROMPTS[(i // r.group) % 3] for i in range(rows)]
    history = []
    for step in range(STAGE_PRESETS[stage]["train.steps"]):
        policy = trainer.model(trainer.inference_params(state))["policy"]
        roll = sample(policy, tok, prompts, row_seeds(0, step, rows), context=CONTEXT, max_new_tokens=4,
                      temperature=1.0)
        first = roll.targets[np.arange(rows), roll.loss_weights.argmax(1)]
        scores = (first == x).astype(np.float32)  # (verifiable: the reply starts with x)
        history.append(float(scores.mean()))
        state, learned, _ = update(trainer, state, roll, score_rollout(trainer, state, roll), scores, r.beta, 0, step)
        assert np.isfinite(learned["loss"])
    return history


@pytest.mark.slow  # (fast sibling: test_grpo_drops_the_rows_of_groups_without_signal_from_the_token_mean)
def test_grpo_at_the_preset_learns_a_verifiable_reward_from_a_policy_that_is_sometimes_right(tok):
    """The GRPO preset's learning rate, steps, groups, epochs, β and dropping of groups without signal,
    from a policy right 30% of the time: the paid-for first token becomes the more likely one."""
    history = _learns_at_the_preset(tok, "grpo")
    start, end = np.mean(history[:5]), np.mean(history[-8:])
    assert start < 0.45 and end > start + 0.12 and end > 0.5, (start, end)


@pytest.mark.slow  # (fast sibling: test_ppo_learns_to_emit_the_token_it_is_paid_for_and_a_large_beta_holds_it_near_the_reference)
def test_ppo_at_the_preset_learns_a_paid_for_token_from_a_policy_that_is_sometimes_right(tok):
    """The PPO preset's learning rate (3e-5), value learning rate, β, steps and unwhitened rewards."""
    history = _learns_at_the_preset(tok, "ppo")
    start, end = np.mean(history[:5]), np.mean(history[-8:])
    assert start < 0.45 and end > start + 0.12 and end > 0.5, (start, end)


def test_rollout_rows_with_tool_turns_hold_the_result_as_a_hole_and_keep_the_training_logprobs(tok):
    """A reply that paused, took forced tokens and went on: in the training row the forced positions
    carry no loss weight and no sampler log-prob, the policy's own tokens keep the sampler's log-probs,
    equal to the training forward pass over the whole row (tool turn included) to 1e-5; the gold
    checker reads the final answer only."""
    from plutao.model.agent import complete_with_tools
    from plutao.train.rl.rollouts import pack

    _, trainer, state = _trainer(tok)
    policy = trainer.model(trainer.inference_params(state))["policy"]
    ids = [prompt_ids(p.messages, tok) for p in PROMPTS]
    pause = complete(policy, ids[:1], SamplingConfig(temperature=0.0, max_new_tokens=1), eot_id=tok.eot_id,
                     pad_id=tok.pad_id)[0].tokens[0]  # (a token the random policy is sure to write first)
    result = tok.encode("123") + [tok.end_id, tok.assistant_id]
    samplings = [SamplingConfig(temperature=float(s > 0), max_new_tokens=6, seed=s, stop_ids=reply_stop_ids(tok))
                 for s in range(3)]  # (row 0 greedy: it pauses; the others sampled)
    outs = complete_with_tools(policy, ids, samplings, eot_id=tok.eot_id, pad_id=tok.pad_id, pause_id=pause,
                               answer=lambda row, reply, calls: result)
    assert outs[0].forced  # (row 0 paused at least once)
    roll = pack(tok, PROMPTS, ids, [c.tokens for c in outs], [c.model_logprobs for c in outs], CONTEXT,
                [c.forced for c in outs])
    first = roll.loss_weights.argmax(1)
    for b, c in enumerate(outs):
        holes = first[b] + np.asarray(c.forced, np.int64)
        assert (roll.loss_weights[b, holes] == 0).all() and (roll.sampler_logprobs[b, holes] == 0).all()
        assert roll.loss_weights[b].sum() == len(c.tokens) - len(c.forced)
        assert roll.calls[b] == len(c.forced) // len(result)  # (what rl.tool_cost charges for)
        final = c.tokens[max(c.forced) + 1:] if c.forced else c.tokens
        assert roll.replies[b] == tok.decode(final[:-1] if c.stop_token is not None else final)  # (the final answer)
    logits, _ = forward_logits(policy, jnp.asarray(roll.tokens))
    forward = np.asarray(token_logprobs(logits, jnp.asarray(roll.targets)))
    mask = roll.loss_weights > 0
    np.testing.assert_allclose(forward[mask], roll.sampler_logprobs[mask], atol=1e-5)
    scored = score_rollout(trainer, state, roll)
    np.testing.assert_allclose(scored["logprobs"][mask], roll.sampler_logprobs[mask], atol=1e-5)
