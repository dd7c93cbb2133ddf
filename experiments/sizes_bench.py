"""`plutao bench-sizes`: how plutao's training throughput compares with PyTorch as the model grows.

nanoGPT's CPU recipe (char-level Tiny Shakespeare, AdamW, clipping, cosine schedule, float32, no
dropout or biases) at about 1M, 10M and 50M parameters; PyTorch's embedding gets the rows of plutao's
special tokens too, so both train the same shapes. Each size is trained for a few steps by
plutao (the steps the train loop runs: `train.steps_per_dispatch` steps per dispatch), by the same
model in PyTorch eager and by `torch.compile` of it (experiments/torch_reference.py), one after
another in one process. Prints a table of tokens/s and ratios, with where plutao's step spends its
time at each size (matmuls against the small operations, from a traced step), and draws the
tokens/s and the ratios against the parameter count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from plutao.model.counts import count_params
from plutao.train.config.errors import UserError
from plutao.train.config.presets import PRESETS
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.prepare import prepare


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    context: int
    batch: int
    steps: int  # timed steps (after one warm-up dispatch)


SIZES = {
    "1m": Size("1m", 4, 128, 4, 64, 12, 200),  # nanoGPT's CPU benchmark itself (0.8M)
    "10m": Size("10m", 6, 384, 6, 256, 8, 30),  # nanoGPT's shakespeare-char shape (10.7M), batch 8
    "50m": Size("50m", 8, 768, 12, 256, 4, 12),  # GPT-2's width, 8 layers (57M)
}


def parse_sizes(text: str) -> list[Size]:
    """"1m,10m" or custom shapes "LAYERSxWIDTHxHEADS:CONTEXTxBATCH:STEPS" (e.g. 2x64x2:32x4:20)."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        if item in SIZES:
            out.append(SIZES[item])
            continue
        try:
            shape, run, steps = item.split(":")
            layers, width, heads = (int(x) for x in shape.split("x"))
            context, batch = (int(x) for x in run.split("x"))
            size = Size(item, layers, width, heads, context, batch, int(steps))
            if min(layers, width, heads, context, batch, size.steps) < 1:
                raise ValueError
            out.append(size)
        except ValueError:
            raise UserError(f"--sizes {item!r}: give one of {', '.join(SIZES)} or LAYERSxWIDTHxHEADS:CONTEXTxBATCH:STEPS "
                            "(e.g. 2x64x2:32x4:20; each number ≥ 1)") from None
    if not out:
        raise UserError("--sizes is empty; give e.g. 1m,10m,50m")
    return out


def size_config(size: Size, data: str) -> Config:
    layers = dict(PRESETS["nanogpt-cpu"]) | {
        "data.path": data, "model.n_layers": size.n_layers, "model.d_model": size.d_model,
        "model.n_heads": size.n_heads, "model.context_length": size.context, "train.batch_size": size.batch,
        "train.steps": 2000, "train.eval_every": 0, "train.sample_every": 0}
    return apply_overrides(Config(), layers)


def time_plutao(cfg: Config, steps: int) -> dict:
    """Median ms per step over blocks of train.steps_per_dispatch steps, after one warm-up block."""
    p = prepare(cfg, None)
    trainer, k = p.trainer, cfg.train.dispatch_slots  # (the blocks the train loop runs between its log lines)
    state = trainer.init_state()
    t = time.perf_counter()
    state, m = trainer.train_block(state, p.batches.sharded_block(range(k), k, trainer.mesh), np.int32(k))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    per_step, step = [], k
    while step < k + steps:
        n = min(k, k + steps - step)
        t = time.perf_counter()  # (drawing the batches included, as PyTorch's timing includes its own)
        batches = p.batches.sharded_block(range(step, step + n), k, trainer.mesh)
        state, m = trainer.train_block(state, batches, np.int32(n))
        jax.block_until_ready(m)
        per_step.append((time.perf_counter() - t) / n)
        step += n
    ms = float(np.median(per_step)) * 1e3
    return {"ms_per_step": ms, "tokens_per_sec": cfg.train.batch_size * cfg.model.context_length / ms * 1e3,
            "first_dispatch_seconds": compile_s, "params": count_params(p.cfg.model)["total"],
            "loss": float(m["loss"]), "vocab": p.cfg.model.vocab_size}


def time_torch(text: str, size: Size, compile: bool, vocab: int) -> dict:
    from plutao.experiments.torch_reference import run_torch_reference

    warm = 3 if compile else 2  # (torch.compile compiles in the first step, and again as the schedule settles)
    r = run_torch_reference(text, steps=size.steps + warm, batch_size=size.batch, context=size.context,
                            n_layers=size.n_layers, n_heads=size.n_heads, d_model=size.d_model, compile=compile,
                            eval_batches=1, timed_from=warm, vocab=vocab)
    return {"ms_per_step": r["ms_per_step_median"], "tokens_per_sec": r["tokens_per_sec"], "params": r["params"]}


def run_bench_sizes(sizes: list[Size], data: str | None = None, torch: bool = True, compile: bool = True,
                    profile: bool = True, plot: str | None = None, out=None) -> dict:
    from plutao.experiments.bench import profile_step, shakespeare_file

    out = out or sys.stdout
    data = shakespeare_file(data)
    text = Path(data).read_text(encoding="utf-8")
    if torch:
        try:
            import torch as _  # noqa: F401
        except ImportError:
            raise UserError("PyTorch is not installed; pip install 'plutao[bench]' (torch==2.13.0), "
                            "or pass --no-torch") from None
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load {load:.2f}", file=out, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plutao-sizes-") as work:
        for size in sizes:
            cfg = size_config(size, data)
            row = {"size": size.name, "n_layers": size.n_layers, "d_model": size.d_model, "context": size.context,
                   "batch": size.batch, "timed_steps": size.steps}
            print(f"{size.name}: plutao ...", file=out, flush=True)
            row["plutao"] = time_plutao(cfg, size.steps)
            row["params"] = row["plutao"]["params"]
            if torch:
                for name, compiled in (("torch_eager", False), ("torch_compile", True))[:2 if compile else 1]:
                    print(f"{size.name}: {name.replace('_', ' ')} ...", file=out, flush=True)
                    row[name] = time_torch(text, size, compiled, row["plutao"]["vocab"])
                    row[f"vs_{name}"] = row["plutao"]["tokens_per_sec"] / row[name]["tokens_per_sec"]
            if profile:
                row["profile"] = profile_step(cfg, Path(work) / size.name, steps=2)
            rows.append(row)
    result = {"rows": rows, "load_before": load, "load_after": os.getloadavg()[0],
              "steps_per_dispatch": size_config(sizes[0], data).train.dispatch_slots}
    if plot:
        result["plot"] = draw(rows, plot)
    print_table(result, out)
    return result


def matmul_share(profile: dict) -> float | None:
    kinds = profile.get("by_kind_ms") or {}
    total = sum(kinds.values())
    return kinds.get("matmul", 0.0) / total if total else None


def print_table(result: dict, out) -> None:
    rows = result["rows"]
    def say(text=""):
        print(text, file=out)

    def fmt(r, name):
        return f"{r[name]['tokens_per_sec']:,.0f}" if name in r else "—"

    def ratio(r, name):
        return f"{r[name]:.2f}×" if name in r else "—"

    say(f"\n=== training throughput by size (nanoGPT's recipe, float32; plutao with {result['steps_per_dispatch']} "
        "steps per dispatch) ===")
    say("| size | parameters | context × batch | plutao tokens/s | PyTorch eager | torch.compile | × eager | × compile "
        "| matmul share of plutao's step |")
    say("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = matmul_share(r.get("profile") or {})
        say(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['context']} × {r['batch']} | {fmt(r, 'plutao')} | "
            f"{fmt(r, 'torch_eager')} | {fmt(r, 'torch_compile')} | {ratio(r, 'vs_torch_eager')} | {ratio(r, 'vs_torch_compile')} | "
            f"{'—' if share is None else f'{share:.0%}'} |")
    for r in rows:
        prof = r.get("profile") or {}
        if prof:
            kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["by_kind_ms"].items())
            say(f"{r['size']}: one traced step {prof['ms_per_step_traced']:.1f} ms: {kinds}")
    say(f"load average {result['load_before']:.2f} before, {result['load_after']:.2f} after")
    if "plot" in result:
        say(f"plot: {result['plot']}")


def draw(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [r["params"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (("plutao", "plutao (JAX)"), ("torch_eager", "PyTorch eager"),
                        ("torch_compile", "torch.compile")):
        if all(name in r for r in rows):
            a.plot(params, [r[name]["tokens_per_sec"] for r in rows], "o-", label=label)
    for name, label in (("vs_torch_eager", "× PyTorch eager"), ("vs_torch_compile", "× torch.compile")):
        if all(name in r for r in rows):
            b.plot(params, [r[name] for r in rows], "o-", label=label)
    b.axhline(1.0, color="grey", lw=0.8)
    for ax, title in ((a, "training tokens/s"), (b, "plutao's throughput ratio")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.legend()
    a.set_yscale("log")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
