"""`plutao train model.family=ngram`: fit an n-gram table by counting, with the same run directory,
tokenizer, held-out split, metrics and summary as a gradient-trained run.

Its "checkpoint" is RUN_DIR/ngram.npz; there is no step loop (step 1 = the fitted table).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from plutao.model.baselines.ngram import NGramLM
from plutao.train.config.errors import UserError
from plutao.train.run.metrics import MetricsLog

TABLE_FILE = "ngram.npz"


def _streams(p) -> tuple[np.ndarray, np.ndarray]:
    if len(p.batches.splits) > 1:
        raise UserError("model.family=ngram counts one corpus; give a single data.path source")
    split = p.batches.splits[0]
    return np.asarray(split.train, np.int64), np.asarray(split.val, np.int64)


def train_ngram(p, run_dir: Path, write_run_files, log) -> dict:
    cfg = p.cfg
    train_tokens, val_tokens = _streams(p)
    path = run_dir / TABLE_FILE
    t0 = time.perf_counter()
    fitted_now = not path.is_file()
    if fitted_now:
        model = NGramLM.from_config(train_tokens, cfg.model)
    else:
        model = NGramLM.load(path)
        log(f"{run_dir} already holds a fitted {model.order}-gram table; reporting it")
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    logprobs = model.logprobs(val_tokens)
    score_s = time.perf_counter() - t1
    val_loss = float(-np.mean(logprobs))
    table = model.table_size()
    if fitted_now and jax.process_index() == 0:  # one writer, whatever the process count
        write_run_files()
        tmp = run_dir / f"{TABLE_FILE}.tmp.npz"
        model.save(tmp)
        tmp.replace(path)
        metrics = MetricsLog(run_dir, enabled=True, start_step=0)
        try:
            metrics.write({"step": 1, "split": "train", "loss": float(-np.mean(model.logprobs(train_tokens[:200_000]))),
                           "tokens_per_sec": len(train_tokens) / max(fit_s, 1e-9)})
            metrics.write({"step": 1, "split": "val", "loss": val_loss, "perplexity": math.exp(val_loss)})
            metrics.write({"step": 1, "table": json.loads(json.dumps(table, default=float))})
        finally:
            metrics.close()
    log(f"done: {model.order}-gram ({cfg.model.ngram_smoothing}), {table['total']:,} stored n-grams of "
        f"{float(table['possible'][model.order]):.3g} possible, fitted in {fit_s:.2f} s; val loss {val_loss:.4f} "
        f"(perplexity {math.exp(val_loss):.2f}) over {len(val_tokens) - 1:,} tokens in {score_s:.2f} s\n"
        f"  table: {path}")
    return {"step": 1, "val_loss": val_loss, "val_perplexity": math.exp(val_loss), "train_loss": None,
            "tokens_per_sec": len(train_tokens) / max(fit_s, 1e-9), "fit_seconds": fit_s, "params": table["total"],
            "table": json.loads(json.dumps(table, default=float)), "run_dir": str(run_dir),
            "checkpoint": str(path), "plot": None}


def load_ngram(run_dir: Path) -> NGramLM:
    path = Path(run_dir) / TABLE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {TABLE_FILE}; train it first (`plutao train --workdir {run_dir} ...`)")
    return NGramLM.load(path)
