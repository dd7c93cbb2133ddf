"""The `plutao` subcommands, one module per concern. Each module defines its commands (`cmd_*`) and a
`register(sub)` that adds their parsers; `plutao.experiments.cli` only wires the modules together.

Command modules import the library (JAX, the model, training) inside the command functions, not at the
top: `plutao --help`, a mistyped command and the light commands (tokenize, launch, sweep, report) then
start in about half a second instead of the several seconds an import of JAX takes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from plutao.train.config.errors import UserError


def stage_parser(sub, name, help, parent, parent_help, data_help, fn,
                 overrides_help="(after the stage's defaults)"):
    """A stage's parser: its parent run, key=value overrides, --workdir, --data, --step, --quiet, --json;
    its --help ends with the stage's effective defaults."""
    sp = sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=stage_defaults_text(name))
    sp.add_argument(parent, help=parent_help)
    sp.add_argument("overrides", nargs="*", help=f"section.key=value overrides {overrides_help}")
    sp.add_argument("--workdir", required=True, help="the new run's directory (re-running resumes it)")
    sp.add_argument("--data", default="builtin:arith", help=data_help)
    which = "base" if parent == "base_run" else "SFT"
    sp.add_argument("--step", type=int, help=f"the {which} run's checkpoint (default: its latest)")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=fn)
    return sp


def stage_defaults(stage: str) -> dict:
    """The config keys a stage run takes from its defaults: the config's defaults under the stage's
    (train/config/presets.py: STAGE_PRESETS). Left out: what the parent run gives (model, tokenizer,
    world, mesh), what the command's flags set (task, parent, data paths, reward), and the rl.* keys
    the stage does not read."""
    from plutao.experiments.commands.assistant import INHERITED
    from plutao.train.config.presets import STAGE_PRESETS
    from plutao.train.config.schema import config_defaults

    preset = STAGE_PRESETS[stage]
    # (the rl.* keys only one of the RL stages reads: PPO's value model and GAE, GRPO's baseline)
    ppo_only = ("rl.value_clip", "rl.value_coef", "rl.value_lr", "rl.whiten_rewards", "rl.gamma", "rl.lam")
    reads = {"ppo": lambda k: k != "rl.baseline", "grpo": lambda k: k not in ppo_only,
             "dpo": lambda k: k == "rl.beta"}.get(stage, lambda k: False)
    out = {}
    for key, value in (config_defaults() | preset).items():
        if key.startswith(INHERITED) and key not in preset:
            continue
        if key in ("train.task", "train.init_from", "data.path", "data.val_path", "rl.reward"):
            continue
        if key.startswith("rl.") and not reads(key):
            continue
        out[key] = value
    return out


def stage_defaults_text(stage: str) -> str:
    return (f"config keys of a `plutao {stage}` run, with this stage's defaults (train/config/presets.py: "
            "STAGE_PRESETS, over the config's); model.*, the tokenizer, world.* and mesh.* come from the parent run:\n  "
            + "\n  ".join(f"{k} = {v!r}" for k, v in stage_defaults(stage).items()))


# --- training commands: run kinds, exit codes ------------------------------------------------------------

def _shown(path) -> str:
    """A recorded (absolute) path, relative to the current directory when it lies below it."""
    text = str(path)
    try:
        rel = os.path.relpath(text)
    except ValueError:
        return text
    return rel if not rel.startswith("..") else text


def resume_command(run_dir: Path, saved: dict) -> str | None:
    """The command that resumes the run in `run_dir`, from its config.json (None: it is not resumable)."""
    train, data = saved.get("train", {}), saved.get("data", {})
    task = train.get("task", "") or ""
    if not task:
        return f"plutao train {run_dir / 'config.json'} --workdir {run_dir}"
    if saved.get("lineage", {}).get("merged_from"):
        return None
    head, sep, tail = str(train.get("init_from", "")).rpartition(":")
    step = int(tail) if sep and tail.isdigit() else None
    parent = saved.get("lineage", {}).get("parent") or (head if step is not None else train.get("init_from")) or "PARENT"
    words = ["plutao", task, _shown(parent)]
    if step is not None:
        words += ["--step", str(step)]
    reward = saved.get("rl", {}).get("reward", "")
    if task in ("ppo", "grpo") and reward:
        words += ["--reward", reward if reward == "gold" else _shown(reward)]
    path = str(data.get("path", ""))
    if task in ("sft", "ppo", "grpo") and path and path != "builtin:arith":
        words += ["--data", _shown(path)]
    if task == "reward" and path and Path(path).parent != Path(run_dir).absolute() / "comparisons":
        words += ["--data", _shown(path)]
    words += ["--workdir", str(run_dir)] + _stage_overrides(saved, task, parent, step)
    return " ".join(words)


def _override(key: str, value) -> str:
    import shlex

    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    return shlex.quote(f"{key}={text}")


def _stage_overrides(saved: dict, task: str, parent, step: int | None) -> list[str]:
    """The key=value overrides that a stage run was started with: where its config.json differs from the
    config the same command would make without any (nothing when the parent cannot be read)."""
    from plutao.experiments.commands.assistant import stage_config
    from plutao.train.config.schema import SECTIONS, flatten

    given = {"data.path": saved.get("data", {}).get("path", ""), "data.val_path": saved.get("data", {}).get("val_path", ""),
             "rl.reward": saved.get("rl", {}).get("reward", "")}
    try:
        fresh, _ = stage_config(Path(parent), task, given, step, [])
    except Exception:  # noqa: BLE001 (a parent gone or changed: the command without overrides still says the most)
        return []
    made = flatten(fresh.to_dict())
    theirs = flatten({k: v for k, v in saved.items() if k in SECTIONS})
    return [_override(k, v) for k, v in theirs.items() if k in made and made[k] != v]


def check_run_kind(run_dir: Path, task: str) -> None:
    """Refuse a --workdir that holds another kind of run than this command trains (train.task: "" for
    `plutao train`, else the stage), naming its kind and the command that resumes it. Checked before
    anything else about the directory: its other differences would only be symptoms of this one."""
    from plutao.train.run.rundir import read_run_config

    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if saved is None:
        return
    theirs = saved.get("train", {}).get("task", "") or ""
    if theirs == (task or ""):
        return
    command = f"plutao {theirs}" if theirs else "plutao train"
    recorded = f"train.task={theirs}" if theirs else "train.task is empty: pretraining"
    mine = f"this `plutao {task}` run" if task else "this training"
    resume = resume_command(run_dir, saved)
    if resume is None:
        raise UserError(f"{run_dir} holds a `{command}` run merged by `plutao merge-lora` (its config.json: "
                        f"{recorded}), which is not resumed; give {mine} a new --workdir")
    if theirs == "dpo" and not (run_dir / "comparisons").is_dir():  # (--data was a reward run or a file)
        resume += "` and the --data it was started with"
    else:
        resume += "`"
    raise UserError(f"{run_dir} is a `{command}` run (its config.json: {recorded}); resume it with `{resume}, "
                    f"or give {mine} a new --workdir")


def run_training(cfg, run_dir: Path, **kwargs) -> dict:
    """train/loop.py's `train` (its summary says which signal stopped the loop, if one did)."""
    from plutao.train.loop import train

    return train(cfg, run_dir, **kwargs)


def finish(args, summary: dict) -> int:
    """Print the summary (--json, process 0) and return the exit code: 128 + the signal that stopped the
    loop (130 for SIGINT, 143 for SIGTERM, so `plutao train … && plutao sample …` stops there), else 0
    (reaching train.stop_at_step is no signal)."""
    import jax

    if getattr(args, "json", False) and jax.process_index() == 0:
        print(json.dumps(summary), flush=True)
    signum = summary.get("signal")
    return 128 + int(signum) if signum else 0


def run_parser(sub, name: str, fn, help: str, *, json: bool = True):
    """A command on a trained run: RUN_DIR first, then --json (unless not offered) and --step."""
    sp = sub.add_parser(name, help=help)
    sp.add_argument("run_dir")
    if json:
        sp.add_argument("--json", action="store_true")
    sp.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    sp.set_defaults(fn=fn)
    return sp
