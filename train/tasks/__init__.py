"""The task registry: each kind of training in one module, chosen from the config.

This is the one place that maps a model family to what it is trained to do; the loop, `plutao eval`,
the CLI and inspection ask the task instead.

May import: config/, worlds/, parallel/, data/, eval/, losses.py, and rl/objectives, rl/rollouts,
rl/comparisons (the RL math and sampling); never step, run/, prepare or the loops.
"""

from __future__ import annotations

from plutao.model.config import ModelConfig
from plutao.tokenizer import Tokenizer
from plutao.train.config import schema
from plutao.train.config.schema import Config, OptimConfig, TrainConfig
from plutao.train.tasks.base import Data, Task, TokenIds
from plutao.train.tasks.causal_lm import CausalLM, RecurrentLM
from plutao.train.tasks.dpo import DPO
from plutao.train.tasks.grpo import GRPO
from plutao.train.tasks.masked_lm import MaskedLM
from plutao.train.tasks.ngram import NGram
from plutao.train.tasks.ppo import PPO
from plutao.train.tasks.reward import RewardModel
from plutao.train.tasks.sft import SFT
from plutao.train.tasks.translation import Translation

TASKS: dict[str, type[Task]] = {t.name: t for t in (CausalLM, RecurrentLM, MaskedLM, Translation, NGram, SFT,
                                                    RewardModel, PPO, GRPO, DPO)}
FAMILY_TASK = {"decoder": "causal_lm", "lstm": "recurrent_lm", "gru": "recurrent_lm", "rnn": "recurrent_lm",
               "encoder": "masked_lm", "encoder_decoder": "translation", "ngram": "ngram"}


def task_class(cfg: Config) -> type[Task]:
    """train.task when set (a stage of the assistant pipeline), otherwise what model.family trains."""
    return TASKS[cfg.train.task or FAMILY_TASK[cfg.model.family]]


def validate(cfg: Config) -> None:
    """The config's own checks and those of the task it trains; raises the first problem as a UserError."""
    schema.validate(cfg, task_class(cfg).problems(cfg))


def resolve(config: str | None, overrides: list[str]) -> tuple[str, Config]:
    """`schema.resolve_config` (preset or file, then overrides) with the task's checks too."""
    name, cfg = schema.resolve_config(config, overrides)
    validate(cfg)
    return name, cfg


def task_for(cfg: Config, tokenizer: Tokenizer | None = None) -> Task:
    """The task of a (resolved) config, with the token ids its objective needs from `tokenizer`."""
    return task_class(cfg)(cfg, TokenIds.of(tokenizer))


def task_for_model(model: ModelConfig, ids: TokenIds | None = None, *, label_smoothing: float = 0.0,
                   mask_rate: float = 0.15) -> Task:
    """The task of a model family with default data settings (for steps built outside a run: tests,
    benchmarks, memory plans)."""
    cfg = Config(model=model, optim=OptimConfig(label_smoothing=label_smoothing), train=TrainConfig(mask_rate=mask_rate))
    return task_class(cfg)(cfg, ids or TokenIds())


__all__ = ["TASKS", "Data", "Task", "TokenIds", "task_class", "task_for", "task_for_model"]
