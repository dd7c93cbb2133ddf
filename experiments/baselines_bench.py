"""`plutao bench-baselines`: Transformers against the models they replaced, on the same data and the
same wall-clock budget.

- `ptb` (word level, Penn Treebank, valid perplexity): interpolated Kneser-Ney 5-gram, Zaremba et
  al.'s small LSTM (2×200), and a decoder-only Transformer with about the LSTM's parameter count.
- `shakespeare` (char level, Tiny Shakespeare, val loss on the last 10%): nanoGPT's CPU Transformer
  (4×128), an LSTM with the same parameter count, and a char n-gram.

Each neural model first runs a short calibration to measure its speed, so that its learning-rate
schedule ends when the budget does (a schedule cut short by the clock would handicap it), then
trains for the budget (`train.max_seconds` caps it). Evaluation covers the whole validation text:
Transformers in non-overlapping windows of their context, recurrent models carrying their state
across 512-token windows (they have no context limit).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from plutao.model.config import ModelConfig
from plutao.model.heads import forward_logits
from plutao.train.config.errors import UserError
from plutao.train.config.presets import PRESETS
from plutao.train.config.schema import Config, apply_overrides
from plutao.train.data import sources as data_lib
from plutao.train.eval.likelihood import stream_metrics
from plutao.train.loop import train
from plutao.train.run.lineage import load_run


def _tasks(data_dir: Path) -> dict[str, dict]:
    ptb, shakespeare = data_dir / "ptb", data_dir / "tinyshakespeare.txt"
    word = {"data.path": str(ptb / "ptb.train.txt"), "data.val_path": str(ptb / "ptb.valid.txt"),
            "data.tokenizer": "word"}
    char = {"data.path": str(shakespeare), "data.tokenizer": "char"}
    quiet = {"train.sample_every": 0, "train.eval_every": 0, "train.checkpoint_every": 100000,
             "train.log_every": 10}
    return {
        "ptb": {"needs": ptb / "ptb.train.txt", "metric": "valid perplexity", "models": {
            "Kneser-Ney 5-gram": word | {"model.family": "ngram", "model.ngram_order": 5},
            "LSTM 2×200": PRESETS["lstm-small"] | word | quiet,
            "Transformer 2×192": word | quiet | {
                "model.family": "decoder", "model.n_layers": 2, "model.d_model": 192, "model.n_heads": 4,
                "model.context_length": 64, "train.batch_size": 20, "optim.lr": 2e-3, "optim.min_lr": 2e-4,
                "optim.warmup_steps": 100, "optim.weight_decay": 0.0, "optim.grad_clip": 1.0},
        }},
        "shakespeare": {"needs": shakespeare, "metric": "val loss", "models": {
            "char 7-gram (KN)": char | {"model.family": "ngram", "model.ngram_order": 7},
            "LSTM 2×224": char | quiet | {
                "model.family": "lstm", "model.n_layers": 2, "model.d_model": 224, "model.n_heads": 1,
                "model.context_length": 64, "train.batch_size": 12, "optim.lr": 3e-3, "optim.min_lr": 3e-4,
                "optim.warmup_steps": 100, "optim.weight_decay": 0.0, "optim.grad_clip": 1.0},
            "Transformer 4×128 (nanoGPT CPU)": PRESETS["nanogpt-cpu"] | char | quiet,
        }},
    }


def _config(overrides: dict) -> Config:
    return apply_overrides(Config(), overrides)


def _validation(cfg: Config, tokenizer):
    return data_lib.held_out_tokens(cfg.data, tokenizer)[0][1]


def _run_neural(name: str, overrides: dict, seconds: float, workdir: Path, say) -> dict:
    from plutao.train.loop import train

    calib = train(_config(overrides | {"train.steps": 40}), workdir / "calibration", quiet=True)
    cfg = _config(overrides)
    tokens_per_step = cfg.train.batch_size * cfg.model.context_length
    steps = max(50, int(calib["tokens_per_sec"] * seconds / tokens_per_step))
    say(f"  {name}: {calib['tokens_per_sec']:,.0f} tokens/s in calibration → {steps} steps for {seconds:.0f} s")
    t0 = time.perf_counter()
    summary = train(_config(overrides | {"train.steps": steps, "train.max_seconds": seconds * 1.1}),
                    workdir / "run", quiet=True)
    wall = time.perf_counter() - t0
    run = load_run(workdir / "run")
    window = run.task.eval_context()  # (a recurrent model carries its state across longer windows)
    val = stream_metrics(run.trainer.graphdef, run.params, _validation(run.cfg, run.tokenizer), window, run.tokenizer)
    return {"model": name, "params": summary["params"], "tokens_per_sec": summary["tokens_per_sec"],
            "steps": summary["step"], "train_seconds": summary["train_seconds"], "wall_seconds": wall,
            "val_loss": val["loss"], "val_perplexity": val["perplexity"], "val_tokens": val["tokens"]}


def _run_ngram(name: str, overrides: dict, workdir: Path) -> dict:
    t0 = time.perf_counter()
    summary = train(_config(overrides), workdir / "run", quiet=True)
    table = summary["table"]
    return {"model": name, "params": table["total"], "tokens_per_sec": summary["tokens_per_sec"], "steps": 1,
            "train_seconds": summary["fit_seconds"], "wall_seconds": time.perf_counter() - t0,
            "val_loss": summary["val_loss"], "val_perplexity": summary["val_perplexity"],
            "table_bytes": table["bytes"], "possible": float(table["possible"][str(table["order"])])}


def _grad_fn(graphdef):
    import jax
    from flax import nnx

    from plutao.train.losses import cross_entropy_sum

    @jax.jit
    def grad(params, tokens):
        def loss(params):
            logits, _ = forward_logits(nnx.merge(graphdef, params), tokens[:, :-1])
            s, c = cross_entropy_sum(logits, tokens[:, 1:])
            return s / c
        return jax.grad(loss)(params)

    return grad


def sequence_latency(lengths=(64, 256, 1024), repeats: int = 5) -> list[dict]:
    """Forward + backward time of one sequence (batch 1) as it grows: the LSTM's recurrence runs T
    steps one after another, the Transformer's layers process all T positions at once."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from plutao.model.families import build_model

    models = {"Transformer 4×128": {"family": "decoder", "n_layers": 4, "d_model": 128, "n_heads": 4},
              "LSTM 2×224": {"family": "lstm", "n_layers": 2, "d_model": 224, "n_heads": 1}}
    rows = []
    for name, kw in models.items():
        for T in lengths:
            model = build_model(ModelConfig(vocab_size=76, context_length=T, **kw), nnx.Rngs(0))
            graphdef, params = nnx.split(model)

            grad = _grad_fn(graphdef)
            tokens = jnp.asarray(np.random.default_rng(0).integers(11, 76, (1, T + 1)), jnp.int32)
            jax.block_until_ready(grad(params, tokens))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(grad(params, tokens))
                times.append(time.perf_counter() - t0)
            ms = 1e3 * min(times)
            rows.append({"model": name, "length": T, "ms": ms, "us_per_token": 1e3 * ms / T})
    return rows


def run_baselines(task: str, minutes: float, data_dir: Path, workdir: str | None = None, out=sys.stdout) -> dict:
    tasks = _tasks(data_dir)
    if task not in tasks:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(tasks)}")
    spec = tasks[task]
    if not spec["needs"].is_file():
        raise UserError(f"{spec['needs']} is missing; pass --data-dir pointing at a folder with ptb/ and "
                        "tinyshakespeare.txt")
    if minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {minutes}")

    def say(msg):
        print(msg, file=out, flush=True)

    if workdir and Path(workdir).exists() and any(Path(workdir).iterdir()):
        raise UserError(f"--workdir {workdir} is not empty; the benchmark trains from scratch, give a new folder")
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"plutao-baselines-{task}-"))
    say(f"{task}: each neural model trains for {minutes:g} min (run directories under {root})")
    rows = []
    for i, (name, overrides) in enumerate(spec["models"].items()):
        sub = root / f"{i}"
        if overrides.get("model.family") == "ngram":
            rows.append(_run_ngram(name, overrides, sub))
        else:
            rows.append(_run_neural(name, overrides, minutes * 60, sub, say))
        r = rows[-1]
        say(f"  {name}: {spec['metric']} {r['val_perplexity' if task == 'ptb' else 'val_loss']:.3f}")
    say(table(task, rows))
    result = {"task": task, "minutes": minutes, "rows": rows}
    if task == "shakespeare":
        latency = sequence_latency()
        say("one sequence (batch 1), forward + backward:")
        say("| model | T=" + " | T=".join(str(r["length"]) for r in latency[:3]) + " |")
        say("|---|---|---|---|")
        for name in dict.fromkeys(r["model"] for r in latency):
            cells = [f"{r['ms']:.1f} ms ({r['us_per_token']:.0f} µs/token)" for r in latency if r["model"] == name]
            say(f"| {name} | " + " | ".join(cells) + " |")
        result["sequence_latency"] = latency
    return result


def table(task: str, rows: list[dict]) -> str:
    head = ("| model | params | tokens/s (train) | train time | valid perplexity |" if task == "ptb"
            else "| model | params | tokens/s (train) | train time | val loss (nats/char) |")
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        metric = f"{r['val_perplexity']:.1f}" if task == "ptb" else f"{r['val_loss']:.3f}"
        params = f"{r['params'] / 1e6:.2f}M" + (" n-grams" if "table_bytes" in r else "")
        lines.append(f"| {r['model']} | {params} | {r['tokens_per_sec']:,.0f} | {r['train_seconds']:.0f} s | "
                     f"{metric} |")
    return "\n".join(lines)
