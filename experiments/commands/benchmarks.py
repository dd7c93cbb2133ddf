"""Benchmark commands: nanoGPT's CPU benchmark, sweep overhead, baselines at equal wall clock."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_bench(args) -> int:
    from plutao.experiments.bench import run_bench

    result = run_bench(data=args.data, steps=args.steps, torch=not args.no_torch, sample_tokens=args.sample_tokens,
                       steps_per_dispatch=args.steps_per_dispatch,
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


def cmd_bench_serve(args) -> int:
    from plutao.experiments.serve_bench import run_serve_bench

    result = run_serve_bench(args.run_dir, requests=args.requests, levels=[int(x) for x in args.concurrency.split(",")],
                             max_tokens=args.max_tokens, slots=args.slots, chunk=args.chunk, soak=args.soak,
                             soak_concurrency=args.soak_concurrency, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench_hf(args) -> int:
    from plutao.experiments.hf_bench import run_hf_bench

    result = run_hf_bench(args.models.split(","), args.workdir, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench_sizes(args) -> int:
    from plutao.experiments.sizes_bench import dumps, parse_sizes, run_bench_sizes

    result = run_bench_sizes(parse_sizes(args.sizes), data=args.data, torch=not args.no_torch,
                             compile=not args.no_compile, profile=not args.no_profile, plot=args.plot,
                             out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(dumps(result))
    return 0


def cmd_bench_startup(args) -> int:
    from plutao.experiments.startup_bench import run_startup_bench

    result = run_startup_bench(args.run_dir, args.max_new_tokens, args.repeats, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    bw = sub.add_parser("bench-sweep", help="sweep overhead: time to the first step, share outside training steps")
    bw.add_argument("--steps", type=int, default=300, help="steps per trial")
    bw.add_argument("--json", action="store_true")
    bw.set_defaults(fn=cmd_bench_sweep)

    bb = sub.add_parser("bench-baselines", help="Transformer vs LSTM vs n-gram at equal wall-clock (PTB or "
                        "Tiny Shakespeare)")
    bb.add_argument("task", choices=["ptb", "shakespeare"])
    bb.add_argument("--minutes", type=float, default=5.0, help="training budget per neural model")
    bb.add_argument("--data-dir", default="../shared/data", help="folder holding ptb/ and tinyshakespeare.txt")
    bb.add_argument("--workdir", help="where the run directories go (default: a temporary folder)")
    bb.add_argument("--json", action="store_true")
    bb.set_defaults(fn=cmd_bench_baselines)

    b = sub.add_parser("bench", help="nanoGPT's CPU benchmark: speed, MFU and val loss vs PyTorch eager")
    b.add_argument("--data", help="Tiny Shakespeare text file (default: download or cache)")
    b.add_argument("--steps", type=int, default=2000)
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--sample-tokens", type=int, default=500)
    b.add_argument("--steps-per-dispatch", type=int, help="train.steps_per_dispatch (default: the preset's, 10)")
    b.add_argument("--workdir", help="run directory for the benchmark (default: a temporary one)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)
    bs = sub.add_parser("bench-serve", help="the server under load (requests/s, tokens/s, TTFT, p50/p99 latency) against "
                        "the plain sampler answering the same requests one at a time")
    bs.add_argument("run_dir", help="a chat run to serve")
    bs.add_argument("--concurrency", default="1,8,32,64", help="client concurrency levels (default %(default)s)")
    bs.add_argument("--requests", type=int, default=64, help="requests per level, at least the level (default %(default)s)")
    bs.add_argument("--max-tokens", type=int, default=48, help="reply budget of each request (default %(default)s)")
    bs.add_argument("--slots", type=int, default=32, help="the server's slots (default %(default)s)")
    bs.add_argument("--chunk", type=int, default=4, help="the server's decode steps between admissions (default %(default)s)")
    bs.add_argument("--soak", type=float, default=0.0, metavar="S", help="then S seconds of load with clients walking away")
    bs.add_argument("--soak-concurrency", type=int, default=64)
    bs.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    bs.set_defaults(fn=cmd_bench_serve)
    bh = sub.add_parser("bench-hf", help="Hugging Face import/export: time and peak memory against the checkpoint, "
                        "logit agreement with transformers, and what grouped-query attention saves in decoding")
    bh.add_argument("--models", default="gpt2-124m,llama-1b", help="models to build and convert (default %(default)s)")
    bh.add_argument("--workdir", help="where the checkpoints and runs go (default: a temporary folder)")
    bh.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    bh.set_defaults(fn=cmd_bench_hf)
    bz = sub.add_parser("bench-sizes", help="training tokens/s at about 1M, 10M and 50M parameters against PyTorch "
                        "eager and torch.compile of the same recipe, with where plutao's step spends its time")
    bz.add_argument("--sizes", default="1m,10m,50m", help="sizes: 1m, 10m, 50m or LAYERSxWIDTHxHEADS:CONTEXTxBATCH:STEPS")
    bz.add_argument("--data", help="Tiny Shakespeare text file (default: download or cache)")
    bz.add_argument("--no-torch", action="store_true", help="plutao only")
    bz.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler)")
    bz.add_argument("--no-profile", action="store_true", help="skip the traced step at each size")
    bz.add_argument("--plot", help="draw tokens/s and the ratios against the parameter count into this PNG")
    bz.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    bz.set_defaults(fn=cmd_bench_sizes)
    bst = sub.add_parser("bench-startup", help="a one-shot `plutao sample` from the shell (cold, warm, without the "
                         "compilation cache) against nanoGPT's sample.py on the same shape")
    bst.add_argument("run_dir", help="a trained decoder run")
    bst.add_argument("--max-new-tokens", type=int, default=100)
    bst.add_argument("--repeats", type=int, default=5, help="fresh processes per figure (the median is kept)")
    bst.add_argument("--json", action="store_true")
    bst.set_defaults(fn=cmd_bench_startup)
