"""Preparing a run: validate the config, read the data, load or train the tokenizer, build the mesh,
optimizer and step functions, all before anything is written; and the held-out evaluation and milestone
sample both loops use.

May import everything below it in train/ (config, data, parallel, optim, step, tasks, run).
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from plutao.model.config import ModelConfig
from plutao.model.sampling import to_host
from plutao.tokenizer import Tokenizer, TokenizerError, grown, load_tokenizer, train_tokenizer
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config
from plutao.train.data import sources as data_lib
from plutao.train.data.batches import NamedBatches
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel import sharding
from plutao.train.run.resume import TOKENIZER_KEYS, check_compatible
from plutao.train.run.rundir import existing_run_config, parse_init_from, read_run_config
from plutao.train.step import Trainer
from plutao.train.tasks import Task, task_class, task_for, validate


@dataclasses.dataclass
class Prepared:
    """A run's data, tokenizer and step functions, ready to train or evaluate."""

    cfg: Config
    tokenizer: Tokenizer
    batches: NamedBatches | data_lib.Batches  # named batches (a counted n-gram model: the token splits)
    trainer: Trainer
    data_summary: str
    notes: list[str] = dataclasses.field(default_factory=list)  # one-line facts worth telling at start
    task: Task | None = None
    # data.add_specials grew the tokenizer this run started from: {"fingerprint" (before), "added",
    # "vocab": [before, after]}; None when nothing was added here.
    grown_from: dict | None = None



def provenance(cfg: Config, tokenizer: Tokenizer, mesh) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    versions = {}
    for pkg in ("plutao", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "sentencepiece"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git_commit": commit, "versions": versions, "python": platform.python_version(),
        "command": sys.argv, "tokenizer_fingerprint": tokenizer.fingerprint,
        "devices": f"{jax.device_count()}× {jax.devices()[0].device_kind} ({jax.default_backend()}), "
                   f"{jax.process_count()} process(es)",
        "mesh": dict(mesh.shape) if mesh is not None else None,
    }



def prepare(cfg: Config, run_dir: Path | None, *, devices=None) -> Prepared:
    """Validate the config, load data and tokenizer, build mesh and step functions. Writes nothing."""
    validate(cfg)
    saved = read_run_config(run_dir) if run_dir is not None else None
    if saved is not None:  # early, before data is read; checked again once the vocabulary is known
        check_compatible(saved, cfg, run_dir)
    data = task_class(cfg)(cfg).read()

    tok_dir = run_dir / "tokenizer" if run_dir is not None else None
    try:
        if (tok_dir is None or not tok_dir.is_dir()) and cfg.train.init_from:
            tok_dir = parent_tokenizer_dir(cfg)  # a run started from another speaks its tokenizer
        if tok_dir is not None and tok_dir.is_dir():
            tokenizer = load_tokenizer(tok_dir)
            if saved and saved.get("provenance", {}).get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
                raise UserError(f"{tok_dir} does not match the fingerprint recorded in config.json; "
                                "restore the tokenizer folder or use a new --workdir")
        else:  # never held-out text: what the task says its tokenizer may see
            tokenizer = train_tokenizer(cfg.data.tokenizer, data.tokenizer_texts, cfg.data.vocab_size or None)
        before, tokenizer = tokenizer, grown(tokenizer, cfg.data.add_specials)
    except TokenizerError as e:
        raise UserError(str(e)) from None
    grown_from = None if tokenizer is before else {
        "fingerprint": before.fingerprint, "added": [n for n in tokenizer.specials if n not in before.specials],
        "vocab": [before.vocab_size, tokenizer.vocab_size]}

    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if cfg.data.add_specials:  # (the parent's rows, then the added ones: train/run/lineage.py; or resumed so)
        vocab = max(vocab, tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                        "set model.vocab_size=0 (= the tokenizer's) or larger")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab).resolved())
    if saved is not None:
        check_compatible(saved, cfg, run_dir)

    task = task_for(cfg, tokenizer)
    batches, summary = task.batches(data, tokenizer)
    if not task.trained_by_gradient:  # counted, not trained: no mesh, optimizer or step functions
        return Prepared(cfg, tokenizer, batches, None, summary, task=task, grown_from=grown_from)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_divisibility(cfg.model, mesh, task.step_rows(), cfg.train.grad_accum)
    # The optimizer sees the trainable parameters only (several models: their roles, per-model settings).
    probe = Trainer(cfg.model, None, None, mesh, cfg.train.seed, task=task)
    # (the roles of the parameters the task's model really has: a head it adds has its own)
    tx = make_optimizer(cfg.optim, task.updates(), probe.param_roles(), task.optim_groups())
    trainer = Trainer(cfg.model, tx, lr_schedule(cfg.optim, task.updates()), mesh, cfg.train.seed,
                      cfg.train.grad_accum, task, on_nonfinite=cfg.train.on_nonfinite)
    trainer.split.check()
    notes = [note for note in (trainer.split.note(trainer.moments_per_param), attention_note(cfg.model)) if note]
    return Prepared(cfg, tokenizer, batches, trainer, summary, notes, task, grown_from)


def parent_tokenizer_dir(cfg: Config) -> Path:
    """The tokenizer folder of train.init_from's run, checked against what this config asks for."""
    parent, _ = parse_init_from(cfg.train.init_from)
    saved = existing_run_config(parent)
    for key in TOKENIZER_KEYS:
        old, new = saved.get("data", {}).get(key), getattr(cfg.data, key)
        if old != new:
            raise UserError(f"train.init_from={cfg.train.init_from}: that run was trained with data.{key}={old}, but "
                            f"the config says {new}; set data.{key}={old} (a run started from another uses its tokenizer)")
    return parent / "tokenizer"


def attention_note(model: ModelConfig) -> str | None:
    """Where a fused-attention setting falls back to the explicit softmax(QKᵀ/√d)V path."""
    if model.attention == "naive" or not model.dropout:
        return None
    return (f"model.attention={model.attention}: training steps use the explicit attention path, because "
            f"model.dropout={model.dropout:g} drops attention weights, which the fused kernels do not; evaluation "
            "and sampling use the fused kernel")


def evaluate(p: Prepared, params, n_batches: int) -> dict:
    """Held-out metrics over n batches (the task may cap n: a finite set of pairs is passed over once)."""
    sums: dict[str, float] = {}
    for i in range(p.task.val_batches(p.batches, n_batches)):
        for k, v in p.trainer.eval_step(params, p.batches.sharded_val(i, p.trainer.mesh), np.int32(i)).items():
            sums[k] = sums.get(k, 0.0) + float(to_host(v))
    return p.task.eval_summary(sums)


def milestone_sample(p: Prepared, params, step: int) -> str:
    return p.task.milestone_sample(p.trainer.model(params), p.batches, p.tokenizer, step)



def tokenizer_summary(tok: Tokenizer) -> str:
    return f"{tok.kind} tokenizer with {tok.vocab_size} ids"
