"""Joining a multi-process run: `jax.distributed.initialize`, from flags or a detected cluster.

JAX's own multi-controller runtime does the work: every process runs the same program, owns its
local devices, and jitted steps span all of them. Off accelerators (tests, laptops) processes talk
through gloo CPU collectives over loopback.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from plutao.train.config.errors import UserError

CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID")


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Fail with a clear message instead of JAX's abort when the coordinator never answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(f"cannot reach the coordinator at {host}:{port} after {timeout_s:.0f} s ({e.strerror or e}); "
                                "start process 0 first, check --coordinator, or raise --init-timeout") from None
            time.sleep(0.25)


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int = 300) -> None:
    """Join the run described by the flags, or the cluster JAX detects (SLURM, Open MPI, TPU VMs)."""
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    detected = any(os.environ.get(k) for k in CLUSTER_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1
    if not explicit and not detected:
        return
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise UserError("--coordinator HOST:PORT, --num-processes N and --process-id I go together; give all three")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator {coordinator!r} must look like HOST:PORT, e.g. 10.0.0.1:1234")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id} must be in [0, {num_processes})")
        if process_id != 0:
            _wait_for_coordinator(host, int(port), timeout_s)
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit and process_id == 0:
        print(f"plutao: coordinating {num_processes} process{'es' if num_processes != 1 else ''} at {coordinator} "
              f"(waiting up to {timeout_s} s)",
              file=sys.stderr)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any (a blocking all-gather of one bit)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    """One line to stderr, from process 0 only (above a progress bar, if one is shown)."""
    if is_main_process():
        tqdm.write(msg, file=sys.stderr)
