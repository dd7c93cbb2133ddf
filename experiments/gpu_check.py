"""The accelerator check: tokens/s and MFU of the GPT-2 124M preset at a few batch sizes.

    python -m plutao.experiments.gpu_check [--batch-sizes 8 16 32] [--steps 30]

Random tokens (throughput does not depend on the data), bf16 compute with f32 parameters, fused
attention (`jax.nn.dot_product_attention`, cuDNN where available), scanned layers. MFU is
reported against a bf16 matmul peak measured on the device in the same run and against the
vendor's dense bf16 figure when the device is known. Runs on CPU too (use --preset tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from plutao.model.counts import flops_per_token
from plutao.model.presets import MODEL_PRESETS
from plutao.train.config.schema import MeshConfig, OptimConfig
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel.sharding import make_mesh
from plutao.train.run.metrics import published_peak
from plutao.train.step import Trainer, global_batch


def bf16_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def run(preset: str, batch_sizes: list[int], steps: int, attention: str) -> list[dict]:
    cfg = dataclasses.replace(MODEL_PRESETS[preset], dtype="bfloat16", attention=attention, scan_layers=True).resolved()
    mesh = make_mesh(MeshConfig())
    kind = jax.devices()[0].device_kind
    vendor = published_peak(kind, jnp.bfloat16)
    peak = bf16_matmul_peak(8192 if jax.default_backend() != "cpu" else 1024)
    rows = []
    for batch in batch_sizes:
        optim = OptimConfig()
        trainer = Trainer(cfg, make_optimizer(optim, 1000, cfg), lr_schedule(optim, 1000), mesh, 0)
        state = trainer.init_state()
        tokens = global_batch(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.context_length + 1))
                              .astype(np.int32), mesh)
        t = time.perf_counter()
        state, m = trainer.train_step(state, tokens)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            state, m = trainer.train_step(state, tokens)
        jax.block_until_ready(m)
        step_s = (time.perf_counter() - t) / steps
        tps = batch * cfg.context_length / step_s
        achieved = tps * flops_per_token(cfg)
        rows.append({"device": kind, "batch": batch, "ms_per_step": step_s * 1e3, "tokens_per_sec": tps,
                     "compile_seconds": compile_s, "achieved_tflops": achieved / 1e12,
                     "mfu_vs_measured_peak": achieved / peak, "measured_bf16_peak_tflops": peak / 1e12,
                     "mfu_vs_vendor_peak": achieved / vendor if vendor else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--attention", default="auto", choices=["naive", "xla", "cudnn", "auto"])
    args = ap.parse_args(argv)
    run(args.preset, args.batch_sizes, args.steps, args.attention)


if __name__ == "__main__":
    main()
