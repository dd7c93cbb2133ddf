"""`plutao plan PRESET mesh.fsdp=… [--devices N] [--device-memory 80GB]`: will a step fit?

Compiles the training step ahead of time for N devices from abstract shapes (no parameter is ever
allocated) and reads the per-device memory from the compiled executable's memory analysis. On a
CPU machine the N devices are forced host devices: the process re-runs itself with that count.

Parameters, optimizer state and batch are exact (they follow from shapes and shardings). The
temporaries are what the compiling backend's buffer assignment needs: planned on CPU they are an
upper bound for an accelerator, and XLA's CPU scheduler hoists rematerialised computations, so
`model.remat` does not shrink them here as it does on GPU/TPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jax
import numpy as np

from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel import sharding
from plutao.train.step import Trainer
from plutao.train.tasks import TokenIds, task_for_model

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise UserError(f"--device-memory {text!r} is not a size; write e.g. 80GB, 16GiB or 24e9")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return str(n)


def ensure_devices(n: int, argv: list[str]) -> int | None:
    """Re-run this command with n forced host devices when this process has another count."""
    if jax.device_count() == n:
        return None
    if jax.default_backend() != "cpu":
        raise UserError(f"--devices {n} but this machine has {jax.device_count()} {jax.default_backend()} devices; "
                        "plan on a CPU machine (forced host devices) or pass --devices "
                        f"{jax.device_count()}")
    if os.environ.get("PLUTAO_PLAN_CHILD"):
        raise AssertionError("forced host device count did not take effect")
    env = os.environ | {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}",
                        "JAX_PLATFORMS": "cpu", "PLUTAO_PLAN_CHILD": "1"}
    return subprocess.run([sys.executable, "-m", "plutao.experiments", *argv], env=env, check=False).returncode


def sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape)) * leaf.dtype.itemsize
    return total


def plan(cfg: Config, device_memory: float | None = None) -> dict:
    model = cfg.shaped_model()
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisibility(model, mesh, cfg.train.batch_size, cfg.train.grad_accum)
    trainer = Trainer(model, make_optimizer(cfg.optim, cfg.train.steps, model),
                      lr_schedule(cfg.optim, cfg.train.steps), mesh, cfg.train.seed, cfg.train.grad_accum,
                      task=task_for_model(model, TokenIds(vocab_limit=model.vocab_size),
                                          label_smoothing=cfg.optim.label_smoothing, mask_rate=cfg.train.mask_rate))
    trainer.split.check()
    state = trainer.abstract_sharded_state()
    # The task's named batch for a full-length row (translation: a source of L and a target of L + 1).
    task = trainer.task
    rows = np.zeros((cfg.train.batch_size, task.row_width(model.context_length)), np.int32)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_shardings[k])
             for k, v in task.named(rows).items()}
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    params = sharded_bytes(state["params"])
    opt = sharded_bytes(state["opt_state"])
    # Training sends train.dispatch_slots steps' batches at once (the program compiled here is one
    # step, whose temporaries a block's device loop reuses): the other batches add to the arguments.
    block_extra = sharded_bytes(batch) * (cfg.train.dispatch_slots - 1)
    total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + block_extra)
    out = {
        "devices": jax.device_count(), "mesh": dict(mesh.shape), "params_bytes": params, "opt_state_bytes": opt,
        "batch_bytes": sharded_bytes(batch), "dispatch_batches_extra_bytes": block_extra,
        "temp_bytes": mem.temp_size_in_bytes,
        "arguments_bytes": mem.argument_size_in_bytes, "outputs_not_aliased_bytes":
            mem.output_size_in_bytes - mem.alias_size_in_bytes,
        "total_bytes": total, "compile_seconds": compile_s,
        "params_whole": [{"name": w.name, "mesh_axis": w.mesh_axis, "dimension": w.logical, "size": w.dim}
                         for w in trainer.split.whole],
        "whole_extra_bytes": trainer.split.wasted_bytes(trainer.moments_per_param),
        "split_note": trainer.split.note(trainer.moments_per_param),
    }
    if device_memory:
        out |= {"device_memory": device_memory, "fits": total <= device_memory}
    return out


def report(name: str, r: dict) -> str:
    devices = f"{r['devices']} device{'s' if r['devices'] != 1 else ''}"
    lines = [f"{name} on {devices}, mesh {r['mesh']} (compiled ahead of time in {r['compile_seconds']:.1f} s)",
             "per device:",
             f"  parameters        {human(r['params_bytes']):>12}",
             f"  optimizer state   {human(r['opt_state_bytes']):>12}",
             f"  batch             {human(r['batch_bytes']):>12}"
             + (f"   (+ {human(r['dispatch_batches_extra_bytes'])} for the other steps of a dispatch)"
                if r.get("dispatch_batches_extra_bytes") else ""),
             f"  temporaries       {human(r['temp_bytes']):>12}   (activations, gradients, workspace)",
             f"  total             {human(r['total_bytes']):>12}   (arguments + temporaries + outputs not donated"
             + (", + the dispatch's batches)" if r.get("dispatch_batches_extra_bytes") else ")")]
    if r.get("split_note"):
        lines.append(r["split_note"])
    if "fits" in r:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {human(r['device_memory'])} per device "
                     f"({r['total_bytes'] / r['device_memory']:.0%} used)")
    return "\n".join(lines)
