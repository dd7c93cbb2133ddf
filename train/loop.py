"""`plutao train`: config → data → mesh and state → (resume) → steps with eval, samples, checkpoints.

Everything that can fail on bad input (config, data, tokenizer, checkpoint compatibility) is checked
before anything is written to the run directory, so a failed start never damages an existing run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from plutao.model.config import ModelConfig
from plutao.model.presets import count_params, flops_per_token
from plutao.model.sampling import to_host
from plutao.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer
from plutao.tokenizer.chat import template_hash
from plutao.train import data as data_lib
from plutao.train import sharding
from plutao.train.batches import NamedBatches
from plutao.train.checkpoint import Checkpoints
from plutao.train.config import SECTIONS, Config, all_keys, flatten, validate
from plutao.train.distributed import any_process
from plutao.train.errors import NonFiniteError, UserError
from plutao.train.lock import RunLock
from plutao.train.metrics import MetricsLog, device_peak_flops, plot_losses
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.run import init_from_parent, lora_base, merge_params
from plutao.train.rundir import existing_run_config, parse_init_from, read_run_config
from plutao.train.step import Trainer
from plutao.train.tasks import Task, task_class, task_for

# Keys that must agree between a run directory and a config resuming it.
TOKENIZER_KEYS = ("tokenizer", "vocab_size")
# Keys a resumed run may change freely: how long it runs, how often it logs, evaluates, samples and
# saves, and how it is laid out on devices. Any other difference makes it a different experiment
# (refused unless named with --allow-changed).
RUN_CONTROL = frozenset({
    "train.steps", "train.eval_every", "train.eval_batches", "train.sample_every", "train.sample_tokens",
    "train.sample_prompt", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.max_seconds", "train.stop_at_step", "train.peak_flops", "train.on_nonfinite", "train.grad_accum",
    "data.cache_dir", "model.remat", "model.attention", "mesh.data", "mesh.fsdp", "mesh.tensor",
})


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


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    if is_main_process():
        tqdm.write(msg, file=sys.stderr)


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


def check_compatible(saved: dict, cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run whose model or tokenizer differs from this config."""
    for key in TOKENIZER_KEYS:
        old, new = saved["data"].get(key), getattr(cfg.data, key)
        if old != new:
            raise UserError(f"{run_dir} was trained with data.{key}={old}, but the config says {new}; "
                            f"set data.{key}={old} to resume, or use a new --workdir")
    old_model = saved["model"]
    for key, new in dataclasses.asdict(cfg.model.resolved()).items():
        if key == "vocab_size" and new == 0:
            continue
        if key in ("dropout", "dtype", "remat", "attention"):  # these change computation, not the parameters
            continue
        if old_model.get(key, getattr(ModelConfig(), key)) != new:
            raise UserError(f"the checkpoint in {run_dir} has model.{key}={old_model.get(key)}, but the config says "
                            f"{new}; set model.{key}={old_model.get(key)} to resume, or use a new --workdir")


def experiment_changes(saved: dict, cfg: Config) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every experiment-defining key that differs (keys a run
    directory from an older version does not record are taken to be unchanged)."""
    old = flatten({k: v for k, v in saved.items() if k in SECTIONS})
    return {k: (old[k], v) for k, v in flatten(cfg.to_dict()).items()
            if k in old and k not in RUN_CONTROL and old[k] != v}


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
    except TokenizerError as e:
        raise UserError(str(e)) from None

    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                        "set model.vocab_size=0 (= the tokenizer's) or larger")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab).resolved())
    if saved is not None:
        check_compatible(saved, cfg, run_dir)

    task = task_for(cfg, tokenizer)
    batches, summary = task.batches(data, tokenizer)
    if not task.trained_by_gradient:  # counted, not trained: no mesh, optimizer or step functions
        return Prepared(cfg, tokenizer, batches, None, summary, task=task)
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
    return Prepared(cfg, tokenizer, batches, trainer, summary, notes, task)


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


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step in flight, saves and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
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


def train(cfg: Config, run_dir: Path, *, devices=None, quiet: bool = False,
          allow_changed: tuple[str, ...] = ()) -> dict:
    """Train (or resume) the run in run_dir; returns a summary dict.

    `allow_changed` names experiment-defining keys whose change against the run's config.json is
    accepted (and recorded in its history) when resuming."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--workdir {run_dir} is a file; give a directory (new or an earlier run's)")
    validate(cfg)
    for key in allow_changed:
        if key not in all_keys():
            raise UserError(f"--allow-changed {key}: unknown config key" + (
                f"; did you mean {close[0]}?" if (close := difflib.get_close_matches(key, all_keys(), n=1)) else ""))
    with holding(run_dir):
        return _train(cfg, run_dir, devices, quiet, tuple(allow_changed))


def _train(cfg: Config, run_dir: Path, devices, quiet: bool, allow_changed: tuple[str, ...]) -> dict:
    p = prepare(cfg, run_dir, devices=devices)
    cfg, trainer = p.cfg, p.trainer
    main = is_main_process()
    saved = read_run_config(run_dir)

    lineage = None  # (set when this run starts from another: train.init_from)

    def write_run_files(history_entry: dict | None = None, new_lineage: dict | None = None):
        nonlocal lineage
        lineage = new_lineage or lineage
        if not main:
            return
        if not (run_dir / "tokenizer").is_dir():
            # Written aside and renamed: other processes may be looking for it at the same time.
            staging = run_dir / f"tokenizer.tmp-{os.getpid()}"
            p.tokenizer.save(staging)
            staging.rename(run_dir / "tokenizer")
        history = (saved or {}).get("history", []) + ([history_entry] if history_entry else [])
        record = cfg.to_dict() | {"provenance": provenance(cfg, p.tokenizer, trainer.mesh if trainer else None)}
        if lineage or (saved or {}).get("lineage"):
            record["lineage"] = lineage or saved["lineage"]
        if history:
            record["history"] = history
        tmp = run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(run_dir / "config.json")

    if not p.task.trained_by_gradient:
        from plutao.train.ngram_run import train_ngram

        run_dir.mkdir(parents=True, exist_ok=True)
        return train_ngram(p, run_dir, write_run_files, log)
    recorded = (saved or {}).get("lineage", {}).get("template_hash")
    if p.task.chat and recorded not in (None, template_hash(p.tokenizer)):
        raise UserError(f"{run_dir} was trained with another chat template (hash {recorded}); resume it with the "
                        "version of plutao that made it, or use a new --workdir")
    if p.task.rollouts:  # (learns from its own samples: train/rl_loop.py)
        from plutao.train.rl_loop import train_rl

        return train_rl(p, run_dir, saved, write_run_files, quiet, allow_changed)
    # Restore before writing anything: a checkpoint that does not fit this config fails here,
    # leaving config.json and the checkpoints as they were.
    own = run_dir / "checkpoints"
    parent_params = None
    if cfg.train.init_from and not (own.is_dir() and any(d.name.isdigit() for d in own.iterdir())):
        # Read (and refused, if it does not fit) before anything is created in the run directory.
        abstract = trainer.abstract_sharded_state()  # (a LoRA run's parent fills its frozen base)
        parent_params, lineage = init_from_parent(abstract["frozen"]["base"] if trainer.adapted else abstract["params"],
                                                  cfg.train.init_from, p.tokenizer.fingerprint, cfg.model)
        if p.task.chat:  # (what the chat tokens of this run mean: the template and the ids it uses)
            lineage["template_hash"] = template_hash(p.tokenizer)
    checkpoints = Checkpoints(own, keep=cfg.train.keep_checkpoints)
    meta: dict = {}
    history_entry = None
    if checkpoints.all_steps():
        _, state, meta, history_entry = resume(trainer, checkpoints, saved, cfg, run_dir, allow_changed)
        if trainer.adapted:
            state["frozen"] = {"base": lora_base(trainer, (saved or {}).get("lineage", {}), p.tokenizer.fingerprint,
                                                 cfg.model)}
    else:
        state = trainer.init_state()
        if parent_params is not None and trainer.adapted:
            state["frozen"]["base"] = merge_params(state["frozen"]["base"], parent_params)
        elif parent_params is not None:
            state["params"] = merge_params(state["params"], parent_params)
            fresh = f"; initialised fresh: {', '.join(lineage['fresh'])}" if lineage["fresh"] else ""
            log(f"started from {lineage['parent']} step {lineage['step']}: {lineage['restored']} parameter arrays "
                f"copied{fresh}")
    write_run_files(history_entry)
    start = int(to_host(state["step"]))
    n_params = count_params(cfg.model)
    flops_per_tok = flops_per_token(cfg.model)
    peak, peak_source = (cfg.train.peak_flops, "train.peak_flops") if cfg.train.peak_flops else device_peak_flops(
        np.dtype(cfg.model.dtype))
    log(f"plutao: {n_params['total'] / 1e6:.2f}M parameters ({n_params['non_embedding'] / 1e6:.2f}M non-embedding), "
        f"{tokenizer_summary(p.tokenizer)}, {p.data_summary}, "
        f"mesh {dict(trainer.mesh.shape)}, steps {start}→{cfg.train.steps}; MFU against {peak_source}")
    for note in p.notes:
        log(note)

    metrics = MetricsLog(run_dir, enabled=main, start_step=start)
    t = cfg.train
    skip = t.on_nonfinite == "skip"
    last_val = None
    history = []
    compile_s = None
    step_metrics = None
    try:
        with StopFlag() as stop, tqdm(total=t.steps, initial=start, disable=quiet or not main or start >= t.steps,
                                      unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
            window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
            steps_seconds, first_step_unix = 0.0, None
            step = start
            last_step = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
            if last_step <= start < t.steps:
                log(f"{run_dir} is already at step {start} ≥ train.stop_at_step={t.stop_at_step}; nothing to do")
                return {"interrupted": True, "step": start, "run_dir": str(run_dir)}
            budget_start = time.perf_counter()
            # Training time accumulates across invocations (kept in each checkpoint's metadata), so a
            # time budget covers the whole run however often it was interrupted and resumed.
            spent_before = float(meta.get("train_seconds", legacy_train_seconds(run_dir, start)))

            def spent() -> float:
                return spent_before + time.perf_counter() - budget_start

            def out_of_time():
                return bool(t.max_seconds) and spent() >= t.max_seconds

            def check_finite(at_step: int) -> None:
                """Stop (train.on_nonfinite=stop) once a step was non-finite; a sync only where one happens anyway."""
                if step_metrics is None:
                    return
                first = int(to_host(step_metrics["first_nonfinite"]))
                if first and not skip:
                    raise NonFiniteError(
                        f"the loss or gradient norm became NaN/inf at step {first}; stopped at step {at_step} without "
                        f"saving that state ({last_checkpoint_text(checkpoints)}); lower optim.lr or clip harder (optim.grad_clip), "
                        "or resume with train.on_nonfinite=skip to skip such steps")

            def save(at_step, val=None):
                check_finite(at_step)
                if not bool(to_host(trainer.params_finite(state["params"]))):
                    raise NonFiniteError(f"the parameters are NaN/inf at step {at_step}; not saving them "
                                         f"({last_checkpoint_text(checkpoints)}); lower optim.lr or clip harder (optim.grad_clip)")
                good_val = val if val is not None and math.isfinite(val) else None
                nonfinite = int(to_host(state["health"]["nonfinite_steps"]))
                checkpoints.save(at_step, {k: state[k] for k in trainer.checkpointed},
                                 {"val_loss": good_val, "train_seconds": spent(), "nonfinite_steps": nonfinite})

            while step < last_step and not stop.agreed(step, t.log_every, out_of_time()):
                batch = p.batches.sharded_train(step, trainer.mesh)
                window_tokens += p.batches.tokens_per_step(step)
                t0 = time.perf_counter()
                state, step_metrics = trainer.train_step(state, batch)
                step += 1
                window_steps += 1
                if compile_s is None:
                    jax.block_until_ready(step_metrics)
                    compile_s = time.perf_counter() - t0
                    first_step_unix = time.time()
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                if step % t.log_every == 0 or step == t.steps:
                    check_finite(step)
                    m = {k: float(to_host(v)) for k, v in step_metrics.items()}
                    m.pop("first_nonfinite")
                    skipped = m.pop("nonfinite_steps")
                    m |= {"step": step, "split": "train", "perplexity": math.exp(min(m["loss"], 50))}
                    if skip:
                        m["skipped_steps"] = int(skipped)
                    if window_steps:  # (the first step's window is its compilation)
                        steps_seconds += time.perf_counter() - window_start
                        tps = window_tokens / (time.perf_counter() - window_start)
                        m |= {"tokens_per_sec": tps, "mfu": tps * flops_per_tok / peak}
                    metrics.write(m)
                    history.append(m)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m.get('tokens_per_sec', 0):,.0f}", refresh=False)
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                bar.update(1)
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    check_finite(step)
                    val = evaluate(p, trainer.inference_params(state), t.eval_batches)
                    last_val = val["loss"]
                    metrics.write({"step": step, "split": "val", **val})
                    log(f"step {step}: val loss {last_val:.4f}" + (f", masked-token accuracy {val['accuracy']:.3f}"
                                                                   if "accuracy" in val else "")
                        + (f", pairwise accuracy {val['pairwise_accuracy']:.3f}" if "pairwise_accuracy" in val else ""))
                if t.sample_every and step % t.sample_every == 0:  # every process takes part; one prints
                    check_finite(step)
                    sample = milestone_sample(p, trainer.inference_params(state), step)
                    metrics.write({"step": step, "sample": sample})
                    log(f"--- sample at step {step} ---\n{sample}\n---")
                if step % t.checkpoint_every == 0 and step < t.steps:
                    save(step, last_val if t.eval_every and step % t.eval_every == 0 else None)
                if window_steps == 0:
                    window_start, window_tokens = time.perf_counter(), 0
            check_finite(step)

            # A spent time budget ends the run like its last step (final evaluation and checkpoint);
            # a signal or stop_at_step leaves it resumable.
            def everywhere(flag: bool) -> bool:  # the same answer on every process
                return any_process(flag) if jax.process_count() > 1 else flag

            budget_spent = (step < last_step and everywhere(out_of_time())
                            and not everywhere(stop.signal is not None))
            if budget_spent:
                log(f"train.max_seconds={t.max_seconds:g} reached at step {step}; finishing the run here")
            interrupted = step < t.steps and not budget_spent
            if interrupted:
                save(step)
                checkpoints.close()
                why = f"stopped by signal {stop.signal}" if stop.signal is not None else "reached train.stop_at_step"
                log(f"{why} at step {step}; checkpoint saved in {run_dir}/checkpoints/{step}. "
                    "Run the same command again to resume.")
                if main:
                    plot_losses(run_dir)
                return {"interrupted": True, "step": step, "run_dir": str(run_dir)}
            # Still under StopFlag: a signal now cannot cut the final evaluation and save short.
            final = evaluate(p, trainer.inference_params(state), t.eval_batches)
            final_val = final["loss"]
            sample = None
            epochs = p.batches.epochs_consumed(step)
            if step > start:  # (re-running a finished run only reports; it appends nothing)
                metrics.write({"step": step, "split": "val", **final})
                save(step, final_val)
                if t.sample_every and step % t.sample_every:  # (else the milestone sample just shown)
                    sample = milestone_sample(p, trainer.inference_params(state), step)
                    metrics.write({"step": step, "sample": sample})
                metrics.write({"step": step, "epochs": epochs})
            else:
                log(f"{run_dir} is already trained to step {step} (train.steps={t.steps}); raise train.steps to "
                    "continue (the learning-rate schedule is then recomputed for the new length)")
            checkpoints.close()
    except NonFiniteError:
        checkpoints.close()  # the saves before this point complete
        raise
    finally:
        metrics.close()
    plot = plot_losses(run_dir) if main else None
    summary = {
        "step": step, "val_loss": final_val, "val_perplexity": math.exp(min(final_val, 50)),
        "train_loss": history[-1]["loss"] if history else None,
        "tokens_per_sec": float(np.median([h["tokens_per_sec"] for h in history if "tokens_per_sec" in h] or [0.0])),
        "compile_seconds": compile_s, "params": n_params["total"], "epochs": epochs,
        **({"val_accuracy": final["accuracy"]} if "accuracy" in final else {}),
        **({"val_pairwise_accuracy": final["pairwise_accuracy"]} if "pairwise_accuracy" in final else {}),
        "budget_spent": budget_spent, "train_seconds": spent(),
        # Time inside training steps (after the first, compiling one), and when the first step ended.
        "steps_seconds": steps_seconds, "first_step_unix": first_step_unix,
        "run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / str(step)),
        "plot": str(plot) if plot else None,
    }
    if sample is not None:
        log(f"--- final sample ---\n{sample}\n---")
    epochs_text = ", ".join(f"{name}: {e:.2f}" for name, e in epochs.items())
    log(f"done: step {step}, val loss {final_val:.4f} (perplexity {summary['val_perplexity']:.2f}); "
        f"epochs consumed {epochs_text}\n  checkpoint: {summary['checkpoint']}\n  metrics and samples: "
        f"{run_dir / 'metrics.jsonl'}\n  plot: {plot}")
    return summary


def tokenizer_summary(tok: Tokenizer) -> str:
    return f"{tok.kind} tokenizer with {tok.vocab_size} ids"
