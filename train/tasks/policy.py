"""What learning from rollouts shares (PPO, GRPO): the models of the state, the scoring forward pass
of a rollout batch, and the clipped policy objective.

The state holds named models (train/tasks/base.py: ModelSlot): the policy (trainable, from the SFT
run), a frozen reference (the same SFT weights: what the KL is measured against) and, with a
reward-model run, the frozen reward model; PPO adds a trainable value model. The loop that samples,
scores and updates is train/rl/loop.py; the mathematics is train/rl/objectives.py.

The log-probs of the ratio's denominator are recomputed by the same forward pass the update uses
(not taken from the sampler): the sampler's are kept beside them and their largest difference is
logged every step (`logprob_gap`), so a mismatch between rollout and training shows, never hides.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from plutao.model.families import build_model
from plutao.model.heads import ScalarHead, forward_logits
from plutao.model.layers import no_constraint
from plutao.train.config.errors import UserError
from plutao.train.data.batches import AXES
from plutao.train.losses import token_logprobs
from plutao.train.rl import objectives as rl
from plutao.train.rl.rollouts import PromptSource
from plutao.train.tasks.base import Data, ModelSlot
from plutao.train.tasks.causal_lm import CausalLM
from plutao.train.tasks.sft import SFT

PER_TOKEN = ("batch", "length")
RL_AXES = {"old_logprobs": PER_TOKEN, "ref_logprobs": PER_TOKEN, "advantages": PER_TOKEN, "returns": PER_TOKEN,
           "old_values": PER_TOKEN, "rm_tokens": PER_TOKEN, "rm_index": ("batch",)}


def scalar_model(cfg, rngs):
    """A decoder with a scalar head named as the reward model's (so a reward run's weights load into it)."""
    model = build_model(cfg.model, rngs)
    model.reward_head = ScalarHead(cfg.model.d_model, rngs)
    return model


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyGradient(CausalLM):
    chat = True
    decoder_only = "samples replies from a decoder"
    parents = frozenset({"sft"})
    parent_refusal = ("{parent} is not an SFT run (it is a {label} run); reinforcement learning starts from a "
                      "`plutao sft` run")
    scans_layers = True
    commands = frozenset({"sample", "score", "attention", "chat"})
    rollouts: ClassVar[bool] = True  # trained by train/rl/loop.py
    served: ClassVar[str] = "policy"  # the model `plutao sample`, `chat` and the report card use
    batch_keys = ("tokens", "targets", "loss_weights", "old_logprobs", "advantages")
    step_metrics: ClassVar[tuple[str, ...]] = ("pg_loss", "clipfrac", "approx_kl", "ratio", "ratio_sq")

    @property
    def batch_axes(self):
        return {k: AXES.get(k, RL_AXES.get(k)) for k in self.batch_keys}

    @property
    def uses_reward_model(self) -> bool:
        return self.cfg.rl.reward != "gold"

    @classmethod
    def problems(cls, cfg):
        out = super().problems(cfg)
        r = cfg.rl
        rows = r.prompts * r.group
        if r.prompts < 1 or r.group < 1 or r.epochs < 1 or r.minibatches < 1 or r.max_new_tokens < 0:
            out.append("rl.prompts, rl.group, rl.epochs and rl.minibatches must be ≥ 1, rl.max_new_tokens ≥ 0 (0 = the "
                       "world's reply budget)")
        elif rows % r.minibatches:
            out.append(f"rl.prompts × rl.group = {rows} rows per rollout must divide into rl.minibatches={r.minibatches}")
        if not 0 < r.clip < 1:
            out.append(f"rl.clip must be in (0, 1), got {r.clip}")
        if r.beta < 0 or r.target_kl < 0:
            out.append("rl.beta and rl.target_kl must be ≥ 0")
        if r.target_kl and r.kl_horizon < 1:
            out.append(f"rl.kl_horizon must be ≥ 1 with rl.target_kl, got {r.kl_horizon}")
        if not (0 <= r.gamma <= 1 and 0 <= r.lam <= 1):
            out.append(f"rl.gamma and rl.lam must be in [0, 1], got {r.gamma} and {r.lam}")
        if r.value_coef < 0 or r.value_clip < 0 or r.unfinished_penalty < 0:
            out.append("rl.value_coef, rl.value_clip and rl.unfinished_penalty must be ≥ 0")
        if r.ptx_coef or r.ema:
            out.append("rl.ptx_coef (PPO-ptx) and rl.ema are not available yet; leave them at 0")
        if r.temperature != 1.0:  # (the update's ratio and KL read the model at temperature 1)
            out.append(f"rl.temperature={r.temperature:g} would train on replies sampled from another distribution "
                       "than the one the update's ratio and KL measure (the model at temperature 1): off-policy; "
                       "leave rl.temperature=1")
        if cfg.reply_tokens >= cfg.model.context_length // 2:
            said = f"rl.max_new_tokens={r.max_new_tokens}" if r.max_new_tokens else (
                f"the world's reply budget ({cfg.reply_tokens} tokens, rl.max_new_tokens=0)")
            out.append(f"{said} leaves too little of the {cfg.model.context_length}-token context for the prompt; set "
                       "rl.max_new_tokens below half the context")
        return out

    def served_task(self):
        """The policy alone, as an SFT model: what sampling, chat and the report card load."""
        return SFT(dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, task="sft")), self.ids)

    def step_rows(self) -> int:
        return self.cfg.rl.prompts * self.cfg.rl.group // self.cfg.rl.minibatches

    def updates(self) -> int:
        return self.cfg.train.steps * self.cfg.rl.epochs * self.cfg.rl.minibatches

    def model_slots(self):
        slots = {"policy": ModelSlot(self.build_model),
                 "reference": ModelSlot(self.build_model, trainable=False)}
        if self.uses_reward_model:
            slots["reward"] = ModelSlot(lambda rngs: scalar_model(self.cfg, rngs), trainable=False)
        return slots

    def read(self) -> Data:
        source = PromptSource(self.cfg)
        return Data([], source, source.name)

    def batches(self, data, tokenizer):
        r = self.cfg.rl
        what = f"{r.prompts} prompts" + (f" × {r.group} replies" if r.group > 1 else "")
        return data.payload, f"rollouts of {what} per step from {data.names}"

    # --- scoring a rollout batch (one jitted forward pass per model) -------------------------------

    def score(self, models, batch, constrain=no_constraint) -> dict:
        """Per-token log-probs of policy and reference, the exact KL and the policy's entropy at every
        position, values (PPO) and the reward model's raw score (when there is one)."""
        logits, _ = forward_logits(models["policy"], batch["tokens"], constrain=constrain)
        ref_logits, _ = forward_logits(models["reference"], batch["tokens"], constrain=constrain)
        out = {"logprobs": token_logprobs(logits, batch["targets"]),
               "ref_logprobs": token_logprobs(ref_logits, batch["targets"]),
               "kl": rl.kl_exact(logits, ref_logits), "entropy": rl.entropy(logits)}
        if "value" in models:
            value = models["value"]
            out["values"] = value.reward_head(value(batch["tokens"], constrain=constrain).hidden_BTD)
        if "reward" in models:
            reward = models["reward"]
            out["rm_score"] = reward.reward_head(reward(batch["rm_tokens"], constrain=constrain).hidden_BTD,
                                                 batch["rm_index"])
        return out

    def advantages(self, rollout, scored: dict, rewards: np.ndarray, beta: float) -> tuple[dict, dict]:
        """(the update's batch arrays beyond tokens/targets/loss_weights, metrics of this step)."""
        raise NotImplementedError

    # --- the update -------------------------------------------------------------------------------

    def policy_terms(self, models, batch, constrain):
        logits, _ = forward_logits(models["policy"], batch["tokens"], constrain=constrain)
        logp = token_logprobs(logits, batch["targets"])
        m = batch["loss_weights"]
        pg, ratio = rl.clipped_policy_loss(logp, batch["old_logprobs"], batch["advantages"], self.cfg.rl.clip)
        log_ratio = logp - batch["old_logprobs"]
        sums = {"count": m.sum(), "pg_loss": (pg * m).sum(),
                "clipfrac": (m * (jnp.abs(ratio - 1.0) > self.cfg.rl.clip)).sum(),
                "approx_kl": (m * (jnp.expm1(log_ratio) - log_ratio)).sum(),
                "ratio": (m * ratio).sum(), "ratio_sq": (m * ratio ** 2).sum()}
        return logp, sums

    def check_command(self, command, run_dir):
        if command not in self.commands:
            raise UserError(f"{run_dir} is a {self.label} run (a chat policy); `plutao {command}` does not apply to it")
