"""The experiment configuration: typed, validated, built from presets, files and `key=value` overrides.

Every knob lives in one of six sections (data, model, train, optim, mesh, world). An override names a
key as `section.field`; unknown keys and ill-typed values are user errors naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomllib

from plutao.model.config import ModelConfig
from plutao.tokenizer.specials import TOOL_TOKENS, SpecialTokens
from plutao.train.config.errors import UserError
from plutao.train.config.presets import PRESETS
from plutao.train.worlds.arith import World, problems_in_config, reply_budget, version_problem

DEFAULT_CORPUS = "builtin:python-docs"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A file, a folder, a .jsonl file, a built-in or downloadable corpus name, or a list of them (a mixture).
    path: str | list[str] = DEFAULT_CORPUS
    weights: list[float] = dataclasses.field(default_factory=list)  # mixture weights; empty = equal
    tokenizer: Literal["char", "byte", "bpe", "word", "hf"] = "char"  # hf: an imported model's (plutao import-hf)
    vocab_size: int = 0  # BPE vocabulary size (required for bpe); word: keep the most frequent (0 = all)
    jsonl_field: str = "text"
    glob: str = "**/*.txt"  # which files of a folder source to read
    val_fraction: float = 0.1  # the last fraction of each source is held out (unless data.val_path is set)
    val_path: str = ""  # a separate held-out file (e.g. a standard validation split); then all of data.path trains
    cache_dir: str = ""  # tokenized-corpus and download cache; empty = ~/.cache/plutao
    # Rows are cut from the concatenated corpus, so a row may hold the end of one document and the start
    # of the next. true: no token attends across an <|endoftext|> (segment ids, positions restart there).
    separate_documents: bool = False
    # Special tokens this run adds after its tokenizer's vocabulary (a parent's, with train.init_from):
    # only the declared tool tokens, <|call|> and <|tool|>. The model grows by their rows: the parent's
    # rows are copied, each new one starts at the mean of the parent's (recorded in the lineage).
    add_specials: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global, in sequences
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per step (batch_size must be divisible by it)
    eval_every: int = 250
    eval_batches: int = 20
    sample_every: int = 250  # milestone samples; 0 = never
    sample_tokens: int = 200
    sample_prompt: str = ""  # empty = start from <|endoftext|>
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the latest k are kept, plus the best by val loss
    log_every: int = 10
    # Steps run by one dispatch to the devices (a loop on the device over batches sent together): the
    # host neither waits nor dispatches per step. Blocks end where the run logs, evaluates, samples,
    # saves or stops, so every checkpoint falls between blocks (a block is never longer than
    # train.log_every); 1 = one step per dispatch. The RL stages dispatch per step (they sample in between).
    steps_per_dispatch: int = 10
    seed: int = 0
    max_seconds: float = 0.0  # a wall-clock budget for this invocation's steps: the run ends there; 0 = none
    stop_at_step: int = 0  # end this invocation at this step (checkpointed, resumable); 0 = run to train.steps
    mask_rate: float = 0.15  # encoder (masked LM): the fraction of tokens selected for prediction
    peak_flops: float = 0.0  # for MFU; 0 = the device's published peak, or a matmul measured at start
    # A step whose loss or gradient norm is NaN/inf: "stop" ends the run (exit code 3) without saving
    # that state; "skip" leaves parameters and optimizer state as they were and goes on (counted).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Start a new run from another run's checkpoint: "RUN" (its newest readable checkpoint) or "RUN:STEP".
    # The parameters both models share are copied (e.g. the backbone); the rest (e.g. a new head) is
    # initialised fresh; the parent's tokenizer is used. The lineage is recorded in config.json.
    init_from: str = ""
    # What the run trains: "" = what model.family trains (next-token prediction for a decoder, ...);
    # "sft" = supervised fine-tuning on chats; "reward" = a reward model from rankings (`plutao sft`,
    # `plutao reward` set it); "ppo", "grpo" = reinforcement learning from rewards; "dpo" = direct
    # preference optimisation (`plutao ppo`, `plutao grpo`, `plutao dpo`).
    task: Literal["", "sft", "reward", "ppo", "dpo", "grpo"] = ""

    @property
    def dispatch_slots(self) -> int:
        """The most steps one dispatch can hold: train.steps_per_dispatch, capped by the intervals at
        which the run logs, evaluates, samples and saves (the slots of the block program's batches)."""
        return min([self.steps_per_dispatch, self.log_every, self.checkpoint_every]
                   + [e for e in (self.eval_every, self.sample_every) if e > 0])


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd", "adafactor", "lion"] = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4  # where cosine/linear decay ends
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on weight matrices (by role, not shape); never on norms or biases
    decay_embeddings: bool = True  # also decay token/position embedding tables (as GPT-2/nanoGPT do)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Learning from rewards (`plutao ppo`, `plutao grpo`) and from preferences (`plutao dpo`).
    train.steps counts rollout batches (RL steps); each is followed by rl.epochs passes over it in
    rl.minibatches optimizer steps."""

    reward: str = ""  # a reward-model run directory, or "gold" (the world's checker: GRPO only)
    prompts: int = 32  # prompts per rollout batch
    group: int = 1  # replies per prompt (GRPO: G ≥ 2)
    max_new_tokens: int = 0  # the reply budget; 0 = the world's (arith.reply_budget), at most half the context
    temperature: float = 1.0  # of the rollouts; only 1 (the ratio and the KL read the model at temperature 1)
    epochs: int = 4  # passes over each rollout batch
    minibatches: int = 4  # optimizer steps per pass
    clip: float = 0.2  # ε of the clipped ratio
    value_clip: float = 0.2  # of the clipped value loss; 0 = unclipped
    value_coef: float = 0.5  # weight of the value loss beside the policy loss
    value_lr: float = 0.0  # the value model's learning rate; 0 = optim.lr
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.02  # KL coefficient to the reference (DPO: the β of its loss)
    target_kl: float = 0.0  # > 0: β adapts toward this KL per reply (Ziegler et al.); 0 = fixed β
    kl_horizon: int = 200  # rows: β moves by at most ±20%·(rows per step)/kl_horizon per step
    unfinished_penalty: float = 1.0  # subtracted from the score of a reply that hit the budget without <|end|>
    whiten_rewards: bool = False  # standardise the scores over each rollout batch before the KL is added
    baseline: Literal["group", "rloo"] = "group"  # GRPO: group mean/std, or leave-one-out
    uninformative: Literal["drop", "keep"] = "drop"  # GRPO groups whose rewards are all equal: weight 0, or kept
    # PPO-ptx (InstructGPT): each update's loss adds ptx_coef × the mean next-token cross-entropy of
    # as many pretraining rows as the update has reply rows, drawn from rl.ptx_data.
    ptx_coef: float = 0.0
    # The pretraining text: a data.path-like source or mixture, documents separated at <|endoftext|>;
    # `plutao ppo`/`grpo` fill in the base run's data.path and data.weights when it is left empty.
    ptx_data: str | list[str] = ""
    ptx_weights: list[float] = dataclasses.field(default_factory=list)  # mixture weights; empty = equal
    # > 0: an exponential moving average of the policy (decay per optimizer step) is what the run
    # serves (sample, chat, report card, its held-out evaluations); rollouts still come from the policy.
    ema: float = 0.0
    eval_problems: int = 100  # held-out problems per digit count (1–5) answered greedily at each evaluation
    tools: str = ""  # tools the rollouts (and evaluations) may call, e.g. "calculator" (a policy with tool tokens)
    tool_cost: float = 0.0  # subtracted from a reply's reward per tool call (a tool that is not free)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters: W + (alpha/rank)·A·B on the named projections; only A and B are trained and
    saved, the base checkpoint is referenced (train.init_from)."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["attention"])  # attention, mlp, or q k v o up down


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 0  # 0 = the remaining devices (1 when mesh.fsdp or mesh.tensor is -1); -1 = the remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=0))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # The built-in arithmetic chat world (train/worlds/arith.py): builtin:arith-* corpora and builtin:arith data.
    world: World = dataclasses.field(default_factory=World)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    @property
    def reply_tokens(self) -> int:
        """The RL reply budget: rl.max_new_tokens, or when that is 0 the world's one budget (the longest
        worked reply + a margin), at most half the context less one (the prompt keeps the other half)."""
        return self.rl.max_new_tokens or reply_budget(self.world, self.model.context_length)

    def shaped_model(self, placeholder_vocab: int = 256) -> ModelConfig:
        """The resolved model for shape-only tools (params, plan, shardings): when the vocabulary
        comes from a tokenizer not trained yet (model.vocab_size=0), the BPE/word data.vocab_size or a placeholder
        size stands in."""
        vocab = self.model.vocab_size or (self.data.vocab_size if self.data.tokenizer in ("bpe", "word") else 0)
        return dataclasses.replace(self.model, vocab_size=vocab or placeholder_vocab).resolved()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = {k: v for k, v in d.items() if k in SECTIONS}
        if isinstance(d.get("world"), dict) and "version" not in d["world"]:  # recorded before world v2
            d["world"] = d["world"] | {"version": 1}
        return apply_overrides(cls(), flatten(d))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _fields(section: str) -> dict[str, Any]:
    cls = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "optim": OptimConfig, "mesh": MeshConfig,
           "world": World, "rl": RLConfig, "lora": LoRAConfig}[section]
    return typing.get_type_hints(cls)


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _fields(s)]


def config_defaults() -> dict[str, Any]:
    """Every `section.key` with its default value."""
    return flatten(Config().to_dict())


def _describe(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + " | ".join(map(str, get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, raw: Any, tp) -> Any:
    """Turn a CLI string (or a JSON/TOML value) into the field's type, or explain why it cannot be."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # str | list[str]: a list if given one
        if isinstance(raw, list) or (isinstance(raw, str) and raw.startswith("[")):
            return _coerce(key, raw, list[str])
        return _coerce(key, raw, str)
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(raw, str):  # JSON (["a", "b"]), or the shell-friendly [a,b] and a,b
            text, raw = raw, None
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError:
                    pass
            if not isinstance(raw, list):
                raw = [x.strip() for x in text.strip("[]").split(",") if x.strip()]
        return [_coerce(key, x, item) for x in raw]
    if origin is Literal:
        choices = get_args(tp)
        if raw not in choices:
            close = difflib.get_close_matches(str(raw), list(map(str, choices)), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{key}={raw!r} is not allowed; use {_describe(tp)}{hint}")
        return raw
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes"):
                return True
            if str(raw).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            if isinstance(raw, bool):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(float(raw)) if "e" in raw.lower() else int(raw)
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if tp is str:
            return str(raw)
    except (TypeError, ValueError):
        raise UserError(f"{key} expects {_describe(tp)}, got {raw!r}") from None
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; `plutao train --help` lists the keys"
    return UserError(f"unknown config key {key!r}{hint}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return cfg with each `section.field` set to the coerced value."""
    sections = {name: getattr(cfg, name) for name in SECTIONS}
    for key, raw in overrides.items():
        section, _, field = key.partition(".")
        if section not in SECTIONS or field not in _fields(section):
            raise _unknown_key(key)
        value = _coerce(key, raw, _fields(section)[field])
        sections[section] = dataclasses.replace(sections[section], **{field: value})
    return Config(**sections)


def parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise UserError(f"cannot read {arg!r}: overrides look like section.key=value, e.g. optim.lr=3e-4")
        out[key.strip()] = value.strip()
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """Flat overrides from a .toml or .json file with [data]/[model]/... sections."""
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist; pass a preset name or an existing .toml/.json file")
    try:
        if path.suffix == ".toml":
            d = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            d = json.loads(path.read_text())
        else:
            raise UserError(f"config file {str(path)!r} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot parse {str(path)!r}: {e}") from None
    if isinstance(d.get("world"), dict) and "version" not in d["world"]:  # a run's config.json before world v2
        d["world"] = d["world"] | {"version": 1}
    return {k: v for k, v in flatten(d).items() if not k.startswith("provenance.")}


def validate(cfg: Config, task_problems: Sequence[str] = ()) -> None:
    """Raise a UserError for the first problem that would make the run fail later. What the run's task
    finds wrong (`task_problems`) comes from train/tasks: `tasks.validate(cfg)` passes it here."""
    problems = [p for p in cfg.model.problems() if not p.startswith("model.vocab_size")]
    t, o, d = cfg.train, cfg.optim, cfg.data
    problems += list(task_problems)
    if not 0.0 < t.mask_rate < 1.0:
        problems.append(f"train.mask_rate must be in (0, 1), got {t.mask_rate}")
    if cfg.model.ngram_k <= 0:
        problems.append(f"model.ngram_k must be > 0, got {cfg.model.ngram_k}")
    if not 0 <= t.seed < 2**31:
        problems.append(f"train.seed must be in [0, 2^31), got {t.seed}")
    if cfg.model.n_encoder_layers < 0:
        problems.append(f"model.n_encoder_layers must be ≥ 0 (0 = model.n_layers), got {cfg.model.n_encoder_layers}")
    for key in ("batch_size", "steps", "log_every", "checkpoint_every", "eval_batches", "keep_checkpoints",
                "steps_per_dispatch"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be ≥ 1, got {getattr(t, key)}")
    for key in ("eval_every", "sample_every", "stop_at_step"):
        if getattr(t, key) < 0:
            problems.append(f"train.{key} must be ≥ 0 (0 = off), got {getattr(t, key)}")
    if t.sample_every and t.sample_tokens < 1:
        problems.append("train.sample_tokens must be ≥ 1 when train.sample_every is on")
    if o.grad_clip < 0 or o.weight_decay < 0:
        problems.append("optim.grad_clip and optim.weight_decay must be ≥ 0")
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        problems.append(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    if d.tokenizer == "bpe" and d.vocab_size < len(SpecialTokens.historical().ids) + 1:
        problems.append("data.tokenizer=bpe needs data.vocab_size (e.g. data.vocab_size=4096)")
    if not 0.0 < d.val_fraction < 1.0:
        problems.append(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if d.add_specials and cfg.lora.rank:
        problems.append("data.add_specials grows the embedding rows, which LoRA keeps frozen (lora.rank); grow the "
                        "vocabulary in a full fine-tune first, then adapt that run")
    if set(d.add_specials) - set(TOOL_TOKENS):
        problems.append(f"data.add_specials may add only the tool tokens {', '.join(TOOL_TOKENS)}, got "
                        f"{', '.join(sorted(set(d.add_specials) - set(TOOL_TOKENS)))}")
    if d.weights and len(d.weights) != (len(d.path) if isinstance(d.path, list) else 1):
        problems.append("data.weights needs one weight per data.path source")
    if any(w < 0 for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        problems.append("data.weights must be non-negative and not all zero")
    if t.max_seconds < 0:
        problems.append(f"train.max_seconds must be ≥ 0 (0 = no budget), got {t.max_seconds}")
    if o.lr <= 0 or o.warmup_steps < 0:
        problems.append("optim.lr must be > 0 and optim.warmup_steps ≥ 0")
    if not 0.0 <= o.label_smoothing < 1.0:
        problems.append(f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
    if o.schedule == "inverse_sqrt" and o.warmup_steps < 1:
        problems.append("optim.schedule=inverse_sqrt needs optim.warmup_steps ≥ 1")
    problems += problems_in_config(cfg.world)
    paths = [d.path] if isinstance(d.path, str) else list(d.path)
    if any(str(x).startswith("builtin:arith") for x in paths) and version_problem(cfg.world):  # (regenerated data)
        problems.append(version_problem(cfg.world))
    if problems:
        raise UserError(problems[0])


def resolve_config(config: str | None, overrides: list[str]):
    """Defaults ← preset or file ← key=value overrides, then validated (all but the task's own checks,
    which `tasks.validate` adds before a run starts)."""
    name = config or "default"
    if name in PRESETS:
        layers = dict(PRESETS[name])
    elif name.endswith((".toml", ".json")) or os.path.sep in name:
        layers = load_config_file(Path(name))
    else:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown preset {name!r}; {hint}presets: {', '.join(PRESETS)} (or a .toml/.json file)")
    cfg = apply_overrides(Config(), layers)
    cfg = apply_overrides(cfg, parse_overrides(overrides))
    validate(cfg)
    return Path(name).stem if name not in PRESETS else name, cfg
