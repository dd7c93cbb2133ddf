"""PPO against a frozen reward model with a KL penalty to the SFT policy (InstructGPT's stage 3).

Per rollout batch (train/rl/loop.py):
1. the reward model's score of each reply, shifted by the run's offset (reward_offset.json); with
   rl.whiten_rewards the scores are standardised over the batch (mean 0, std 1, so the KL penalty
   and the value targets keep one scale however the reward model's scores drift); a reply that hit
   rl.max_new_tokens without <|end|> then loses rl.unfinished_penalty;
2. per-token rewards −β·(log π − log π_ref) at every action, the score added at the last one
   (train/rl/objectives.py: token_rewards); β fixed, or adapted toward rl.target_kl (Ziegler et al.);
3. GAE(γ = rl.gamma, λ = rl.lam) over the value model's estimates, advantages whitened per batch;
4. rl.epochs passes of rl.minibatches steps: clipped ratio (rl.clip) + rl.value_coef × clipped value
   loss (rl.value_clip), mean over the minibatch's reply tokens (+ rl.ptx_coef × the pretraining rows'
   mean cross-entropy: PPO-ptx, train/tasks/policy.py).

The value model is a decoder with a scalar head at every position, initialised from the reward
model (trunk and head), trained beside the policy (its own learning rate: rl.value_lr).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from plutao.model.layers import no_constraint
from plutao.train.rl import objectives as rl
from plutao.train.tasks.base import ModelSlot
from plutao.train.tasks.policy import PolicyGradient, scalar_model


@dataclasses.dataclass(frozen=True, eq=False)
class PPO(PolicyGradient):
    name = "ppo"
    label = "PPO"
    batch_keys = ("tokens", "targets", "loss_weights", "old_logprobs", "advantages", "returns", "old_values")
    step_metrics = PolicyGradient.step_metrics + ("value_loss",)

    @classmethod
    def problems(cls, cfg):
        out = super().problems(cfg)
        if cfg.rl.reward == "gold":
            out.append("PPO learns against a reward model: give --reward RM_RUN (the gold checker is for `plutao grpo`)")
        if cfg.rl.group != 1:
            out.append(f"PPO samples one reply per prompt (rl.group=1); rl.group={cfg.rl.group} is for `plutao grpo`")
        return out

    def model_slots(self):
        slots = super().model_slots()
        return {"policy": slots["policy"], "value": ModelSlot(lambda rngs: scalar_model(self.cfg, rngs)),
                **{k: v for k, v in slots.items() if k != "policy"}}

    def optim_groups(self):
        o = self.cfg.optim
        return {"value": dataclasses.replace(o, lr=self.cfg.rl.value_lr, min_lr=o.min_lr * self.cfg.rl.value_lr / o.lr)
                } if self.cfg.rl.value_lr else {}

    def advantages(self, rollout, scored, scores, beta):
        r = self.cfg.rl
        mask = rollout.loss_weights
        s = np.asarray(scores, np.float32)
        if r.whiten_rewards and len(s) > 1:
            s = (s - s.mean()) / (s.std() + 1e-6)
        s = s - r.unfinished_penalty * (~rollout.ended & (rollout.lengths >= self.cfg.reply_tokens))
        k1 = rl.kl_k1(scored["old_logprobs"], scored["ref_logprobs"]) * mask
        rewards = rl.token_rewards(jnp.asarray(s), jnp.asarray(k1), jnp.asarray(mask), beta)
        values = scored["values"] * mask
        adv, returns = rl.gae(rewards, jnp.asarray(values), jnp.asarray(mask), r.gamma, r.lam)
        batch = {"old_logprobs": scored["old_logprobs"], "old_values": values,
                 "advantages": np.asarray(rl.masked_whiten(adv, jnp.asarray(mask))), "returns": np.asarray(returns)}
        metrics = {"shaped_score": float(s.mean()), "explained_variance": rl.explained_variance(values, np.asarray(returns), mask),
                   "value_mean": float(values.sum() / max(mask.sum(), 1)),
                   "return_mean": float(np.asarray(returns).sum() / max(mask.sum(), 1))}
        return batch, metrics

    def sums(self, models, batch, key, *, train, constrain=no_constraint):
        _, sums = self.policy_terms(models, batch, constrain)
        value = models["value"]
        v = value.reward_head(value(batch["tokens"], constrain=constrain).hidden_BTD)
        m = batch["loss_weights"]
        vf = rl.clipped_value_loss(v, batch["old_values"], batch["returns"], self.cfg.rl.value_clip)
        sums["value_loss"] = (vf * m).sum()
        sums["loss"] = (sums["pg_loss"] + self.cfg.rl.value_coef * sums["value_loss"]
                        + self.cfg.rl.ptx_coef * sums["ptx_loss"])
        return sums

