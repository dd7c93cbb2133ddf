"""Sweeps and ablations: many `plutao train` runs as isolated, resumable trials, then one report.

A sweep is a base config plus variants (grid, zip, explicit lists, random samples, named ablations,
or an Optuna study) times seeds. Every trial is its own process and its own run directory under
`SWEEP_DIR/trials/`, holding the usual config.json and metrics.jsonl plus `trial.json` (its
overrides and status). Re-running a sweep skips finished trials, resumes interrupted ones from
their checkpoints and starts missing ones; a failed trial records its one-line error and the others
go on. Trials share a persistent XLA compilation cache, so trials of the same shape compile once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from plutao.experiments import xla_cache
from plutao.experiments.sweep_spec import SweepSpec
from plutao.train.config.errors import UserError

TRIAL_FILE = "trial.json"
DONE, FAILED, INTERRUPTED, PRUNED, RUNNING = "done", "failed", "interrupted", "pruned", "running"
STOPPED_CODES = (130, 143)  # `plutao train` stopped by SIGINT / SIGTERM (it saved a checkpoint first)


# --- trials ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trial:
    variant: str  # what distinguishes it (seeds of one variant share this)
    params: dict[str, Any]  # the swept values
    seed: int
    overrides: dict[str, Any]  # everything passed to `plutao train` (spec overrides + params + seed + budget)
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")[:120] or "base"


def _short(key: str) -> str:
    return key.split(".", 1)[-1]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sample(dist: dict, rng: random.Random):
    (kind, args), = dist.items()
    if kind == "choice":
        return rng.choice(list(args))
    lo, hi = args
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "int":
        return rng.randint(int(lo), int(hi))
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def variants(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(name, swept values) of every variant: the product of the grid, zip rows, explicit trials,
    ablations and random samples (each a list of override sets; an absent one contributes {})."""
    groups: list[list[tuple[str | None, dict]]] = []
    if spec.grid:
        keys = list(spec.grid)
        groups.append([(None, dict(zip(keys, combo))) for combo in itertools.product(*(spec.grid[k] for k in keys))])
    if spec.zip:
        keys = list(spec.zip)
        groups.append([(None, {k: spec.zip[k][i] for k in keys}) for i in range(len(spec.zip[keys[0]]))])
    if spec.trials:
        groups.append([(None, dict(t)) for t in spec.trials])
    if spec.ablations:
        groups.append([(name, dict(o or {})) for name, o in spec.ablations.items()])
    if spec.random:
        rng = random.Random(spec.random.get("seed", 0))
        budget = int(spec.random.get("budget", 8))
        groups.append([(None, {k: _sample(d, rng) for k, d in spec.random["params"].items()}) for _ in range(budget)])
    out = []
    for combo in itertools.product(*groups) if groups else [()]:
        params, names = {}, []
        for name, values in combo:
            params.update(values)
            names.append(name if name is not None else " ".join(f"{_short(k)}={_fmt(v)}" for k, v in values.items()))
        out.append((" ".join(n for n in names if n) or "base", params))
    seen = {}
    for name, _ in out:
        seen[name] = seen.get(name, 0) + 1
    dupes = [n for n, c in seen.items() if c > 1]
    if dupes:
        raise UserError(f"two sweep variants are both named {dupes[0]!r}; give them distinct values")
    return out


def expand(spec: SweepSpec, sweep_dir: Path, cli_overrides: dict[str, str]) -> list[Trial]:
    trials = []
    for name, params in variants(spec):
        for seed in range(spec.seeds):
            shared = {**spec.overrides, **cli_overrides}
            budget = ({"train.steps": spec.max_steps} if spec.max_steps else {}) | (
                {"train.max_seconds": spec.max_seconds} if spec.max_seconds else {})
            # A swept value wins over the per-trial budget; seeds count up from the shared train.seed.
            overrides = {**shared, **budget, **params, "train.seed": seed + int(shared.get("train.seed", 0))}
            directory = sweep_dir / "trials" / (_slug(name) + (f"-seed{seed}" if spec.seeds > 1 else ""))
            trials.append(Trial(name, params, seed, overrides, directory))
    seen: dict[Path, str] = {}
    for t in trials:
        if t.directory in seen and seen[t.directory] != t.variant:
            raise UserError(f"variants {seen[t.directory]!r} and {t.variant!r} would share the trial directory "
                            f"{t.directory.name}; make their values differ in more than punctuation")
        seen[t.directory] = t.variant
    return trials


def read_trial(directory: Path) -> dict | None:
    path = directory / TRIAL_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_trial(directory: Path, record: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (TRIAL_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(directory / TRIAL_FILE)


# --- running one trial -----------------------------------------------------------------------------

def compilation_cache_env(sweep_dir: Path) -> dict[str, str]:
    """The persistent XLA cache shared by every trial (of this and later sweeps, and every other
    command: experiments/xla_cache.py): the first trial of a program compiles it, the rest load the
    executable from disk."""
    return xla_cache.compilation_cache_env()


def train_command(base: str | None, trial: Trial) -> list[str]:
    cmd = [sys.executable, "-m", "plutao.experiments.cli", "train"]
    if base:
        cmd.append(base)
    cmd += ["--workdir", str(trial.directory), "--quiet", "--json"]
    cmd += [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in trial.overrides.items()]
    return cmd


class Runner:
    """Runs trials as child processes; on SIGINT/SIGTERM it asks each to checkpoint and stop."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, log):
        self.spec, self.sweep_dir, self.log = spec, sweep_dir, log
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.signal: int | None = None  # what stopped the sweep (SIGINT/SIGTERM), for its exit code

    def stop_all(self, signum=signal.SIGINT) -> None:
        self.stopping = True
        self.signal = int(signum)
        with self.lock:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signum)

    def run(self, trial: Trial, monitor=None) -> dict:
        """Run (or resume) one trial to completion; returns its trial.json record."""
        record = {"variant": trial.variant, "params": trial.params, "seed": trial.seed, "overrides": trial.overrides,
                  "base": self.spec.base, "status": RUNNING, "launched_unix": time.time()}
        if self.stopping:
            return record
        write_trial(trial.directory, record)
        env = {**os.environ, **compilation_cache_env(self.sweep_dir)}
        log_path = trial.directory / "train.log"
        with log_path.open("ab") as stderr:
            # Own session: a terminal's Ctrl-C reaches the sweep once, and the sweep forwards it.
            proc = subprocess.Popen(train_command(self.spec.base, trial), stdout=subprocess.PIPE, stderr=stderr,
                                    env=env, start_new_session=True)
            with self.lock:
                self.procs[trial.name] = proc
                if self.stopping:  # a stop that arrived while this trial was starting
                    proc.send_signal(signal.SIGINT)
            pruned = monitor(trial, proc) if monitor else False
            out, _ = proc.communicate()
            with self.lock:
                self.procs.pop(trial.name, None)
        record["finished_unix"] = time.time()
        record["wall_seconds"] = record["finished_unix"] - record["launched_unix"]
        record["returncode"] = proc.returncode
        summary = None
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    summary = json.loads(line)
                    break
                except json.JSONDecodeError:
                    pass
        # A trial stopped by a signal exits 130 (SIGINT) or 143 (SIGTERM: pruning, a scheduler) after saving
        # a checkpoint, with its summary: resumable, not failed.
        stopped = proc.returncode in STOPPED_CODES
        if (proc.returncode == 0 or stopped) and summary is not None:
            record["summary"] = summary
            record["status"] = PRUNED if pruned else (INTERRUPTED if summary.get("interrupted") else DONE)
        elif pruned and stopped:
            record["status"] = PRUNED
        else:
            record["status"] = INTERRUPTED if self.stopping or stopped else FAILED
            record["error"] = _last_error(log_path) or f"exited with code {proc.returncode}"
        if self.stopping and record["status"] == INTERRUPTED:
            record["stopped_by_signal"] = self.signal
        write_trial(trial.directory, record)
        return record


def _last_error(log_path: Path) -> str | None:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("plutao: error:")]
    if errors:
        return errors[-1].removeprefix("plutao: error: ")
    return lines[-1] if lines else None


# --- executors -------------------------------------------------------------------------------------

def _canonical(overrides: dict) -> str:
    return json.dumps({k: str(v) for k, v in overrides.items()}, sort_keys=True)


def pending(trials: list[Trial], retry_failed: bool) -> tuple[list[Trial], list[Trial]]:
    """(to run, already done): finished trials are skipped; failed ones only with retry_failed.
    A trial directory made with other overrides is refused: its results would pass for this spec's."""
    todo, done = [], []
    for trial in trials:
        record = read_trial(trial.directory)
        if record and "overrides" in record and _canonical(record["overrides"]) != _canonical(trial.overrides):
            raise UserError(f"{trial.directory} was run with other settings ({_canonical(record['overrides'])}); "
                            "use a new --workdir, or delete that trial directory to run it again")
        status = record.get("status") if record else None
        if status in (DONE, PRUNED) or (status == FAILED and not retry_failed):
            done.append(trial)
        else:
            todo.append(trial)
    return todo, done


def run_local(spec: SweepSpec, sweep_dir: Path, trials: list[Trial], log) -> list[dict]:
    runner = Runner(spec, sweep_dir, log)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):
        if runner.stopping:  # a second Ctrl-C: stop waiting
            raise KeyboardInterrupt
        log(f"signal {signum}: asking running trials to checkpoint and stop (finished trials are kept); "
            "re-run the same command to resume")
        runner.stop_all(signum)

    for s in previous:
        signal.signal(s, on_signal)
    results = []
    try:
        def one(trial):
            record = runner.run(trial)
            status = record["status"]
            detail = f": {record.get('error')}" if status == FAILED else ""
            if status != RUNNING:
                log(f"[{status}] {trial.name}{detail}")
            return record

        with ThreadPoolExecutor(max_workers=spec.parallel) as pool:
            results = list(pool.map(one, trials))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return results


def run_slurm(spec: SweepSpec, sweep_dir: Path, trials: list[Trial], log) -> list[dict]:
    """One SLURM job array through submitit: each array task runs one trial (on `nodes` nodes with
    `tasks_per_node` processes joined by jax.distributed, which reads SLURM's environment)."""
    try:
        import submitit
    except ImportError:
        raise UserError("executor=slurm needs submitit: pip install 'plutao[sweep]'") from None
    s = dict(spec.slurm)
    executor = submitit.AutoExecutor(folder=str(sweep_dir / "slurm" / "%j"), cluster=s.pop("cluster", None))
    params = {"timeout_min": int(s.pop("timeout_min", 60)), "slurm_array_parallelism": spec.parallel,
              "nodes": int(s.pop("nodes", 1)), "tasks_per_node": int(s.pop("tasks_per_node", 1)),
              "cpus_per_task": int(s.pop("cpus_per_task", 1)), "name": spec.name or "plutao-sweep"}
    if "partition" in s:
        params["slurm_partition"] = s.pop("partition")
    params.update({k if k.startswith("slurm_") else f"slurm_{k}": v for k, v in s.items()})
    executor.update_parameters(**params)
    jobs = executor.map_array(run_trial_task, [(spec, str(sweep_dir), t) for t in trials])
    log(f"submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} trials "
        f"(at most {spec.parallel} at once); logs in {sweep_dir / 'slurm'}")
    results = []
    for trial, job in zip(trials, jobs):
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 (the job failed: node failure, time limit; record it)
            record = read_trial(trial.directory) or {"variant": trial.variant, "params": trial.params,
                                                     "seed": trial.seed, "overrides": trial.overrides}
            if record.get("status") != DONE:
                record.update(status=FAILED, error=f"SLURM job {job.job_id}: {str(e).splitlines()[-1][:300]}")
                write_trial(trial.directory, record)
        record = read_trial(trial.directory) or {}
        log(f"[{record.get('status', FAILED)}] {trial.name}")
        results.append(record)
    return results


def run_trial_task(args) -> str:
    """The function each SLURM array task runs: one trial, in the task's own processes. With several
    tasks per trial, every task runs `plutao train` and jax.distributed joins them (SLURM env vars)."""
    spec, sweep_dir, trial = args
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_PROCID", "0") != "0":
        done = subprocess.run(train_command(spec.base, trial), check=False, stdout=subprocess.DEVNULL,
                              env={**env, **compilation_cache_env(Path(sweep_dir))})
        if done.returncode not in (0, *STOPPED_CODES):  # (stopped by a signal: process 0 records it)
            raise subprocess.CalledProcessError(done.returncode, done.args)
        return "worker"
    return Runner(spec, Path(sweep_dir), print).run(trial)["status"]


def run_optuna(spec: SweepSpec, sweep_dir: Path, base_trial: Trial, cli_overrides: dict, log) -> list[dict]:
    """Bayesian search (Optuna's TPE) with median pruning on the trials' reported val losses.

    The study lives in SWEEP_DIR/optuna.db, so re-running continues it. Trials run one after another
    (`parallel` at once), each a normal plutao trial; a trial whose val loss is worse than the median
    of earlier trials at the same step is stopped (SIGTERM: it checkpoints) and recorded as pruned.
    """
    try:
        import optuna
    except ImportError:
        raise UserError("optuna search needs Optuna: pip install 'plutao[sweep]'") from None
    o = spec.optuna
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=int(o.get("startup_trials", 3)),
                                          n_warmup_steps=int(o.get("warmup_steps", 0)))
              if o.get("pruner", "median") == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=spec.name or "plutao", storage=storage, load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=int(o.get("seed", 0))),
                                pruner=pruner)
    runner = Runner(spec, sweep_dir, log)
    results = []
    # Trials of an earlier, interrupted invocation: run their parameters again first (from scratch).
    for stale in study.trials:
        if stale.state == optuna.trial.TrialState.RUNNING:
            study.enqueue_trial(stale.params, skip_if_exists=False)
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    remaining = int(o.get("trials", 10)) - len([t for t in study.trials if t.state.is_finished()
                                                and t.state != optuna.trial.TrialState.FAIL])

    def monitor(trial_obj):
        def watch(trial: Trial, proc: subprocess.Popen) -> bool:
            seen = 0
            while proc.poll() is None:
                time.sleep(0.5)
                for record in _read_val(trial.directory)[seen:]:
                    seen += 1
                    trial_obj.report(record["loss"], record["step"])
                    if trial_obj.should_prune():
                        proc.send_signal(signal.SIGTERM)
                        return True
            return False
        return watch

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):
        log(f"signal {signum}: asking the running trial to checkpoint and stop; re-run to continue the study")
        runner.stop_all(signum)

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        for _ in range(max(remaining, 0)):
            if runner.stopping:
                break
            results.append(_optuna_trial(study, o, runner, base_trial, sweep_dir, monitor, log))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def _optuna_trial(study, o, runner, base_trial, sweep_dir, monitor, log) -> dict:
    """Ask the study for parameters, run them as a trial, and tell it the outcome."""
    import optuna

    t = study.ask()
    params = {}
    for key, dist in o["params"].items():
        (kind, args), = dist.items()
        if kind == "choice":
            params[key] = t.suggest_categorical(key, list(args))
        elif kind == "int":
            params[key] = t.suggest_int(key, int(args[0]), int(args[1]))
        else:
            params[key] = t.suggest_float(key, args[0], args[1], log=kind == "loguniform")
    name = f"optuna-{t.number:03d}"
    trial = Trial(name, params, base_trial.seed, {**base_trial.overrides, **params},
                  sweep_dir / "trials" / name)
    record = runner.run(trial, monitor(t))
    if record["status"] == DONE:
        study.tell(t, record["summary"]["val_loss"])
    elif record["status"] == PRUNED:
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    elif record["status"] == INTERRUPTED:
        study.enqueue_trial(params, skip_if_exists=False)  # asked again first on the next run
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    log(f"[{record['status']}] {name} {params}")
    return record


def _read_val(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if r.get("split") == "val":
            out.append(r)
    return out


# --- the command -----------------------------------------------------------------------------------

def sweep(spec: SweepSpec, sweep_dir: Path, cli_overrides: dict[str, str], *, retry_failed: bool = False,
          log=print) -> dict:
    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"--workdir {sweep_dir} is a file; give a directory")
    # Fail on a bad base config or shared override before starting anything (a bad swept value
    # fails its own trials only, and is recorded there). The task registry (and JAX) is imported here,
    # not at the top: `plutao report` and the spec tools import this module and never train.
    from plutao.train.tasks import resolve

    resolve(spec.base, [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                       for k, v in {**spec.overrides, **cli_overrides}.items()])
    t0 = time.time()
    trials = expand(spec, sweep_dir, cli_overrides)
    # Refused settings (a trial directory made with others) fail here, before sweep.json is rewritten.
    todo, done = pending(trials, retry_failed) if not spec.optuna else ([], [])
    record_path = sweep_dir / "sweep.json"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record = {"spec": dataclasses.asdict(spec), "cli_overrides": cli_overrides, "created_unix":
              previous.get("created_unix", t0), "trials": [t.name for t in trials]}
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(record_path)
    if spec.optuna:
        results = run_optuna(spec, sweep_dir, trials[0], cli_overrides, log)
        counts = Counter(r.get("status", "missing") for r in results)
        return {"sweep_dir": str(sweep_dir), "started_unix": t0, "ran": len(results), "skipped": 0,
                "status": dict(counts), **_stopped_by(results)}
    log(f"sweep {sweep_dir}: {len(trials)} trials ({len(done)} already finished, {len(todo)} to run, "
        f"{spec.parallel} at a time, executor {spec.executor})")
    results = (run_slurm if spec.executor == "slurm" else run_local)(spec, sweep_dir, todo, log) if todo else []
    counts = Counter((read_trial(t.directory) or {}).get("status", "missing") for t in trials)
    log("trial status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return {"sweep_dir": str(sweep_dir), "started_unix": t0, "ran": len(results), "skipped": len(done),
            "status": dict(counts), **_stopped_by(results)}


def _stopped_by(results: list[dict]) -> dict:
    """{"signal": the signal that stopped the sweep} when one did (for its exit code), else {}."""
    signum = next((r["stopped_by_signal"] for r in results if r.get("stopped_by_signal")), None)
    return {"signal": signum} if signum else {}
