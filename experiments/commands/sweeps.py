"""Commands over many runs: sweep, study, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_sweep(args) -> int:
    from plutao.experiments.sweep import command_line_spec, sweep

    settings = {name: getattr(args, name) for name in ("seeds", "parallel", "max_steps", "max_seconds", "executor")}
    spec, overrides = command_line_spec(args.config, args.overrides, grid_flags=args.grid, zip_flags=args.zip,
                                        random_flags=args.random, optuna=args.optuna, budget=args.budget,
                                        settings=settings)
    result = sweep(spec, Path(args.workdir), overrides, retry_failed=args.retry_failed,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    if not args.no_report:
        from plutao.experiments.report import report

        result["report"] = report(Path(args.workdir))["report"]
        print(f"report: {result['report']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return _sweep_exit(result)


def _sweep_exit(result: dict) -> int:
    """130 when interrupted (resumable), 1 when a trial failed (the others ran), else 0."""
    status = result.get("status", {})
    if status.get("interrupted") or status.get("running"):
        return 130
    if status.get("failed"):
        print(f"plutao: {status['failed']} trial(s) failed; their errors are in trial.json and the report",
              file=sys.stderr)
        return 1
    return 0


def cmd_study(args) -> int:
    from plutao.experiments.report import report
    from plutao.experiments.studies import study
    from plutao.experiments.sweep import sweep
    from plutao.train.config.errors import UserError
    from plutao.train.config.schema import parse_overrides

    scale = args.scale
    rest = []
    for o in args.overrides:  # `scale=4` reads like the other key=value knobs
        if o.startswith("scale="):
            try:
                scale = float(o.partition("=")[2])
            except ValueError:
                raise UserError(f"cannot read {o!r}; scale is a number, e.g. scale=4") from None
        else:
            rest.append(o)
    spec = study(args.name, scale)
    for name in ("seeds", "parallel"):
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))
    spec.validate()
    workdir = Path(args.workdir or Path("runs") / f"study-{args.name}")
    result = sweep(spec, workdir, parse_overrides(rest), log=lambda m: print(m, file=sys.stderr, flush=True))
    out = report(workdir)
    print((Path(out["report"])).read_text())
    return _sweep_exit(result)


def cmd_report(args) -> int:
    from plutao.experiments.report import report

    out = report(Path(args.sweep_dir), Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps(out))
    else:
        print(Path(out["report"]).read_text())
        print("written: " + ", ".join([out["report"], out["csv"], *out["plots"]]))
    return 0
