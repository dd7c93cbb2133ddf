"""What learning from rollouts shares (PPO, GRPO): the models of the state, the scoring forward pass
of a rollout batch, and the clipped policy objective.

The state holds named models (train/tasks/base.py: ModelSlot): the policy (trainable, from the SFT
run), a frozen reference (the same SFT weights: what the KL is measured against) and, with a
reward-model run, the frozen reward model; PPO adds a trainable value model. The loop that samples,
scores and updates is train/rl/loop.py; the mathematics is train/rl/objectives.py.

With rl.ptx_coef (InstructGPT's PPO-ptx) every update also reads as many pretraining rows as it has
reply rows (`ptx_*` batch keys, drawn step-indexed from rl.ptx_data, which `plutao ppo`/`grpo`
fill in with the base run's own data; documents kept apart at <|endoftext|>) and adds rl.ptx_coef × their mean next-token cross-entropy to the loss: the "alignment tax"
on the pretraining distribution, paid back. With rl.ema a frozen slot "ema" holds an exponential
moving average of the policy, updated after every optimizer step (train/rl/loop.py); it is what the
run serves, while rollouts still come from the policy itself (on-policy).

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
from plutao.tools import ToolError, tools_named
from plutao.train.config.errors import UserError
from plutao.train.config.schema import DataConfig
from plutao.train.data import sources as data_lib
from plutao.train.data.batches import AXES
from plutao.train.losses import token_logprobs
from plutao.train.rl import objectives as rl
from plutao.train.rl.rollouts import PromptSource
from plutao.train.tasks.base import Data, ModelSlot
from plutao.train.tasks.causal_lm import CausalLM, document_segments
from plutao.train.tasks.sft import SFT

PER_TOKEN = ("batch", "length")
RL_AXES = {"old_logprobs": PER_TOKEN, "ref_logprobs": PER_TOKEN, "advantages": PER_TOKEN, "returns": PER_TOKEN,
           "old_values": PER_TOKEN, "rm_tokens": PER_TOKEN, "rm_index": ("batch",),
           "ptx_tokens": PER_TOKEN, "ptx_targets": PER_TOKEN, "ptx_segment_ids": PER_TOKEN, "ptx_positions": PER_TOKEN}


@dataclasses.dataclass(frozen=True)
class RolloutData:
    """What an RL run draws from: the prompts of each step and, with rl.ptx_coef, pretraining rows."""

    prompts: PromptSource
    pretraining: data_lib.Batches | None = None

    def pretraining_batch(self, update: int, eot_id: int) -> dict[str, np.ndarray]:
        """The `ptx_*` arrays of optimizer step `update` of the run (a pure function of it: resumable);
        no token attends across an <|endoftext|>."""
        rows = self.pretraining.train_rows(update)
        segment_ids, positions = document_segments(rows[:, :-1], eot_id)
        return {"ptx_tokens": rows[:, :-1], "ptx_targets": rows[:, 1:], "ptx_segment_ids": segment_ids,
                "ptx_positions": positions}


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
    step_metrics: ClassVar[tuple[str, ...]] = ("pg_loss", "clipfrac", "approx_kl", "ratio", "ratio_sq", "ptx_loss")

    @property
    def batch_axes(self):
        return {k: AXES.get(k, RL_AXES.get(k)) for k in self.update_keys}

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
        if r.ptx_coef < 0:
            out.append(f"rl.ptx_coef must be ≥ 0 (0 = no pretraining loss), got {r.ptx_coef}")
        elif r.ptx_coef and not r.ptx_data:
            out.append("rl.ptx_coef needs the pretraining text: rl.ptx_data=PATH (`plutao ppo`/`grpo` fill in the base "
                       "run's data when the SFT run names its base run)")
        if r.ptx_weights and len(r.ptx_weights) != len(r.ptx_data if isinstance(r.ptx_data, list) else [r.ptx_data]):
            out.append("rl.ptx_weights needs one weight per rl.ptx_data source")
        try:
            tools_named(r.tools)
        except ToolError as e:
            out.append(f"rl.tools: {e}")
        if r.tool_cost < 0 or (r.tool_cost and not r.tools):
            out.append(f"rl.tool_cost={r.tool_cost:g} is a reward taken per tool call: ≥ 0, and with rl.tools set")
        if not 0 <= r.ema < 1:
            out.append(f"rl.ema is a decay per optimizer step in [0, 1) (0 = off; e.g. 0.99), got {r.ema}")
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

    @property
    def served_slot(self) -> tuple[str, str]:
        return ("frozen", "ema") if self.cfg.rl.ema else ("params", "policy")

    @property
    def update_keys(self) -> tuple[str, ...]:
        """The keys of an update's batch: the task's, and the pretraining rows' with rl.ptx_coef."""
        if not self.cfg.rl.ptx_coef:
            return self.batch_keys
        return self.batch_keys + ("ptx_tokens", "ptx_targets", "ptx_segment_ids", "ptx_positions")

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
        if self.cfg.rl.ema:
            slots["ema"] = ModelSlot(self.build_model, trainable=False)
        if self.uses_reward_model:
            slots["reward"] = ModelSlot(lambda rngs: scalar_model(self.cfg, rngs), trainable=False)
        return slots

    def read(self) -> Data:
        source = PromptSource(self.cfg)
        return Data([], source, source.name)

    def ptx_config(self) -> DataConfig:
        """Where rl.ptx_coef's pretraining rows come from (tokenized with the run's own tokenizer)."""
        r = self.cfg.rl
        return dataclasses.replace(self.cfg.data, path=r.ptx_data, weights=list(r.ptx_weights), val_path="",
                                   separate_documents=True)

    def batches(self, data, tokenizer):
        r = self.cfg.rl
        what = f"{r.prompts} prompts" + (f" × {r.group} replies" if r.group > 1 else "")
        summary = f"rollouts of {what} per step from {data.names}"
        if not r.ptx_coef:
            return RolloutData(data.payload), summary
        ptx = self.ptx_config()
        names = data_lib.source_paths(ptx)
        docs = [data_lib.read_documents(s, ptx, flag="rl.ptx_data", world=self.cfg.world) for s in names]
        splits = data_lib.load_splits(ptx, docs, tokenizer, self.cfg.world)
        rows = data_lib.Batches(splits, ptx.weights, self.cfg.model.context_length, self.step_rows(),
                                self.cfg.train.seed)
        ptx_summary = f"PPO-ptx: {self.step_rows()} pretraining rows per update from {', '.join(names)} (×{r.ptx_coef:g})"
        return RolloutData(data.payload, rows), f"{summary}; {ptx_summary}"

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
        sums["ptx_loss"] = (self.ptx_sums(models["policy"], batch, constrain) if self.cfg.rl.ptx_coef
                            else jnp.zeros((), jnp.float32))
        return logp, sums

    def ptx_sums(self, policy, batch, constrain):
        """PPO-ptx: the pretraining rows' mean cross-entropy, as a sum over the reply tokens (so that the
        step's one division by their count leaves rl.ptx_coef × the mean next-token loss)."""
        logits, _ = forward_logits(policy, batch["ptx_tokens"], constrain=constrain,
                                   segment_ids_BT=batch["ptx_segment_ids"], positions_BT=batch["ptx_positions"])
        nll = -token_logprobs(logits, batch["ptx_targets"])
        per_token = jnp.maximum(batch["loss_weights"].sum(), 1.0)
        return nll.mean() * per_token

    def check_command(self, command, run_dir):
        if command not in self.commands:
            raise UserError(f"{run_dir} is a {self.label} run (a chat policy); `plutao {command}` does not apply to it")
