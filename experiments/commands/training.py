"""Commands that train a run or show its progress: train, plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from plutao.train.config.presets import PRESETS
from plutao.train.config.schema import config_defaults


def cmd_train(args) -> int:
    from plutao.experiments.commands import check_run_kind, finish, run_training
    from plutao.train.tasks import resolve

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `plutao train key=value ...` without a config
        config, overrides = None, [config] + overrides
    allowed = [k for group in args.allow_changed or [] for k in group]
    overrides += [k for k in allowed if "=" in k]  # (`--allow-changed KEY key=value`: the override is not a key)
    name, cfg = resolve(config, overrides)
    run_dir = Path(args.workdir or Path("runs") / name)
    check_run_kind(run_dir, cfg.train.task)  # (an SFT run is resumed by `plutao sft`, not turned into pretraining)
    summary = run_training(cfg, run_dir, quiet=args.quiet,
                           allow_changed=tuple(k for k in allowed if "=" not in k))
    return finish(args, summary)


def cmd_plot(args) -> int:
    """One run: its loss.png (an RL run: rewards.png too). Several RL runs: the overoptimisation plot
    (reward-model score and gold reward against KL to the reference) in --out."""
    from plutao.train.config.errors import UserError
    from plutao.train.run.metrics import plot_losses, plot_overoptimization, plot_rewards

    runs = [Path(r) for r in args.run_dir]
    for r in runs:
        if not (r / "metrics.jsonl").is_file():
            raise UserError(f"{r} has no metrics.jsonl yet; train it first")
    if len(runs) > 1:
        path = plot_overoptimization(runs, Path(args.out or "overoptimization.png"))
        if path is None:
            raise UserError("none of the runs is an RL run (plutao ppo / grpo); several runs are compared by KL")
        print(path)
        return 0
    paths = [p for p in (plot_losses(runs[0]), plot_rewards(runs[0])) if p is not None]
    if not paths:
        raise UserError(f"{runs[0]} has no metrics.jsonl with losses yet; train it first")
    print("\n".join(map(str, paths)))
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    t = sub.add_parser("train", help="train (or resume) a model", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="presets: " + ", ".join(PRESETS) + "\nconfig keys (defaults before a preset):\n  "
                       + "\n  ".join(f"{k} = {v!r}" for k, v in config_defaults().items() if not k.startswith("rl."))
                       + "\n(rl.* keys: the RL stages' own; see `plutao ppo --help`, `grpo --help`, `dpo --help`)")
    t.add_argument("config", nargs="?", help="preset name or .toml/.json file (default: the default experiment)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--workdir", help="run directory (default runs/CONFIG); re-running resumes it")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.add_argument("--allow-changed", nargs="+", action="append", metavar="KEY",
                   help="resume although these experiment-defining keys differ from the run's config.json "
                        "(the change is recorded in its history); train.steps and other run-control keys "
                        "may always change")
    t.set_defaults(fn=cmd_train)

    pp = sub.add_parser("plot", help="(re)write RUN_DIR/loss.png (RL runs: rewards.png) from metrics.jsonl; "
                        "several RL runs: reward-model and gold reward against KL in one picture")
    pp.add_argument("run_dir", nargs="+")
    pp.add_argument("--out", help="several runs: the picture's path (default overoptimization.png)")
    pp.set_defaults(fn=cmd_plot)
