"""Resuming a run: what may change between invocations, the stop flag, the run lock, and restoring the
newest readable checkpoint. Shared by the supervised loop (train/loop.py) and the RL loop (train/rl/loop.py).

May import: config/, parallel/, run/ (rundir, lock, checkpoint). Never step, tasks or rl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax

from plutao.model.config import ModelConfig
from plutao.train.config.errors import UserError
from plutao.train.config.schema import SECTIONS, Config, flatten
from plutao.train.parallel.distributed import any_process, is_main_process, log
from plutao.train.run.checkpoint import Checkpoints
from plutao.train.run.lock import RunLock

if TYPE_CHECKING:  # (an annotation only: step.py sits above run/ in the import order)
    from plutao.train.step import Trainer

# Keys that must agree between a run directory and a config resuming it.
TOKENIZER_KEYS = ("tokenizer", "vocab_size")
# Keys a resumed run may change freely: how long it runs, how often it logs, evaluates, samples and
# saves, and how it is laid out on devices. Any other difference makes it a different experiment
# (refused unless named with --allow-changed).
RUN_CONTROL = frozenset({
    "train.steps", "train.eval_every", "train.eval_batches", "train.sample_every", "train.sample_tokens",
    "train.sample_prompt", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.max_seconds", "train.stop_at_step", "train.peak_flops", "train.on_nonfinite", "train.grad_accum",
    "train.steps_per_dispatch",
    "data.cache_dir", "model.remat", "model.attention", "mesh.data", "mesh.fsdp", "mesh.tensor",
})



def check_compatible(saved: dict, cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run whose model or tokenizer differs from this config."""
    for key in TOKENIZER_KEYS:
        old, new = saved["data"].get(key), getattr(cfg.data, key)
        if old != new:
            raise UserError(f"{run_dir} was trained with data.{key}={old}, but the config says {new}; "
                            f"set data.{key}={old} to resume, or use a new --workdir")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    old_model = dataclasses.asdict(ModelConfig(**{k: v for k, v in saved["model"].items() if k in known}).resolved())
    for key, new in dataclasses.asdict(cfg.model.resolved()).items():
        if key == "vocab_size" and (new == 0 or (cfg.data.add_specials and new < old_model.get(key, 0))):
            continue  # (not known yet: the tokenizer's, or the parent's grown by data.add_specials)
        if key in ("dropout", "dtype", "remat", "attention"):  # these change computation, not the parameters
            continue
        if old_model[key] != new:
            raise UserError(f"the checkpoint in {run_dir} has model.{key}={old_model.get(key)}, but the config says "
                            f"{new}; set model.{key}={old_model.get(key)} to resume, or use a new --workdir")


def experiment_changes(saved: dict, cfg: Config) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every experiment-defining key that differs (keys a run
    directory from an older version does not record are taken to be unchanged; the world.* keys of a
    run that reads no builtin:arith data define nothing)."""
    old = flatten({k: v for k, v in saved.items() if k in SECTIONS})
    paths = [cfg.data.path] if isinstance(cfg.data.path, str) else list(cfg.data.path)
    world_used = any(str(p).startswith("builtin:arith") for p in paths)
    return {k: (old[k], v) for k, v in flatten(cfg.to_dict()).items()
            if k in old and k not in RUN_CONTROL and old[k] != v and (world_used or not k.startswith("world."))}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def legacy_train_seconds(run_dir: Path, step: int) -> float:
    """Training seconds recorded by older versions beside (not inside) the checkpoint of `step`."""
    path = run_dir / "train_seconds.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return 0.0
    return float(record.get("seconds", 0.0)) if step and record.get("step") == step else 0.0


def last_checkpoint_text(checkpoints: Checkpoints) -> str:
    steps = checkpoints.steps_saved_or_saving()
    return (f"the last checkpoint is {checkpoints.directory / str(steps[-1])}" if steps
            else "no checkpoint was saved yet")



class Stopped(KeyboardInterrupt):
    """A second signal while a loop was already stopping: stop now (exit 128 + `signal`)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signal = int(signum)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step in flight, saves and exits, its summary saying
    which signal stopped it ("signal": the commands exit 130 for SIGINT, 143 for SIGTERM; reaching
    train.stop_at_step also ends a loop early, but is no signal: exit 0)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, as the signal would without the loop
            previous = self._previous.get(signum)
            if callable(previous) and previous is not signal.default_int_handler:
                previous(signum, frame)  # (the `plutao` entry point's: one line and exit 128 + signum)
            raise Stopped(signum)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, step: int, every: int, out_of_time: bool = False) -> bool:
        """Whether to stop before `step + 1` (on a signal, or when this process's time budget is spent).
        With several processes all must stop at the same step, so the flags are compared (one small
        collective) every `every` steps only."""
        if jax.process_count() == 1:
            return self.signal is not None or out_of_time
        return step % every == 0 and any_process(self.signal is not None or out_of_time)


@contextlib.contextmanager
def holding(run_dir: Path):
    """Hold RUN_DIR/train.lock for a training (process 0 takes it; every process agrees on the outcome)."""
    lock = RunLock(run_dir, log) if is_main_process() else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            error = e
    if jax.process_count() > 1 and any_process(error is not None) and error is None:
        error = UserError(f"{run_dir} is in use by another training (process 0 says by whom)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def resume(trainer: Trainer, checkpoints: Checkpoints, saved: dict | None, cfg: Config, run_dir: Path,
           allow_changed: tuple[str, ...]) -> tuple[int, dict, dict, dict | None]:
    """(step, state, checkpoint metadata, history entry) from the newest readable checkpoint of a run
    being resumed: an experiment-defining change not named in `allow_changed` is refused, unreadable
    checkpoints are set aside (every process agreeing), and an allowed change is recorded."""
    changes = experiment_changes(saved, cfg) if saved else {}
    refused = sorted(set(changes) - set(allow_changed))
    if refused:
        listed = ", ".join(f"{k} {_short(changes[k][0])} → {_short(changes[k][1])}" for k in refused)
        raise UserError(f"{run_dir} was trained as a different experiment ({listed}); resume it with its own "
                        f"settings, use another --workdir, or pass --allow-changed {' '.join(refused)} to "
                        "continue it with the change recorded in config.json")
    agree = any_process if jax.process_count() > 1 else (lambda failed: failed)
    latest, restored, unreadable = checkpoints.restore_newest(trainer.checkpoint_target(), agree)
    for bad_step, reason in unreadable:
        moved = checkpoints.set_aside(bad_step) if is_main_process() else None
        log(f"checkpoint {bad_step} cannot be read ({reason}); kept as {moved}, resuming from checkpoint {latest}")
    if unreadable and jax.process_count() > 1:
        any_process(False)  # (a barrier: the moves are done before anyone looks again)
        checkpoints.manager.reload()
    meta = checkpoints.metadata(latest)
    state = trainer.resumed_state(restored, int(meta.get("nonfinite_steps", 0)))
    log(f"resumed from {run_dir}/checkpoints/{latest}")
    history_entry = None
    if changes:
        history_entry = {"step": latest, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": sys.argv,
                         "changes": {k: list(v) for k, v in changes.items()}}
    return latest, state, meta, history_entry

