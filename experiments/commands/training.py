"""Commands that train a run or show its progress: train, plot."""

from __future__ import annotations

import json
from pathlib import Path

from plutao.train.config.schema import resolve_config


def cmd_train(args) -> int:
    from plutao.train.loop import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `plutao train key=value ...` without a config
        config, overrides = None, [config] + overrides
    allowed = [k for group in args.allow_changed or [] for k in group]
    overrides += [k for k in allowed if "=" in k]  # (`--allow-changed KEY key=value`: the override is not a key)
    name, cfg = resolve_config(config, overrides)
    run_dir = Path(args.workdir or Path("runs") / name)
    summary = train(cfg, run_dir, quiet=args.quiet, allow_changed=tuple(k for k in allowed if "=" not in k))
    import jax

    if args.json and jax.process_index() == 0:
        print(json.dumps(summary))
    return 0


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
