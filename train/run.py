"""Open a finished (or running) run directory: its config, tokenizer and trained parameters."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from plutao.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from plutao.train import sharding
from plutao.train.checkpoint import Checkpoints, Unreadable
from plutao.train.config import Config
from plutao.train.errors import UserError
from plutao.train.loop import existing_run_config, objective_for
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.step import Trainer


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    tokenizer: Tokenizer
    trainer: Trainer
    params: dict
    step: int

    @property
    def model(self):
        return self.trainer.model(self.params)


def load_run(run_dir: Path, step: int | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    saved = existing_run_config(run_dir)
    cfg = Config.from_dict(saved)
    if cfg.model.family == "ngram":
        raise UserError(f"{run_dir} is an n-gram run (a count table, no neural checkpoint); use `plutao eval` or "
                        "`plutao sample` with it")
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    except TokenizerError as e:
        raise UserError(str(e)) from None
    fingerprint = saved.get("provenance", {}).get("tokenizer_fingerprint")
    if fingerprint not in (None, tokenizer.fingerprint):
        raise UserError(f"{run_dir / 'tokenizer'} does not match the tokenizer this run was trained with; restore it")
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"{run_dir}: model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} ids; the run directory is inconsistent")
    mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))
    trainer = Trainer(cfg.model, make_optimizer(cfg.optim, cfg.train.steps, cfg.model),
                      lr_schedule(cfg.optim, cfg.train.steps), mesh, cfg.train.seed, objective=objective_for(cfg, tokenizer))
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir} has no checkpoint yet; train it first (`plutao train --workdir {run_dir}`)")
    checkpoints = Checkpoints(run_dir / "checkpoints", async_save=False, read_only=True)
    steps = checkpoints.all_steps()
    if not steps:
        raise UserError(f"{run_dir} has no checkpoint yet; train it first (`plutao train --workdir {run_dir}`)")
    if step is None:  # the newest that can be read (an unreadable one is reported, and left as it is)
        step, state, unreadable = checkpoints.restore_newest(trainer.checkpoint_target())
        for bad, reason in unreadable:
            print(f"plutao: checkpoint {bad} of {run_dir} cannot be read ({reason}); using checkpoint {step}",
                  file=sys.stderr)
    elif step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; available: {', '.join(map(str, sorted(steps)))}")
    else:
        try:
            state = checkpoints.restore(step, trainer.checkpoint_target())
        except Unreadable as e:
            raise UserError(f"checkpoint {step} of {run_dir} cannot be read ({e}); leave out --step to use the "
                            "newest readable one") from None
    checkpoints.close()
    return LoadedRun(run_dir, cfg, tokenizer, trainer, state["params"], step)
