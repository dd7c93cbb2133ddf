"""Benchmark commands: nanoGPT's CPU benchmark, sweep overhead, baselines at equal wall clock."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_bench(args) -> int:
    from plutao.experiments.bench import run_bench

    result = run_bench(data=args.data, steps=args.steps, torch=not args.no_torch, sample_tokens=args.sample_tokens,
                       workdir=args.workdir, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench_sweep(args) -> int:
    from plutao.experiments.sweep_bench import run_sweep_bench

    result = run_sweep_bench(args.steps, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench_baselines(args) -> int:
    from plutao.experiments.baselines_bench import run_baselines

    result = run_baselines(args.task, args.minutes, Path(args.data_dir), args.workdir,
                           out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0
