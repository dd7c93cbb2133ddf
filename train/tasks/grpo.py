"""GRPO and RLOO: G replies per prompt, each reply's advantage measured against its own group, no
value model (DeepSeekMath's GRPO; Ahmadian et al.'s RLOO).

The reward of a reply is the reward model's score (`--reward RM_RUN`: learned preferences, "RLHF")
or the world's checker (`--reward gold`: 1 for a correct answer that ends with <|end|>, else 0 —
reinforcement learning from verifiable rewards). rl.baseline="group": A = (r − mean)/(std + ε) over
the group; "rloo": A = r − the mean of the other G − 1. A group whose replies all score the same
teaches nothing (A = 0, never NaN). Every token of a reply carries its reply's advantage; the loss is
the clipped ratio plus β·k3(π‖π_ref) per token (train/rl/objectives.py), a mean over the minibatch's reply tokens.

rl.uninformative="drop" (the default) gives the rows of such groups loss weight 0, as DAPO's dynamic
sampling filters them: the token mean is then over the replies that carry a signal, so a batch in
which most groups are all-right or all-wrong still moves the policy at full strength (with "keep"
their zero-advantage tokens dilute the mean, and only their KL term acts).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from plutao.model.layers import no_constraint
from plutao.train.rl import objectives as rl
from plutao.train.tasks.policy import PolicyGradient


@dataclasses.dataclass(frozen=True, eq=False)
class GRPO(PolicyGradient):
    name = "grpo"
    label = "GRPO"
    batch_keys = ("tokens", "targets", "loss_weights", "old_logprobs", "ref_logprobs", "advantages")
    step_metrics = PolicyGradient.step_metrics + ("kl_loss",)

    @classmethod
    def problems(cls, cfg):
        out = super().problems(cfg)
        if cfg.rl.group < 2:
            out.append(f"GRPO compares G ≥ 2 replies per prompt; rl.group={cfg.rl.group} (e.g. --group 8)")
        if cfg.rl.target_kl:
            out.append("GRPO's KL term has a fixed weight (rl.beta); rl.target_kl adapts PPO's KL penalty only")
        return out

    def advantages(self, rollout, scored, scores, beta):
        r = self.cfg.rl
        s = np.asarray(scores, np.float32).reshape(r.prompts, r.group)
        adv_B = np.asarray(rl.group_advantages(jnp.asarray(s), r.baseline)).reshape(-1)
        mask = rollout.loss_weights
        spread = s.std(axis=1)
        if r.uninformative == "drop":
            informative_B = np.repeat(spread > 0, r.group)
            mask = (mask * informative_B[:, None]).astype(np.float32)
        batch = {"old_logprobs": scored["old_logprobs"], "ref_logprobs": scored["ref_logprobs"],
                 "advantages": (adv_B[:, None] * mask).astype(np.float32), "loss_weights": mask}
        return batch, {"groups_without_signal": float(np.mean(spread == 0)), "group_std": float(spread.mean())}

    def sums(self, models, batch, key, *, train, constrain=no_constraint):
        logp, sums = self.policy_terms(models, batch, constrain)
        m = batch["loss_weights"]
        sums["kl_loss"] = (rl.kl_k3(logp, batch["ref_logprobs"]) * m).sum()
        sums["loss"] = sums["pg_loss"] + self.cfg.rl.beta * sums["kl_loss"] + self.cfg.rl.ptx_coef * sums["ptx_loss"]
        return sums
