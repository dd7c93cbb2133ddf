"""Commands that train a run or show its progress: train, plot."""

from __future__ import annotations

import json
from pathlib import Path

from plutao.train.config import resolve_config


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
    from plutao.train.errors import UserError
    from plutao.train.metrics import plot_losses

    path = plot_losses(Path(args.run_dir))
    if path is None:
        raise UserError(f"{args.run_dir} has no metrics.jsonl with losses yet; train it first")
    print(path)
    return 0
