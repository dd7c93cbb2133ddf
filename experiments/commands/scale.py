"""Commands about size and scale: parameter counts, memory plans, shardings, multi-process launch,
compile-time and host-memory scaling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plutao.experiments.commands.evaluation import neural_only


def cmd_params(args) -> int:
    from plutao.model.counts import count_params, flops_per_token
    from plutao.model.presets import PUBLISHED_PARAMS
    from plutao.train.tasks import resolve

    name, cfg = resolve(args.preset, args.overrides)
    model = neural_only(cfg, "params").shaped_model()
    counts = count_params(model)
    published = PUBLISHED_PARAMS.get(name)
    out = {"preset": name, "params": counts["total"], "non_embedding": counts["non_embedding"],
           "embedding": counts["embedding"], "published": published,
           "relative_to_published": (counts["total"] / published - 1) if published else None,
           "n_layers": model.n_layers, "d_model": model.d_model, "n_heads": model.n_heads, "d_head": model.d_head,
           "d_ff": model.d_ff, "context_length": model.context_length, "vocab_size": model.vocab_size,
           "batch_tokens": cfg.train.batch_size * model.context_length, "lr": cfg.optim.lr,
           "train_flops_per_token": flops_per_token(model)}
    if args.json:
        print(json.dumps(out))
        return 0
    pub = f" (published {published / 1e9:.3g}B, {out['relative_to_published']:+.2%})" if published else ""
    print(f"{name}: {counts['total']:,} parameters{pub}")
    print(f"  non-embedding {counts['non_embedding']:,}, embedding {counts['embedding']:,}")
    print(f"  n_layers {model.n_layers}, d_model {model.d_model}, n_heads {model.n_heads}"
          f"{f' (key/value heads {model.kv_heads})' if model.grouped else ''}, d_head {model.d_head}, "
          f"d_ff {model.d_ff}, context {model.context_length}, vocab {model.vocab_size}")
    print(f"  batch {cfg.train.batch_size} × {model.context_length} = {out['batch_tokens']:,} tokens, "
          f"lr {cfg.optim.lr:g}; training {out['train_flops_per_token']:.3g} FLOPs/token")
    return 0


def cmd_plan(args, argv: list[str]) -> int:
    from plutao.experiments.plan import ensure_devices, parse_bytes, plan, report
    from plutao.train.tasks import resolve

    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    name, cfg = resolve(args.preset, args.overrides)
    neural_only(cfg, "plan")
    if args.devices:
        code = ensure_devices(args.devices, argv)
        if code is not None:
            return code
    result = plan(cfg, device_memory)
    print(json.dumps(result) if args.json else report(name, result))
    return 0


def cmd_shardings(args) -> int:
    from plutao.experiments.shardings import dumps, sharding_dump
    from plutao.train.tasks import resolve

    _, cfg = resolve(args.preset, args.overrides)
    text = dumps(sharding_dump(neural_only(cfg, "shardings"), args.devices))
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_launch(args) -> int:
    from plutao.experiments.launch import launch_local

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    return launch_local(command, args.local_processes, args.devices_per_process, args.port)


def cmd_bench_scaling(args) -> int:
    from plutao.experiments.scaling import run_scaling

    result = run_scaling(tuple(args.depths))
    if args.json:
        print(json.dumps(result))
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    m = sub.add_parser("params", help="parameter count of a preset without allocating it")
    m.add_argument("preset")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_params)

    pl = sub.add_parser("plan", help="per-device memory of a training step, compiled ahead of time without allocating")
    pl.add_argument("preset")
    pl.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=64 train.batch_size=64")
    pl.add_argument("--devices", type=int, help="plan for N devices (forced host devices on a CPU machine)")
    pl.add_argument("--device-memory", help="memory of one device, e.g. 80GB: say whether the step fits")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=None)  # (run by cli.main, which passes argv on)

    la = sub.add_parser("launch", help="run a command as N local processes joined by jax.distributed (gloo on CPU)",
                        usage="plutao launch --local-processes N [--devices-per-process D] -- train ...")
    la.add_argument("--local-processes", type=int, required=True, metavar="N")
    la.add_argument("--devices-per-process", type=int, default=1, metavar="D",
                    help="CPU devices each process gets (forced host devices; default 1)")
    la.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    la.add_argument("command_args", nargs=argparse.REMAINDER, help="-- then a plutao command, e.g. -- train tiny")
    la.set_defaults(fn=cmd_launch)

    d = sub.add_parser("shardings", help="JSON of every parameter's and key activation's PartitionSpec")
    d.add_argument("preset")
    d.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=8 mesh.tensor=2")
    d.add_argument("--devices", type=int, required=True, help="number of devices of the mesh")
    d.add_argument("--out", help="write to this file instead of stdout")
    d.set_defaults(fn=cmd_shardings)

    bs = sub.add_parser("bench-scaling", help="compile time vs depth (unrolled vs scanned), host memory 8 vs 1 devices")
    bs.add_argument("--depths", type=int, nargs="+", default=[4, 16, 48])
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(fn=cmd_bench_scaling)
