"""The `plutao` command line: the argument parser, and dispatch to the commands in
`plutao.experiments.commands` (one module per concern).

Every user mistake ends in one line on stderr ("plutao: error: ...") and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from plutao.experiments.commands import (
    assistant,
    benchmarks,
    chat,
    evaluation,
    inspection,
    lora,
    report_card,
    rl,
    scale,
    sweeps,
    training,
)
from plutao.experiments.commands.scale import cmd_plan

# The order of `plutao --help`'s command list.
COMMAND_MODULES = (training, evaluation, inspection, assistant, rl, lora, chat, report_card, scale, sweeps, benchmarks)


def _user_errors():
    from plutao.model.sampling import SamplingError
    from plutao.tokenizer import TokenizerError
    from plutao.train.config.errors import UserError

    return (UserError, TokenizerError, SamplingError)


class OneLineErrors(argparse.ArgumentParser):
    """argparse's usage mistakes in the same one-line form as every other error (subcommands inherit it)."""

    def error(self, message: str):
        print(f"plutao: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="plutao", description="Train and inspect Transformer language models.")
    dist = p.add_argument_group("multi-process runs (JAX's multi-controller runtime; SLURM, Open MPI and TPU VMs "
                                "are detected without flags)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    dist.add_argument("--num-processes", type=int, metavar="N")
    dist.add_argument("--process-id", type=int, metavar="I")
    dist.add_argument("--init-timeout", type=int, default=300, metavar="S", help="seconds to wait for all processes")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "launch":  # everything after `--` belongs to the launched command
        args.command_args, extra = args.command_args + extra, []
    # key=value overrides may come after options (`train tiny --workdir d optim.lr=1e-3`).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command != "launch":
            from plutao.train.parallel.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
        if args.command == "plan":
            return cmd_plan(args, list(argv if argv is not None else sys.argv[1:]))
        return args.fn(args)
    except _user_errors() as e:
        print(f"plutao: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("plutao: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a permission, an I/O error outside the checkpoints (which say more)
        where = f" ({e.filename})" if e.filename else ""
        print(f"plutao: error: {e.strerror or e}{where}; fix the cause and run the same command again "
              "(a training resumes from its last checkpoint)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
