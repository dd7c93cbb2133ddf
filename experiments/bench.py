"""`plutao bench`: nanoGPT's CPU benchmark (char-level Tiny Shakespeare, 4×128, context 64, batch 12).

Prints median ms/step, tokens/s, first-compile time, MFU against a matmul peak measured in the same
run, val loss after training, a profile of one step (where the time goes), KV-cache sampling speed
against full recomputation, and — when PyTorch is installed — the same recipe in PyTorch eager,
measured in the same run, as a ratio.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.counts import flops_per_token
from plutao.model.decode import generate
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig
from plutao.train.config.errors import UserError
from plutao.train.config.presets import PRESETS
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.data import corpora
from plutao.train.data import sources as data_lib
from plutao.train.loop import train
from plutao.train.prepare import prepare
from plutao.train.run.lineage import load_run
from plutao.train.run.metrics import read_metrics


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-k FLOP/s of an n³ float32 matmul: the practical peak of this machine for XLA."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2.0 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a = torch.ones((n, n))
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2.0 * n**3 / best


def profile_step(cfg: Config, workdir: Path, steps: int = 5) -> dict:
    """Trace a few training steps and group the device time by kind of operation."""
    p = prepare(cfg, None)
    state = p.trainer.init_state()
    batch = p.batches.train_rows(0)
    state, m = p.trainer.train_step(state, batch)
    jax.block_until_ready(m)
    trace_dir = workdir / "profile"
    jax.profiler.start_trace(str(trace_dir))
    for i in range(steps):
        state, m = p.trainer.train_step(state, p.batches.train_rows(i + 1))
        jax.block_until_ready(m)
    jax.profiler.stop_trace()
    files = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True))
    if not files:
        return {}
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    hlo = p.trainer.train_step.lower(state, batch).compile().as_text()
    per_op = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor", "Slinky", "PjitFunction")):
            per_op[name] += e.get("dur", 0) / steps / 1e3
    kinds = collections.Counter()
    for name, ms in per_op.items():
        body = re.search(re.escape(name) + r" = [^\n]*", hlo)
        line = body.group(0) if body else ""
        if "dot" in name or "ynn" in name or "xnn" in name or "dot(" in line or "__onednn" in line:
            kinds["matmul"] += ms
        elif "copy" in name or "transpose" in name:
            kinds["copy/transpose"] += ms
        elif "reduce" in name or "reduce(" in line:
            kinds["reductions"] += ms
        else:
            kinds["elementwise and other"] += ms
    top = [{"op": n, "ms": round(ms, 3)} for n, ms in per_op.most_common(8)]
    return {"ms_per_step_traced": round(sum(per_op.values()), 2), "by_kind_ms": {k: round(v, 2) for k, v in
                                                                                 kinds.most_common()},
            "top_ops": top}


def sampling_speed(run_dir: Path, new_tokens: int) -> dict:
    """Tokens/s for `new_tokens` new tokens: KV-cache decoding vs recomputing the context per token."""
    run = load_run(run_dir)
    tok, model = run.tokenizer, run.model
    prompt = [tok.eot_id] + tok.encode("ROMEO:")
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=new_tokens, seed=0, stop_at_eot=False)
    generate(model, [prompt], cfg, eot_id=tok.eot_id, pad_id=tok.pad_id)  # compile
    t = time.perf_counter()
    out = generate(model, [prompt], cfg, eot_id=tok.eot_id, pad_id=tok.pad_id)[0]
    cached_s = time.perf_counter() - t

    # The nanoGPT way: run the whole (cropped) context through the model for every new token. The
    # window is left-padded to a fixed width so one compiled program serves every step.
    context = run.cfg.model.context_length
    graphdef, params = nnx.split(model)
    last_logits = jax.jit(lambda p, x, first: forward_logits(nnx.merge(graphdef, p), x, first_valid_B=first)[0][:, -1])

    def window(seq):
        w = seq[-context:]
        return np.array([[tok.pad_id] * (context - len(w)) + w], np.int32), np.array([context - len(w)], np.int32)

    seq = list(prompt)
    last_logits(params, *window(seq)).block_until_ready()
    t = time.perf_counter()
    for _ in range(new_tokens):
        seq.append(int(jnp.argmax(last_logits(params, *window(seq)))))
    full_s = time.perf_counter() - t
    return {"new_tokens": len(out), "kv_cache_tokens_per_sec": len(out) / cached_s,
            "recompute_tokens_per_sec": new_tokens / full_s, "sample": tok.decode(out[:200])}


def resolve_data(data: str | None) -> str:
    if data:
        return data
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    return str(shared) if shared.is_file() else "tinyshakespeare"


def shakespeare_file(data: str | None) -> str:
    """The benchmark's text: --data, else ../shared/data's copy, else Tiny Shakespeare downloaded (or cached)."""
    data = resolve_data(data)
    if Path(data).is_file():
        return data
    if data != "tinyshakespeare":
        raise UserError(f"--data {data}: no such file; give Tiny Shakespeare's text (input.txt) with --data FILE")
    from plutao.train.data.sources import cache_root

    try:
        return str(corpora.download(data, cache_root(Config().data)))
    except UserError as e:
        raise UserError(f"{e} (for the benchmark: --data FILE)") from None


def run_bench(data: str | None = None, steps: int = 2000, torch: bool = True, sample_tokens: int = 500,
              workdir: str | None = None, steps_per_dispatch: int | None = None, out=None) -> dict:
    """Run the benchmark; the report goes to `out` (stdout by default)."""
    out = out or sys.stdout

    if steps < 20:
        raise UserError(f"--steps {steps} is too few to time (the first 10 steps are warm-up); use at least 20")
    data = shakespeare_file(data)
    tmp = tempfile.TemporaryDirectory(prefix="plutao-bench-")
    work = Path(workdir) if workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    # Timed per window of 10 steps (one log line each), the first window (compilation) left out.
    layers = dict(PRESETS["nanogpt-cpu"]) | {"data.path": data, "train.steps": steps, "train.log_every": 10,
                                             "train.eval_every": 0, "train.sample_every": 0,
                                             "train.checkpoint_every": steps, "train.peak_flops": 1.0}
    if steps_per_dispatch is not None:
        layers["train.steps_per_dispatch"] = steps_per_dispatch
    cfg = apply_overrides(Config(), layers)
    load = os.getloadavg()[0]
    peak = matmul_peak()
    print(f"machine: {os.cpu_count()} cores, load {load:.2f}; f32 matmul peak (2048³, XLA) {peak / 1e9:.0f} GFLOP/s",
          file=out)

    reference = None
    if torch:
        try:
            from plutao.experiments.torch_reference import run_torch_reference

            text = Path(data).read_text(encoding="utf-8")
            print(f"PyTorch eager reference: {steps} steps ...", file=out, flush=True)
            reference = run_torch_reference(text, steps=steps) | {"matmul_peak": torch_matmul_peak()}
        except RuntimeError as e:
            print(f"(skipping the PyTorch reference: {e})", file=out)

    print(f"plutao: {steps} steps ...", file=out, flush=True)
    run_dir = work / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    summary = train(cfg, run_dir, quiet=True)
    records = [r for r in read_metrics(run_dir) if r.get("split") == "train"]
    tokens_per_step = cfg.train.batch_size * cfg.model.context_length
    ms = [tokens_per_step / r["tokens_per_sec"] * 1e3 for r in records[1:] if "tokens_per_sec" in r]
    median_ms = float(np.median(ms))
    model_cfg = apply_overrides(cfg, {"model.vocab_size": json.loads((run_dir / "config.json").read_text())
                                      ["model"]["vocab_size"]}).model
    flops_step = flops_per_token(model_cfg) * tokens_per_step
    result = {
        "steps": steps, "ms_per_step_median": median_ms, "tokens_per_sec": tokens_per_step / median_ms * 1e3,
        "compile_seconds": summary["compile_seconds"], "val_loss": summary["val_loss"],
        "flops_per_step": flops_step, "achieved_flops": flops_step / median_ms * 1e3, "matmul_peak": peak,
        "mfu": flops_step / median_ms * 1e3 / peak, "load_before": load, "load_after": os.getloadavg()[0],
        "steps_per_dispatch": cfg.train.dispatch_slots,
    }
    from plutao.train.eval.likelihood import stream_metrics

    run = load_run(run_dir)
    val = data_lib.held_out_tokens(run.cfg.data, run.tokenizer)[0][1]
    result["val_loss_full_split"] = stream_metrics(run.trainer.graphdef, run.params, val, cfg.model.context_length,
                                                   run.tokenizer)["loss"]
    result["profile"] = profile_step(cfg, work)
    result["sampling"] = sampling_speed(run_dir, sample_tokens)
    if reference:
        result["torch"] = reference
        result["speedup_vs_torch"] = result["tokens_per_sec"] / reference["tokens_per_sec"]
    print_report(result, out)
    tmp.cleanup()
    return result


def print_report(r: dict, out=None) -> None:
    say = functools.partial(print, file=out or sys.stdout)
    say("\n=== nanoGPT CPU benchmark (char Tiny Shakespeare, 4 layers × 128, context 64, batch 12) ===")
    say(f"plutao (JAX, {r['steps_per_dispatch']} steps per dispatch):  {r['ms_per_step_median']:.1f} ms/step, {r['tokens_per_sec']:,.0f} tokens/s, "
          f"first compile {r['compile_seconds']:.1f} s, val loss {r['val_loss']:.4f} at step {r['steps']} "
          f"(20 random batches; {r['val_loss_full_split']:.4f} over the whole held-out 10%)")
    say(f"roofline: {r['flops_per_step'] / 1e9:.2f} GFLOP/step (6N + 12·L·H·d·T per token) → "
          f"{r['achieved_flops'] / 1e9:.0f} GFLOP/s = MFU {r['mfu']:.0%} of the {r['matmul_peak'] / 1e9:.0f} GFLOP/s "
          f"matmul peak; at the peak a step would take {r['flops_per_step'] / r['matmul_peak'] * 1e3:.1f} ms")
    if "torch" in r:
        t = r["torch"]
        say(f"PyTorch eager: {t['ms_per_step_median']:.1f} ms/step, {t['tokens_per_sec']:,.0f} tokens/s, "
              f"val loss {t['val_loss']:.4f} → plutao is {r['speedup_vs_torch']:.2f}× PyTorch eager")
    prof = r.get("profile") or {}
    if prof:
        kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["by_kind_ms"].items())
        say(f"one step, traced: {prof['ms_per_step_traced']:.1f} ms of device work: {kinds}")
        say("  heaviest ops: " + ", ".join(f"{o['op']} {o['ms']:.2f} ms" for o in prof["top_ops"][:5]))
    s = r["sampling"]
    say(f"sampling {s['new_tokens']} new tokens: KV cache {s['kv_cache_tokens_per_sec']:,.0f} tokens/s vs "
          f"recomputing the context {s['recompute_tokens_per_sec']:,.0f} tokens/s")
    say(f"load average {r['load_before']:.2f} before, {r['load_after']:.2f} after")
