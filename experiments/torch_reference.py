"""PyTorch eager reference: nanoGPT's CPU char-level Shakespeare recipe, written from scratch.

Used to report JAX throughput "vs PyTorch eager in the same run". Importing this module does not
need torch; `run_torch_reference` imports it lazily. GELU is the tanh approximation (the default of
``jax.nn.gelu``; nanoGPT uses the exact erf form, a negligible difference at this size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

_NO_TORCH = "PyTorch is not installed; pip install 'plutao[bench]' (torch==2.13.0) to compare against it"
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeError(_NO_TORCH) from None
    return torch


def _build_model(torch: Any, vocab: int, context: int, n_layers: int, n_heads: int, d_model: int) -> Any:
    """GPT-2 style pre-norm decoder: bias-free Linears and LayerNorms, tied LM head, no dropout."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(d_model, bias=False)
            self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
            self.attn_out = nn.Linear(d_model, d_model, bias=False)
            self.ln2 = nn.LayerNorm(d_model, bias=False)
            self.mlp_in = nn.Linear(d_model, 4 * d_model, bias=False)
            self.mlp_out = nn.Linear(4 * d_model, d_model, bias=False)

        def forward(self, x: Any) -> Any:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.view(b, t, n_heads, d // n_heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, d_model)
            self.pos = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d_model, bias=False)
            for name, p in self.named_parameters():
                if p.dim() >= 2:  # LayerNorm weights keep their ones-init
                    residual_out = name.endswith(("attn_out.weight", "mlp_out.weight"))
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers) if residual_out else 0.02)

        def forward(self, idx: Any, targets: Any) -> Any:
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.tok.weight.T  # LM head tied to the token embedding
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT()


def _lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    frac = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (lr - min_lr)


def run_torch_reference(
    text: str,
    *,
    steps: int,
    batch_size: int = 12,
    context: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    d_model: int = 128,
    lr: float = 1e-3,
    min_lr: float = 1e-4,
    warmup: int = 100,
    eval_batches: int = 20,
    seed: int = 0,
    compile: bool = False,
    log_every: int = 0,
    timed_from: int = 10,
    vocab: int = 0,
) -> dict:
    """Train the char-level reference model for `steps` steps in float32 and return timing and losses."""
    torch = _import_torch()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    def batch(src: np.ndarray) -> tuple[Any, Any]:
        starts = rng.integers(0, len(src) - context - 1, size=batch_size, endpoint=True)
        win = np.stack([src[s : s + context + 1] for s in starts])
        return torch.from_numpy(win[:, :-1].copy()), torch.from_numpy(win[:, 1:].copy())

    # (`vocab` > the text's characters: unused embedding rows, as a tokenizer's special tokens add)
    model = _build_model(torch, max(len(chars), vocab), context, n_layers, n_heads, d_model)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.99), eps=1e-8,
    )
    loss_fn = torch.compile(model) if compile else model

    times: list[float] = []
    train_loss = float("nan")
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, min_lr, warmup, steps)
        x, y = batch(train)
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss = loss.item()  # also forces completion before timing
        times.append(time.perf_counter() - t0)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {train_loss:.4f}  {1000 * times[-1]:.1f} ms", flush=True)

    model.eval()
    with torch.no_grad():
        val_loss = statistics.fmean(model(*batch(val)).item() for _ in range(eval_batches))

    timed = times[timed_from:] if len(times) > timed_from else times
    median_s = statistics.median(timed)
    return {
        "ms_per_step_median": 1000 * median_s,
        "tokens_per_sec": batch_size * context / median_s,
        "val_loss": val_loss,
        "train_loss_last": train_loss,
        "params": params,
        "steps": steps,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: train the reference and print its result dict as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--log-every", type=int, default=0)
    args = ap.parse_args(argv)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    result = run_torch_reference(
        text, steps=args.steps, seed=args.seed, eval_batches=args.eval_batches,
        compile=args.compile, log_every=args.log_every,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
