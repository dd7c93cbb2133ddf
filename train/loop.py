"""`plutao train`: config → data → mesh and state → (resume) → steps with eval, samples, checkpoints.

Everything that can fail on bad input (config, data, tokenizer, checkpoint compatibility) is checked
before anything is written to the run directory, so a failed start never damages an existing run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
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
from flax import nnx
from tqdm import tqdm

from plutao.model.config import ModelConfig
from plutao.model.presets import count_params, flops_per_token
from plutao.model.sampling import SamplingConfig, generate, to_host
from plutao.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer
from plutao.tokenizer.base import NUM_SPECIAL
from plutao.train import data as data_lib
from plutao.train import sharding
from plutao.train.checkpoint import Checkpoints
from plutao.train.config import SECTIONS, Config, all_keys, flatten, validate
from plutao.train.distributed import any_process
from plutao.train.errors import NonFiniteError, UserError
from plutao.train.lock import RunLock
from plutao.train.metrics import MetricsLog, device_peak_flops, plot_losses
from plutao.train.objectives import Objective
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.pairs import PairBatches, encode_pairs, held_out, pack, read_pairs
from plutao.train.step import CHECKPOINTED, Trainer, sharded_batch

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
    batches: data_lib.Batches | PairBatches
    trainer: Trainer
    data_summary: str
    notes: list[str] = dataclasses.field(default_factory=list)  # one-line facts worth telling at start


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


def read_run_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; restore it or choose another --workdir") from None


def existing_run_config(run_dir: Path) -> dict:
    """The saved config of a run that read-only commands open, or one line on what RUN_DIR is instead."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if saved is not None:
        return saved
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; pass the --workdir of a `plutao train` run")
    raise UserError(f"{run_dir} is not a run directory (no config.json); pass the --workdir of a `plutao train` run")


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
    sources = data_lib.source_paths(cfg.data)
    translation = cfg.model.family == "encoder_decoder"
    if translation:  # one shared vocabulary is trained on both sides of the training pairs
        pairs = [pair for s in sources for pair in read_pairs(s)]
        if cfg.data.val_path:
            train_pairs, val_pairs = pairs, read_pairs(cfg.data.val_path, flag="data.val_path")
        else:
            val = [held_out(pair, cfg.data.val_fraction) for pair in pairs]
            train_pairs = [q for q, v in zip(pairs, val) if not v]
            val_pairs = [q for q, v in zip(pairs, val) if v]
        val_pairs = list(dict.fromkeys(val_pairs))  # each held-out pair is scored once
        docs_per_source = [[text for pair in train_pairs for text in pair]]
    else:
        docs_per_source = [data_lib.read_documents(s, cfg.data) for s in sources]

    tok_dir = run_dir / "tokenizer" if run_dir is not None else None
    try:
        if tok_dir is not None and tok_dir.is_dir():
            tokenizer = load_tokenizer(tok_dir)
            if saved and saved.get("provenance", {}).get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
                raise UserError(f"{tok_dir} does not match the fingerprint recorded in config.json; "
                                "restore the tokenizer folder or use a new --workdir")
        else:
            # Never held-out text: the training pairs, or each source's training part.
            texts = iter(docs_per_source[0]) if translation else data_lib.training_texts(cfg.data, docs_per_source)
            tokenizer = train_tokenizer(cfg.data.tokenizer, texts, cfg.data.vocab_size or None)
    except TokenizerError as e:
        raise UserError(str(e)) from None

    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                        "set model.vocab_size=0 (= the tokenizer's) or larger")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab).resolved())
    if saved is not None:
        check_compatible(saved, cfg, run_dir)

    if translation:
        batches = PairBatches(encode_pairs(train_pairs, tokenizer), encode_pairs(val_pairs, tokenizer, unseen=True),
                              cfg.model.context_length, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_id,
                              ",".join(sources))
        summary = (f"{len(batches.train):,} training and {len(batches.val):,} held-out pairs"
                   + (f" ({batches.dropped:,} longer than the context left out)" if batches.dropped else ""))
    else:
        splits = data_lib.load_splits(cfg.data, docs_per_source, tokenizer)
        batches = data_lib.Batches(splits, cfg.data.weights, cfg.model.context_length, cfg.train.batch_size,
                                   cfg.train.seed)
        summary = f"{sum(len(s.train) for s in splits):,} training tokens"
    if cfg.model.family == "ngram":  # counted, not trained: no mesh, optimizer or step functions
        return Prepared(cfg, tokenizer, batches, None, summary)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_divisibility(cfg.model, mesh, cfg.train.batch_size, cfg.train.grad_accum)
    tx = make_optimizer(cfg.optim, cfg.train.steps, cfg.model)
    trainer = Trainer(cfg.model, tx, lr_schedule(cfg.optim, cfg.train.steps), mesh, cfg.train.seed,
                      cfg.train.grad_accum, objective_for(cfg, tokenizer), on_nonfinite=cfg.train.on_nonfinite)
    trainer.split.check()
    notes = [note for note in (trainer.split.note(trainer.moments_per_param), attention_note(cfg.model)) if note]
    return Prepared(cfg, tokenizer, batches, trainer, summary, notes)


def attention_note(model: ModelConfig) -> str | None:
    """Where a fused-attention setting falls back to the explicit softmax(QKᵀ/√d)V path."""
    if model.attention == "naive" or not model.dropout:
        return None
    return (f"model.attention={model.attention}: training steps use the explicit attention path, because "
            f"model.dropout={model.dropout:g} drops attention weights, which the fused kernels do not; evaluation "
            "and sampling use the fused kernel")


def objective_for(cfg: Config, tokenizer: Tokenizer) -> Objective:
    return Objective(cfg.model.family, cfg.optim.label_smoothing, pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id,
                     first_regular_id=NUM_SPECIAL, vocab_limit=tokenizer.vocab_size, mask_rate=cfg.train.mask_rate,
                     target_specials=(tokenizer.eot_id, tokenizer.eos_id, tokenizer.unk_id))


def evaluate(p: Prepared, params, n_batches: int) -> dict:
    """Held-out loss over n batches (and masked-token accuracy for the masked LM). Translation pairs are
    a finite set: at most one pass over them, each pair counted once."""
    sums: dict[str, float] = {}
    n_batches = min(n_batches, getattr(p.batches, "val_batches", lambda: n_batches)())
    for i in range(n_batches):
        batch = sharded_batch(functools.partial(p.batches.val_rows, i), p.batches.val_shape(i), p.trainer.mesh)
        for k, v in p.trainer.eval_step(params, batch, np.int32(i)).items():
            sums[k] = sums.get(k, 0.0) + float(to_host(v))
    count = max(sums["count"], 1.0)
    out = {"loss": sums["loss"] / count, "perplexity": math.exp(min(sums["loss"] / count, 50))}
    if "correct" in sums:
        out["accuracy"] = sums["correct"] / count
    return out


def milestone_sample(p: Prepared, params, step: int) -> str:
    family = p.cfg.model.family
    if family == "encoder_decoder":
        return translation_sample(p, params)
    if family == "encoder":
        return fill_mask_sample(p, params)
    prompt = [p.tokenizer.eot_id] + p.tokenizer.encode(p.cfg.train.sample_prompt)
    model = p.trainer.model(params)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=p.cfg.train.sample_tokens,
                              seed=p.cfg.train.seed * 1_000_003 + step, stop_at_eot=False)
    ids = generate(model, [prompt[-p.cfg.model.context_length:]], sampling, eot_id=p.tokenizer.eot_id,
                   pad_id=p.tokenizer.pad_id)[0]
    return p.cfg.train.sample_prompt + p.tokenizer.decode(ids)


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

    def write_run_files(history_entry: dict | None = None):
        if not main:
            return
        if not (run_dir / "tokenizer").is_dir():
            # Written aside and renamed: other processes may be looking for it at the same time.
            staging = run_dir / f"tokenizer.tmp-{os.getpid()}"
            p.tokenizer.save(staging)
            staging.rename(run_dir / "tokenizer")
        history = (saved or {}).get("history", []) + ([history_entry] if history_entry else [])
        record = cfg.to_dict() | {"provenance": provenance(cfg, p.tokenizer, trainer.mesh if trainer else None)}
        if history:
            record["history"] = history
        tmp = run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(run_dir / "config.json")

    if cfg.model.family == "ngram":
        from plutao.train.ngram_run import train_ngram

        run_dir.mkdir(parents=True, exist_ok=True)
        return train_ngram(p, run_dir, write_run_files, log)
    # Restore before writing anything: a checkpoint that does not fit this config fails here,
    # leaving config.json and the checkpoints as they were.
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    meta: dict = {}
    history_entry = None
    if checkpoints.all_steps():
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
            moved = checkpoints.set_aside(bad_step) if main else None
            log(f"checkpoint {bad_step} cannot be read ({reason}); kept as {moved}, resuming from checkpoint {latest}")
        if unreadable and jax.process_count() > 1:
            any_process(False)  # (a barrier: the moves are done before anyone looks again)
            checkpoints.manager.reload()
        meta = checkpoints.metadata(latest)
        state = trainer.resumed_state(restored, int(meta.get("nonfinite_steps", 0)))
        log(f"resumed from {run_dir}/checkpoints/{latest}")
        if changes:
            history_entry = {"step": latest, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": sys.argv,
                             "changes": {k: list(v) for k, v in changes.items()}}
    else:
        state = trainer.init_state()
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
                checkpoints.save(at_step, {k: state[k] for k in CHECKPOINTED},
                                 {"val_loss": good_val, "train_seconds": spent(), "nonfinite_steps": nonfinite})

            while step < last_step and not stop.agreed(step, t.log_every, out_of_time()):
                tokens = sharded_batch(functools.partial(p.batches.train_rows, step), p.batches.train_shape(step),
                                       trainer.mesh)
                window_tokens += p.batches.tokens_per_step(step)
                t0 = time.perf_counter()
                state, step_metrics = trainer.train_step(state, tokens)
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
                    val = evaluate(p, state["params"], t.eval_batches)
                    last_val = val["loss"]
                    metrics.write({"step": step, "split": "val", **val})
                    log(f"step {step}: val loss {last_val:.4f}" + (f", masked-token accuracy {val['accuracy']:.3f}"
                                                                   if "accuracy" in val else ""))
                if t.sample_every and step % t.sample_every == 0:  # every process takes part; one prints
                    check_finite(step)
                    sample = milestone_sample(p, state["params"], step)
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
            final = evaluate(p, state["params"], t.eval_batches)
            final_val = final["loss"]
            sample = None
            epochs = p.batches.epochs_consumed(step)
            if step > start:  # (re-running a finished run only reports; it appends nothing)
                metrics.write({"step": step, "split": "val", **final})
                save(step, final_val)
                if t.sample_every and step % t.sample_every:  # (else the milestone sample just shown)
                    sample = milestone_sample(p, state["params"], step)
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



def translation_sample(p: Prepared, params, n: int = 4) -> str:
    """Greedy translations of the first few held-out sources, with their references."""
    from plutao.model.seq2seq import greedy_decode, strip

    val = p.batches.val
    ids = list(range(min(n, len(val))))
    L = p.cfg.model.context_length
    src = pack([val.src[i] for i in ids], [val.tgt[i] for i in ids], L, p.tokenizer.pad_id)[:, :L]
    graphdef, live = nnx.split(p.trainer.model(params))
    out, _ = greedy_decode(graphdef, live, src, src != p.tokenizer.pad_id, p.tokenizer.bos_id, p.tokenizer.eos_id,
                           max_len=L)
    out = to_host(out)
    lines = []
    for row, i in enumerate(ids):
        source = p.tokenizer.decode(strip(val.src[i], p.tokenizer.eos_id, p.tokenizer.pad_id))
        hyp = p.tokenizer.decode(strip(out[row], p.tokenizer.eos_id, p.tokenizer.pad_id))
        ref = p.tokenizer.decode(strip(val.tgt[i][1:], p.tokenizer.eos_id, p.tokenizer.pad_id))
        lines.append(f"{source} → {hyp}   (reference: {ref})")
    return "\n".join(lines)


def fill_mask_sample(p: Prepared, params, width: int = 64) -> str:
    """A held-out snippet with every 7th token masked, and the model's best guess for each mask."""
    tokens = np.asarray(p.batches.val_rows(0, slice(0, 1))[0, :width], np.int32)
    masked = tokens.copy()
    positions = [i for i in range(3, len(tokens), 7) if tokens[i] >= NUM_SPECIAL]
    masked[positions] = p.tokenizer.mask_id
    logits, _ = p.trainer.model(params)(masked[None])
    filled = masked.copy()
    filled[positions] = np.argmax(to_host(logits)[0, positions], axis=-1)
    hits = int(sum(filled[i] == tokens[i] for i in positions))
    show = p.tokenizer.decode
    return (f"input:  {show(masked.tolist())}\nfilled: {show(filled.tolist())}\n"
            f"({hits}/{len(positions)} masked tokens recovered)")
