"""What a kind of training declares, in one place: its model, its data and batches, its objective,
its evaluation, its milestone samples and its inspection hooks.

The loop (train/loop.py), `plutao eval`, the CLI and the inspection commands call these methods and
never ask which model family a run uses. A new kind of training (fine-tuning on chats, a reward
model, …) is a new subclass registered in train/tasks/__init__.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.families import build_model
from plutao.model.layers import no_constraint
from plutao.model.lora import Adapters, expand_targets
from plutao.model.sampling import to_host
from plutao.tokenizer import Tokenizer
from plutao.tokenizer.chat import tool_turn_marks
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, OptimConfig
from plutao.train.data.batches import AXES
from plutao.train.losses import cross_entropy_sum

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Data:
    """What a task read from its sources: the texts its tokenizer may be trained on (never held-out
    text) and whatever it needs to make batches once the tokenizer exists."""

    tokenizer_texts: Any  # an iterable of strings
    payload: Any = None
    names: str = ""


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The token ids an objective needs, read from the tokenizer once (pure data inside the jitted step)."""

    pad_id: int = 0
    mask_id: int = 5
    eot_id: int = 1
    vocab_limit: int = 0  # the tokenizer's vocabulary size (0 = unknown: the model's)
    ordinary: tuple[int, ...] = ()  # ids of ordinary (non-special) tokens; () = unknown
    # Special ids that are real prediction targets (<|endoftext|>, <eos>, a word-level <unk>):
    # label smoothing spreads its mass over these and the ordinary ids, never over padding, other
    # specials or the padded rows of a vocabulary rounded up past the tokenizer's.
    target_specials: tuple[int, ...] = ()
    tool_turn: tuple[int, ...] = ()  # (<|tool|>, <|assistant|>) of a tokenizer with tools (chat.runtime_targets)

    @classmethod
    def of(cls, tokenizer: Tokenizer | None) -> TokenIds:
        if tokenizer is None:
            return cls()
        def role(name, default=-1):  # (an imported tokenizer may lack a mask or unk token)
            return tokenizer.special_id(name) if tokenizer.has_special(name) else default

        return cls(pad_id=role("pad", tokenizer.eot_id), mask_id=role("mask"), eot_id=tokenizer.eot_id,
                   vocab_limit=tokenizer.vocab_size,
                   ordinary=tuple(int(i) for i in np.flatnonzero(ordinary_mask(tokenizer))),
                   target_specials=tuple(dict.fromkeys(role(r) for r in ("eot", "eos", "unk") if tokenizer.has_special(r))),
                   tool_turn=tool_turn_marks(tokenizer))

    def ordinary_V(self, vocab: int) -> Array:
        """(V,) bool: the ordinary ids (all ids when unknown)."""
        if not self.ordinary:
            return jnp.arange(vocab) < (self.vocab_limit or vocab)
        return jnp.zeros(vocab, bool).at[jnp.asarray(self.ordinary)].set(True)

    def smoothing_support(self, vocab: int) -> Array | None:
        if not self.vocab_limit:
            return None
        support_V = self.ordinary_V(vocab)
        for i in self.target_specials:
            support_V |= jnp.arange(vocab) == i
        return support_V


def ordinary_mask(tokenizer: Tokenizer) -> np.ndarray:
    """(tokenizer.vocab_size,) bool: True for ids that are not special tokens (wherever the tokenizer
    declares its specials)."""
    return np.asarray(tokenizer.ordinary_mask(tokenizer.vocab_size), bool)


@dataclasses.dataclass(frozen=True)
class ModelSlot:
    """One named model of a training state: how to build it, and whether the optimizer trains it
    (a frozen one, e.g. a reference policy or a reward model, is only read)."""

    build: Callable[[nnx.Rngs], nnx.Module]
    trainable: bool = True
    # Whether checkpoints hold it. A LoRA run's frozen base is not saved: it is read from the parent
    # run its lineage names (the checkpoint holds the adapters only).
    saved: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One kind of training. Instances are static (hashable) data: the run's config and token ids."""

    name: ClassVar[str] = ""
    # The batch keys this task's steps read (their logical axes are in train/data/batches.py: AXES).
    batch_keys: ClassVar[tuple[str, ...]] = ("tokens", "targets")
    trained_by_gradient: ClassVar[bool] = True
    has_attention: ClassVar[bool] = True
    scans_layers: ClassVar[bool] = False  # whether its model supports model.scan_layers and model.remat
    chat: ClassVar[bool] = False  # whether its model speaks the chat template (tokenizer/chat.py)
    judges: ClassVar[bool] = False  # whether its model scores replies instead of writing them (a reward model)
    label: ClassVar[str] = "training"  # what a run of this kind is called in messages
    # A stage that starts from another run: the kinds of parent it accepts, and its refusal of any other
    # (formatted with the parent's directory and label).
    parents: ClassVar[frozenset[str]] = frozenset()
    parent_refusal: ClassVar[str] = ""
    decoder_only: ClassVar[str] = ""  # "what it does to a decoder", when it needs model.family=decoder
    # Learns from its own samples (train/rl/loop.py) instead of a step-indexed data source.
    rollouts: ClassVar[bool] = False
    # The slot a run of several models is used by (sampling, chat, the report card); "" = its one model.
    served: ClassVar[str] = ""
    # Sums of `sums` besides the loss that a train step reports, each divided by the step's "count".
    step_metrics: ClassVar[tuple[str, ...]] = ()

    cfg: Config
    ids: TokenIds = TokenIds()

    @property
    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        """The batch keys this task's steps read, with their logical axes."""
        keys = self.batch_keys + (("segment_ids", "positions") if self.separates_documents else ())
        return {k: AXES[k] for k in keys}

    @property
    def separates_documents(self) -> bool:
        return False

    # Whether a run of this kind may train low-rank adapters instead of the whole model (lora.rank > 0).
    adapts: ClassVar[bool] = False

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        """What this kind of training cannot do with `cfg`, as user-facing sentences."""
        if cfg.lora.rank:
            if not cls.adapts:
                return [(f"lora.rank applies to `plutao sft` and `plutao dpo` runs, not to a {cls.label} run; "
                         "drop lora.rank")]
            if cfg.lora.rank < 0 or cfg.lora.alpha <= 0:
                return [f"lora.rank must be ≥ 0 and lora.alpha > 0, got {cfg.lora.rank} and {cfg.lora.alpha}"]
            if cfg.model.scan_layers:
                return ["LoRA adapts unrolled blocks; set model.scan_layers=false"]
            if not cfg.train.init_from:
                return [("LoRA adapts a trained model: start from one (`plutao sft BASE_RUN lora.rank=8`, or "
                         "train.init_from=RUN)")]
            try:
                expand_targets(cfg.lora.targets)
            except ValueError as e:
                return [str(e)]
        if cls.decoder_only and cfg.model.family != "decoder":
            return [f"train.task={cls.name} {cls.decoder_only}; model.family={cfg.model.family} is not one"]
        if not cls.scans_layers and (cfg.model.scan_layers or cfg.model.remat != "none"):
            return [(f"model.scan_layers and model.remat apply to model.family=decoder only; drop them for "
                     f"model.family={cfg.model.family}")]
        return []

    @classmethod
    def check_parent(cls, parent_dir, parent: type[Task]) -> None:
        """A one-line UserError when this stage cannot start from a run of kind `parent`."""
        if parent.name not in cls.parents:
            raise UserError(cls.parent_refusal.format(parent=parent_dir, label=parent.label))

    # --- model ----------------------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.cfg.model, rngs)

    def model_slots(self) -> dict[str, ModelSlot]:
        """The models of the training state. One trainable "model" (the default) keeps today's layout;
        several (e.g. policy, reference, value) make `sums` receive {name: module}. With lora.rank > 0
        the model is a frozen, unsaved "base" plus trainable "lora" adapters, which `sums` receives as
        one module (model/lora.py)."""
        if self.cfg.lora.rank:
            return {"base": ModelSlot(self.build_model, trainable=False, saved=False),
                    "lora": ModelSlot(lambda rngs: Adapters(self.cfg.model, self.cfg.lora, rngs))}
        return {"model": ModelSlot(self.build_model)}

    @property
    def served_slot(self) -> tuple[str, str] | None:
        """Where in a checkpoint the served model's parameters are: (part, slot), e.g. ("params",
        "policy"); None = the checkpoint's parameters are the model's."""
        return ("params", self.served) if self.served else None

    def served_task(self) -> Task:
        """The task of the model a run is used through after training (itself, unless `served` names a slot)."""
        return self

    def step_rows(self) -> int:
        """Rows per optimizer step (what must divide over the data-parallel devices)."""
        return self.cfg.train.batch_size

    def updates(self) -> int:
        """Optimizer steps of the whole run (the learning-rate schedule's length)."""
        return self.cfg.train.steps

    def optim_groups(self) -> dict[str, OptimConfig]:
        """Optimizer settings per trainable model ({} = optim.* for all of them)."""
        return {}

    # --- data (host side) -----------------------------------------------------------------------

    def read(self) -> Data:
        raise NotImplementedError

    def batches(self, data: Data, tokenizer: Tokenizer):
        """(batches, one-line summary of the data)."""
        raise NotImplementedError

    def named(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The named arrays of a batch, from the rows the data source drew."""
        raise NotImplementedError

    def row_width(self, context: int) -> int:
        """The width of a full-length row of this task's data source."""
        return context + 1

    # --- objective (inside the jitted step) -----------------------------------------------------

    def sums(self, model, batch: dict, key: Array | None, *, train: bool, constrain=no_constraint) -> dict:
        """{"loss", "count", ...}: summed losses and how many targets they cover, so that micro-batches
        and evaluation batches add up exactly before one division. With train=True dropout uses `key`
        and label smoothing applies; otherwise the loss is plain cross-entropy."""
        raise NotImplementedError

    def cross_entropy(self, logits, targets, weights, *, train: bool) -> dict:
        """{"loss", "count"} and, when smoothing, "nll": the plain cross-entropy beside the smoothed loss."""
        smoothing = self.cfg.optim.label_smoothing if train else 0.0
        loss, count = cross_entropy_sum(logits, targets, weights, label_smoothing=smoothing,
                                        support_V=self.ids.smoothing_support(logits.shape[-1]) if smoothing else None)
        out = {"loss": loss, "count": count}
        if smoothing:
            out["nll"] = cross_entropy_sum(logits, targets, weights)[0]
        return out

    # --- evaluation, samples, inspection --------------------------------------------------------

    def eval_summary(self, sums: dict[str, float]) -> dict:
        """Held-out metrics from the summed evaluation results."""
        count = max(sums["count"], 1.0)
        return {"loss": sums["loss"] / count, "perplexity": math.exp(min(sums["loss"] / count, 50))}

    def val_text(self, val: dict, *, final: bool = False) -> str:
        """The held-out figures of `eval_summary` as the training loop prints them: after "step N: " at
        an evaluation, and in the closing "done: step N, ..." line (final=True). A language model reports
        its loss, and perplexity at the end; a task whose loss is not a per-token likelihood says what
        measures it instead (pairwise accuracy, margins)."""
        text = f"val loss {val['loss']:.4f}"
        return text + (f" (perplexity {math.exp(min(val['loss'], 50)):.2f})" if final else "")

    def val_batches(self, batches, wanted: int) -> int:
        return wanted

    def milestone_sample(self, model, batches, tokenizer: Tokenizer, step: int) -> str:
        raise NotImplementedError

    # The read-only commands that apply to a run of this kind.
    commands: ClassVar[frozenset[str]] = frozenset()

    def check_command(self, command: str, run_dir) -> None:
        """A one-line UserError when `plutao COMMAND` does not apply to this kind of run."""
        if command in self.commands:
            return
        family = self.cfg.model.family
        if not self.trained_by_gradient:
            raise UserError(f"`plutao {command}` needs a neural model; an n-gram model is a count table (`plutao train` "
                            "reports its size)")
        if command == "attention":
            raise UserError(f"model.family={family} has no attention; `plutao attention` needs a Transformer run")
        if command == "translate":
            raise UserError(f"{run_dir} is a model.family={family} run; `plutao translate` needs an encoder_decoder run "
                            "(e.g. `plutao train translate-cpu data.path=pairs.tsv`)")
        if command == "fill-mask":
            raise UserError(f"{run_dir} is a model.family={family} run; fill-mask needs a masked LM "
                            "(model.family=encoder, e.g. the bert-cpu preset)")
        instead = sorted(self.commands & {"fill-mask", "translate"})
        raise UserError(f"{run_dir} is a model.family={family} run; "
                        + (f"use `plutao {instead[0]}` for it" if instead else f"`plutao {command}` does not apply to it"))

    def eval_context(self) -> int:
        """The window `plutao eval` scores a token stream in."""
        return self.cfg.model.context_length

    def eval_stream(self, run, tokens) -> dict:
        """Held-out metrics of a token stream (`plutao eval`)."""
        raise NotImplementedError

    def eval_line(self, r: dict, step: int) -> str:
        """One line of `plutao eval` for the metrics `eval_stream` (or `eval_held_out`) returned."""
        raise NotImplementedError

    def eval_held_out(self, run, data: str | None = None) -> dict:
        """`plutao eval` of a run trained on examples it held some of out (a fine-tuning stage): those
        held-out examples, or every example of `data` (a file of the kind the run trained on), through
        the task's own objective and `eval_summary`, each held-out example once. Adds "data" (what was
        scored), "examples" (how many) and "scored" (the count the metrics divide by)."""
        task = self
        if data:
            settings = dataclasses.replace(self.cfg.data, path=data, val_path=data)
            task = dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, data=settings))
        read = task.read()
        batches, _ = task.batches(read, run.tokenizer)
        sums: dict[str, float] = {}
        for i in range(task.val_batches(batches, 1 << 30)):
            out = run.trainer.eval_step(run.params, batches.sharded_val(i, run.trainer.mesh), np.int32(i))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(to_host(v))
        d = task.cfg.data
        name = data or d.val_path or f"the held-out part of {read.names}"
        return {"data": name, **task.eval_summary(sums), "examples": len(read.payload[1]),
                "scored": int(sums.get("count", 0))}

    def attention_sets(self, model, tokenizer, text: str, target: str | None) -> dict:
        """{name: (per-layer weights (H, T, S), query strings, key strings)} for `plutao attention`."""
        raise NotImplementedError
