"""`plutao launch --local-processes N -- CMD`: N local processes joined by jax.distributed over loopback.

What tests and laptops use to exercise multi-host code: each process gets D forced CPU devices and
talks to the others through gloo collectives. Process 0's output streams through; the others stay
silent unless one fails, in which case its last lines are shown and the rest are stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from plutao.train.config.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward_stdout(stream) -> None:
    """Process 0's stdout, less gloo's connection chatter (so `--json` output stays parseable)."""
    for line in stream:
        if not line.startswith("[Gloo] "):
            sys.stdout.write(line)
            sys.stdout.flush()


def launch_local(command: list[str], n: int, devices_per_process: int = 1, port: int = 0) -> int:
    if n < 1 or devices_per_process < 1:
        raise UserError("--local-processes and --devices-per-process must be ≥ 1")
    if not command or command[0] == "launch":
        raise UserError("give the command to run after `--`, e.g. plutao launch --local-processes 2 -- train tiny")
    port = port or free_port()
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}",
        "PYTHONUNBUFFERED": "1",
    }
    logs = Path(tempfile.mkdtemp(prefix="plutao-launch-"))
    procs = []
    for i in range(n):
        argv = [sys.executable, "-m", "plutao.experiments", "--coordinator", f"127.0.0.1:{port}",
                "--num-processes", str(n), "--process-id", str(i), *command]
        out = None if i == 0 else open(logs / f"process-{i}.log", "w")  # noqa: SIM115 (closed below)
        if i == 0:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
            forwarder = threading.Thread(target=_forward_stdout, args=(proc.stdout,), daemon=True)
            forwarder.start()
        else:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append((proc, out))

    def forward(signum, frame):
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    # A process stopped by SIGINT/SIGTERM (exit 130/143) saved and stopped at a step every process
    # agreed on; the others stop there too. Any other exit code is a failure.
    stopped = (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)
    try:
        failed = None
        while any(proc.poll() is None for proc, _ in procs):
            for i, (proc, _) in enumerate(procs):
                if proc.poll() not in (None, *stopped) and failed is None:
                    failed = i
                    for other, _ in procs:  # a collective would wait for the dead process forever
                        if other.poll() is None:
                            other.terminate()
            time.sleep(0.1)
        codes = [proc.returncode for proc, _ in procs]
        forwarder.join(timeout=10)  # the last lines of process 0's output
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _, out in procs:
            if out:
                out.close()
    if failed is None:
        failed = next((i for i, c in enumerate(codes) if c not in stopped), None)
    if failed is None:  # the logs are only worth keeping when something went wrong
        shutil.rmtree(logs, ignore_errors=True)
    elif failed != 0:
        tail = (logs / f"process-{failed}.log").read_text().splitlines()[-15:]
        print(f"plutao launch: process {failed} exited with {codes[failed]}; logs of processes 1-{n - 1} kept in "
              f"{logs}; its last lines:", file=sys.stderr)
        print("\n".join("  " + line for line in tail), file=sys.stderr)
    elif n > 1:  # process 0 printed its own error; the others' logs may tell more
        print(f"plutao launch: process 0 exited with {codes[0]}; logs of processes 1-{n - 1} kept in {logs}",
              file=sys.stderr)
    else:
        shutil.rmtree(logs, ignore_errors=True)  # a single process leaves no log behind
    return next((c for c in codes if c), 0) if failed is None else (codes[failed] or 1)
