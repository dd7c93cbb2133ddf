"""The `plutao` command line: the argument parser, and dispatch to the commands in
`plutao.experiments.commands` (one module per concern).

Every user mistake ends in one line on stderr ("plutao: error: ...") and exit code 2.

Signals. `main()` without arguments is the `plutao` entry point (and `python -m plutao.experiments`):
before anything heavy is imported it installs SIGINT/SIGTERM handlers that print one line ("plutao:
interrupted") and leave at once with os._exit(130) (SIGTERM: 143), flushing first. They raise nothing:
an exception raised asynchronously inside a C extension's initialisation (jaxlib's, during `import jax`)
crashed the process, one raised in a garbage-collection callback was swallowed (the training carried
on), and one that unwound to the top met the interpreter's and XLA's teardown mid-compilation (a
segfault). A thread woken through signal.set_wakeup_fd leaves too, so an interrupt does not wait for a
long compilation to return to Python. A training loop installs its own handlers meanwhile
(train/run/resume.py: StopFlag): it finishes the step, saves, says how to resume, and the command
exits 130/143 itself; so do the sweeps (they stop their trials) and `plutao launch`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """A command that reports a stage stopped by a signal (the pipeline): exit 128 + `signal`, in one line
    with `message` (what was kept and how to go on)."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message)
        self.signal = int(signum)
        self.message = message


def exit_code(signum: int | None) -> int:
    """The shell's code for a process stopped by `signum` (130 for SIGINT, 143 for SIGTERM); 0 for none."""
    return 128 + int(signum) if signum else 0


def interrupted_line(signum: int, message: str = "") -> str:
    what = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    return f"plutao: {what}" + (f": {message}" if message else "")


# --- the process entry point -------------------------------------------------------------------------

_console = False  # main() owns the process (the `plutao` entry point): interrupts leave with os._exit
_leaving = threading.RLock()


def _leave(signum: int, message: str = "") -> None:
    """One line, then exit 128 + signum at once (no interpreter or XLA teardown)."""
    # One caller prints and exits; another thread (the watcher and the handler both see one signal)
    # waits here. Re-entrant: a second signal arriving on the main thread while its handler is already in
    # here (flushing a slow pipe) goes straight on to exit instead of waiting on itself forever.
    _leaving.acquire()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # (a closed pipe: nothing more to say there)
            stream.flush()
    with contextlib.suppress(Exception):
        print(interrupted_line(signum, message), file=sys.stderr, flush=True)
    os._exit(exit_code(signum))


def _on_signal(signum, frame):
    _leave(signum)


def _watch(fd: int) -> None:
    """Leave as soon as a signal arrives whose handler is the entry point's (not a training loop's, a
    sweep's or a launch's), even while the main thread is inside a long call into C (a compilation)."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGTERM) and signal.getsignal(signum) is _on_signal:
                _leave(signum)


def _unraisable(hook):
    def handle(unraisable):
        # A KeyboardInterrupt (a training loop's second signal) raised inside a garbage-collection
        # callback or a __del__ is printed and dropped by Python, and the program would carry on: leave.
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _leave(getattr(unraisable.exc_value, "signal", signal.SIGINT))
        hook(unraisable)
    return handle


def _console_main() -> int:
    global _console
    _console = True
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)
    with contextlib.suppress(ValueError, OSError):
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=_watch, args=(read,), name="plutao-signals", daemon=True).start()
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    try:
        return run(sys.argv[1:])
    except KeyboardInterrupt as e:  # (a training loop's second signal, or a stage stopped by one)
        _leave(getattr(e, "signal", signal.SIGINT), getattr(e, "message", ""))
        raise


# --- the parser ----------------------------------------------------------------------------------------

class OneLineErrors(argparse.ArgumentParser):
    """argparse's usage mistakes in the same one-line form as every other error (subcommands inherit it)."""

    def error(self, message: str):
        hint = "" if "did you mean" in message else f" (see `{self.prog} --help`)"
        print(f"plutao: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2)

    def _check_value(self, action, value):
        """An unknown command or choice, with the closest one ("did you mean ...?")."""
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), choices, n=1)
            if isinstance(action, argparse._SubParsersAction):
                hint = f"; did you mean {close[0]}?" if close else ""
                raise argparse.ArgumentError(None, f"unknown command {value!r}{hint}")
            hint = f"; did you mean {close[0]}?" if close else f" (choose from {', '.join(choices)})"
            raise argparse.ArgumentError(action, f"invalid choice {value!r}{hint}")
        return super()._check_value(action, value)


def command_modules() -> tuple:
    """The command modules, in the order of `plutao --help`'s command list."""
    from plutao.experiments.commands import (
        assistant,
        benchmarks,
        chat,
        evaluation,
        inspection,
        interop,
        lora,
        report_card,
        rl,
        scale,
        serve,
        sweeps,
        training,
    )

    return (training, evaluation, inspection, assistant, rl, lora, interop, chat, report_card, scale, sweeps, benchmarks,
            serve)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="plutao", description="Train and inspect Transformer language models.")
    dist = p.add_argument_group("multi-process runs (JAX's multi-controller runtime; SLURM, Open MPI and TPU VMs "
                                "are detected without flags)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    dist.add_argument("--num-processes", type=int, metavar="N")
    dist.add_argument("--process-id", type=int, metavar="I")
    dist.add_argument("--init-timeout", type=int, default=300, metavar="S", help="seconds to wait for all processes")
    sub = p.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.register(sub)
    return p


def _is_user_error(e: Exception) -> bool:
    """A one-line error (without importing JAX to find out: a class whose module is not loaded was not raised)."""
    from plutao.train.config.errors import UserError

    kinds = [UserError]
    for module, name in (("plutao.tokenizer", "TokenizerError"), ("plutao.model.sampling", "SamplingError")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(e, tuple(kinds))


def main(argv: list[str] | None = None) -> int:
    """The command line. Without `argv` this is the process's entry point (signals handled as above);
    with one, a call inside a program (tests, the pipeline's stages) that returns the exit code."""
    if argv is None:
        return _console_main()
    return run(argv)


def run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "launch":  # everything after `--` belongs to the launched command
        args.command_args, extra = args.command_args + extra, []
    # key=value overrides may come after options (`train tiny --workdir d optim.lr=1e-3`).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from plutao.experiments import allocator, xla_cache

    xla_cache.enable()  # (before JAX is imported: programs compiled by an earlier command load from disk)
    allocator.keep_freed_memory()  # (each step's freed buffers stay mapped for the next one)
    try:
        if args.command != "launch":
            from plutao.train.parallel.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
        if args.command == "plan":
            from plutao.experiments.commands.scale import cmd_plan

            return cmd_plan(args, list(argv))
        return args.fn(args)
    except KeyboardInterrupt as e:
        if _console:  # the entry point leaves (os._exit) once the line is out
            raise
        signum = getattr(e, "signal", signal.SIGINT)
        print(interrupted_line(signum, getattr(e, "message", "")), file=sys.stderr)
        return exit_code(signum)
    except Exception as e:
        if _is_user_error(e):
            print(f"plutao: error: {e}", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        if isinstance(e, OSError):  # a full disk, a permission, an I/O error outside the checkpoints (which say more)
            where = f" ({e.filename})" if e.filename else ""
            print(f"plutao: error: {e.strerror or e}{where}; fix the cause and run the same command again "
                  "(a training resumes from its last checkpoint)", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
