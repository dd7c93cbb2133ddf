"""Commands over many runs: sweep, study, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_sweep(args) -> int:
    from plutao.experiments.sweep import sweep
    from plutao.experiments.sweep_spec import command_line_spec

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
    """128 + the signal when interrupted (resumable: 130 for SIGINT, 143 for SIGTERM), 1 when a trial
    failed (the others ran), else 0."""
    status = result.get("status", {})
    if status.get("interrupted") or status.get("running"):
        return 128 + result.get("signal", 2)
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


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    sw = sub.add_parser("sweep", help="run many trainings as isolated, resumable trials, then report",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  plutao sweep tiny --workdir sweeps/lr --grid optim.lr=1e-3,3e-3 --seeds 2\n"
                               "  plutao sweep spec.yaml --workdir sweeps/ablation --parallel 2\n\n"
                               "spec format (YAML, JSON, TOML, or a .py file defining SWEEP = {...}); every key "
                               "optional:\n"
                               "  base: PRESET_OR_CONFIG_FILE        overrides: {section.key: value}  (every trial)\n"
                               "  grid: {key: [v1, v2]}   zip: {key: [..], key2: [..]}   trials: [{key: value}, ...]\n"
                               "  ablations: {name: {key: value}}   random: {budget: N, seed: S, params: {key: DIST}}\n"
                               "  optuna: {trials: N, params: {key: DIST}, pruner: median|none}\n"
                               "  DIST: {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {int: [lo, hi]} | "
                               "{choice: [a, b]}\n"
                               "  seeds: N   parallel: N   max_steps: N   max_seconds: S   executor: local|slurm\n"
                               "  slurm: {partition: P, timeout_min: M, nodes: N, tasks_per_node: T, cpus_per_task: C}")
    sw.add_argument("config", nargs="?", help="a sweep spec (.yaml/.py/.json/.toml), or the base preset/config file")
    sw.add_argument("overrides", nargs="*", help="section.key=value applied to every trial")
    sw.add_argument("--workdir", required=True, help="the sweep directory (re-running resumes it)")
    sw.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="sweep a key over values (product)")
    sw.add_argument("--zip", action="append", metavar="KEY=V1,V2", help="keys varied together, value by value")
    sw.add_argument("--random", action="append", metavar="KEY=DIST:LO:HI",
                    help="random search: loguniform:lo:hi, uniform:lo:hi, int:lo:hi or choice:a,b")
    sw.add_argument("--budget", type=int, default=8, help="random search / Optuna: number of trials")
    sw.add_argument("--optuna", action="store_true", help="Bayesian search (TPE) with median pruning over --random")
    sw.add_argument("--seeds", type=int, help="seeds per variant (train.seed = 0, 1, ...)")
    sw.add_argument("--parallel", type=int, help="trials at once")
    sw.add_argument("--max-steps", type=int, help="per-trial step budget (sets train.steps)")
    sw.add_argument("--max-seconds", type=float, help="per-trial wall-clock budget (sets train.max_seconds)")
    sw.add_argument("--executor", choices=["local", "slurm"])
    sw.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    sw.add_argument("--no-report", action="store_true")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(fn=cmd_sweep)

    st = sub.add_parser("study", help="a built-in ablation study (sweep + report): lr-warmup, norm-depth, "
                        "positions, heads, activations, families")
    st.add_argument("name")
    st.add_argument("overrides", nargs="*", help="scale=S (model width × S, steps × S) and section.key=value")
    st.add_argument("--workdir", help="default runs/study-NAME")
    st.add_argument("--scale", type=float, default=1.0)
    st.add_argument("--seeds", type=int)
    st.add_argument("--parallel", type=int)
    st.set_defaults(fn=cmd_study)

    rp = sub.add_parser("report", help="Markdown/CSV table and plots of a sweep, from its trial directories")
    rp.add_argument("sweep_dir")
    rp.add_argument("--out", help="output folder (default SWEEP_DIR/report)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_report)
