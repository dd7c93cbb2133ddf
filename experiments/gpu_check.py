"""The accelerator check: training MFU, decoding and serving throughput of the GPT-2 124M preset.

    python -m plutao.experiments.gpu_check --all [--json FILE]      (about 5 minutes on one GPU)
    python -m plutao.experiments.gpu_check [--batch-sizes 8 16 32] [--steps 30]   (training only)

Training: random tokens (throughput does not depend on the data), bf16 compute with f32 parameters,
fused attention (`jax.nn.dot_product_attention`, cuDNN where available), scanned layers, at batch
8/16/32. MFU is reported against a bf16 matmul peak measured on the device in the same run and
against the vendor's dense bf16 figure when the device is known.
Decoding (--all): tokens/s of the slot sampler (model/decode.py) at 1, 32 and 128 slots, random
weights and prompts, 128 new tokens each.
Serving (--all): `plutao bench-serve` at concurrency 32 on a run of the same shape made by one
training step (a byte tokenizer, the vocabulary padded to GPT-2's 50,304 rows).
Everything goes into one JSON and one table. Runs on CPU too (--preset tiny, for a quick check).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

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


def decode(preset: str, slot_counts: list[int], new_tokens: int, prompt_tokens: int = 64) -> list[dict]:
    """Tokens/s of the slot sampler with n prompts at once (n slots), after a first call that compiles."""
    from flax import nnx

    from plutao.model.decode import generate
    from plutao.model.families import build_model
    from plutao.model.sampling import SamplingConfig

    cfg = dataclasses.replace(MODEL_PRESETS[preset], dtype="bfloat16").resolved()
    model = build_model(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    if not 0 < new_tokens < cfg.context_length:
        raise SystemExit(f"gpu_check: --new-tokens {new_tokens} must be between 1 and the context length "
                         f"{cfg.context_length} - 1 of the preset {preset}")
    prompt_tokens = min(prompt_tokens, cfg.context_length - new_tokens)
    rows = []
    for n in slot_counts:
        prompts = rng.integers(2, cfg.vocab_size, (n, prompt_tokens)).tolist()
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, seed=0, stop_at_eot=False)
        t = time.perf_counter()
        generate(model, prompts, sampling, eot_id=1, pad_id=0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(model, prompts, sampling, eot_id=1, pad_id=0)
        seconds = time.perf_counter() - t
        tokens = sum(len(o) for o in out)
        # (the call's time per decode step: the prefill of the n prompts and the host's share included)
        rows.append({"slots": n, "generated_tokens": tokens, "tokens_per_sec": tokens / seconds,
                     "ms_per_decode_step": seconds / new_tokens * 1e3, "first_call_seconds": first})
        print(json.dumps({"decode": rows[-1]}), flush=True)
    return rows


def serve(preset: str, concurrency: int, max_tokens: int, work: Path) -> dict:
    """`plutao bench-serve` at one concurrency on a run of the preset's shape (one training step)."""
    from plutao.experiments.serve_bench import run_serve_bench
    from plutao.train.config.schema import Config, apply_overrides
    from plutao.train.loop import train

    model = {f"model.{k}": v for k, v in dataclasses.asdict(MODEL_PRESETS[preset]).items()}
    vocab = max(MODEL_PRESETS[preset].vocab_size, 512)
    cfg = apply_overrides(Config(), model | {
        "model.vocab_size": -(-vocab // 64) * 64, "model.dtype": "bfloat16", "data.tokenizer": "byte",
        "train.steps": 1, "train.batch_size": 8, "train.eval_every": 0, "train.sample_every": 0,
        "train.eval_batches": 1, "train.checkpoint_every": 1})
    run_dir = work / "served"
    train(cfg, run_dir, quiet=True)
    result = run_serve_bench(str(run_dir), requests=2 * concurrency, levels=[concurrency], max_tokens=max_tokens,
                             slots=concurrency, chunk=8, soak=0.0, soak_concurrency=0, out=io.StringIO())
    [level] = result["levels"]
    row = {"concurrency": concurrency, "slots": concurrency, "max_tokens": max_tokens,
           "tokens_per_sec": level["tokens_per_s"], "requests_per_sec": level["requests_per_s"],
           "ttft_p50_ms": level["ttft_p50"] * 1e3, "latency_p50_s": level["latency_p50"], "errors": level["errors"],
           "one_at_a_time_tokens_per_sec": result["one_at_a_time"]["tokens_per_s"]}
    print(json.dumps({"serve": row}), flush=True)
    return row


def table(result: dict) -> str:
    lines = [f"=== accelerator check: {result['preset']} on {result['device']} ({result['backend']}) ==="]
    lines += ["| training, bf16 | ms/step | tokens/s | TFLOP/s | MFU (measured peak) | MFU (vendor peak) |",
              "|---|---|---|---|---|---|"]
    for r in result["train"]:
        vendor = f"{r['mfu_vs_vendor_peak']:.0%}" if r["mfu_vs_vendor_peak"] else "—"
        lines.append(f"| batch {r['batch']} | {r['ms_per_step']:.1f} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['achieved_tflops']:.1f} | {r['mfu_vs_measured_peak']:.0%} | {vendor} |")
    if result.get("decode"):
        lines += ["", "| decoding (slot sampler) | tokens/s | ms per step (with the prefill) | first call, s |", "|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {r['slots']} slots | {r['tokens_per_sec']:,.0f} | {r['ms_per_decode_step']:.2f} | "
                         f"{r['first_call_seconds']:.1f} |")
    if result.get("serve"):
        r = result["serve"]
        lines += ["", "| serving (`plutao serve`) | tokens/s | requests/s | TTFT p50 | errors | one at a time |",
                  "|---|---|---|---|---|---|",
                  (f"| concurrency {r['concurrency']} | {r['tokens_per_sec']:,.0f} | {r['requests_per_sec']:.2f} | "
                   f"{r['ttft_p50_ms']:.0f} ms | {r['errors']} | {r['one_at_a_time_tokens_per_sec']:,.0f} tokens/s |")]
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="training, decoding and serving (else training only)")
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--attention", default="auto", choices=["naive", "xla", "cudnn", "auto"])
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 32, 128], help="decoding: slots (prompts at once)")
    ap.add_argument("--new-tokens", type=int, default=128, help="decoding: new tokens per prompt")
    ap.add_argument("--concurrency", type=int, default=32, help="serving: concurrent clients")
    ap.add_argument("--serve-tokens", type=int, default=64, help="serving: max_tokens per request")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    result = {"preset": args.preset, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "train": run(args.preset, args.batch_sizes, args.steps, args.attention)}
    if args.all:
        result["decode"] = decode(args.preset, args.slots, args.new_tokens)
        with tempfile.TemporaryDirectory(prefix="plutao-gpu-check-") as work:
            result["serve"] = serve(args.preset, args.concurrency, args.serve_tokens, Path(work))
    result["seconds"] = time.perf_counter() - start
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
