"""`plutao train`: config → data → mesh and state → (resume) → steps with eval, samples, checkpoints.

Everything that can fail on bad input (config, data, tokenizer, checkpoint compatibility) is checked
before anything is written to the run directory, so a failed start never damages an existing run.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from plutao.model.counts import count_params, flops_per_token
from plutao.model.sampling import to_host
from plutao.tokenizer.chat import template_hash
from plutao.train.config.errors import NonFiniteError, UserError
from plutao.train.config.schema import Config, all_keys
from plutao.train.ngram_run import train_ngram
from plutao.train.parallel.distributed import any_process, is_main_process, log
from plutao.train.prepare import evaluate, milestone_sample, prepare, provenance, tokenizer_summary
from plutao.train.rl.loop import train_rl
from plutao.train.run.checkpoint import Checkpoints
from plutao.train.run.lineage import init_from_parent, lora_base, merge_params
from plutao.train.run.metrics import MetricsLog, device_peak_flops, plot_losses
from plutao.train.run.resume import StopFlag, holding, last_checkpoint_text, legacy_train_seconds, resume
from plutao.train.run.rundir import read_run_config
from plutao.train.tasks import validate


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
        run_dir.mkdir(parents=True, exist_ok=True)
        return train_ngram(p, run_dir, write_run_files, log)
    recorded = (saved or {}).get("lineage", {}).get("template_hash")
    if p.task.chat and recorded not in (None, template_hash(p.tokenizer)):
        raise UserError(f"{run_dir} was trained with another chat template (hash {recorded}); resume it with the "
                        "version of plutao that made it, or use a new --workdir")
    if p.task.rollouts:  # (learns from its own samples: train/rl/loop.py)
        return train_rl(p, run_dir, saved, write_run_files, quiet, allow_changed)
    # Restore before writing anything: a checkpoint that does not fit this config fails here,
    # leaving config.json and the checkpoints as they were.
    own = run_dir / "checkpoints"
    parent_params = None
    if cfg.train.init_from and not (own.is_dir() and any(d.name.isdigit() for d in own.iterdir())):
        # Read (and refused, if it does not fit) before anything is created in the run directory.
        abstract = trainer.abstract_sharded_state()  # (a LoRA run's parent fills its frozen base)
        parent_params, lineage = init_from_parent(abstract["frozen"]["base"] if trainer.adapted else abstract["params"],
                                                  cfg.train.init_from, p.tokenizer.fingerprint, cfg.model,
                                                  grown_from=p.grown_from)
        if p.grown_from is not None:
            g = p.grown_from
            log(f"the parent's tokenizer grows by {', '.join(g['added'])} (ids {g['vocab'][0]}–{g['vocab'][1] - 1}); "
                f"{', '.join(lineage['grown']['parameters']) or 'no parameter'} gain their rows, each the mean of "
                "the parent's")
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

            events = [e for e in (t.log_every, t.eval_every, t.sample_every, t.checkpoint_every) if e]
            slots = t.dispatch_slots  # (1: the single-step program, as with train.steps_per_dispatch=1)

            def block_end(first: int, last: int) -> int:
                """Where the dispatch starting at step `first` ends: after train.steps_per_dispatch steps, at
                the next step that logs, evaluates, samples or saves, or where the batch shape changes
                (so every checkpoint, and every point a signal or time budget is acted on, is between
                blocks, and a resumed run goes through the same steps as one never stopped)."""
                end = min([last, first + slots] + [(first // e + 1) * e for e in events])
                shapes = p.batches.train_shapes(first)
                for s in range(first + 1, end):
                    if p.batches.train_shapes(s) != shapes:
                        return s
                return end

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
                # (the first dispatch is one step: its time is the compilation's, as with single steps)
                end = step + 1 if compile_s is None else block_end(step, last_step)
                window_tokens += sum(p.batches.tokens_per_step(s) for s in range(step, end))
                t0 = time.perf_counter()
                if slots == 1:
                    state, step_metrics = trainer.train_step(state, p.batches.sharded_train(step, trainer.mesh))
                else:
                    batches = p.batches.sharded_block(range(step, end), slots, trainer.mesh)
                    state, step_metrics = trainer.train_block(state, batches, np.int32(end - step))
                window_steps += end - step
                bar.update(end - step - 1)
                step = end
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
                    log(f"step {step}: {p.task.val_text(val)}")
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
                return {"interrupted": True, "step": step, "run_dir": str(run_dir), "signal": stop.signal}
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
        # (and every other held-out figure of the task: a reward model's margin and Brier score, DPO's rewards)
        **{f"val_{k}": float(v) for k, v in final.items()
           if k not in ("loss", "perplexity", "accuracy", "pairwise_accuracy")},
        "budget_spent": budget_spent, "train_seconds": spent(),
        # Time inside training steps (after the first, compiling one), and when the first step ended.
        "steps_seconds": steps_seconds, "first_step_unix": first_step_unix,
        "run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / str(step)),
        "plot": str(plot) if plot else None,
    }
    if sample is not None:
        log(f"--- final sample ---\n{sample}\n---")
    epochs_text = ", ".join(f"{name}: {e:.2f}" for name, e in epochs.items())
    log(f"done: step {step}, {p.task.val_text(final, final=True)}; "
        f"epochs consumed {epochs_text}\n  checkpoint: {summary['checkpoint']}\n  metrics and samples: "
        f"{run_dir / 'metrics.jsonl'}\n  plot: {plot}")
    return summary

