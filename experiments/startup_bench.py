"""`plutao bench-startup RUN`: how long a one-shot `plutao sample RUN --max-new-tokens N` takes, from
the shell prompt to the last token, against nanoGPT's `sample.py` on a model of the same shape,
measured in the same run.

Each figure is the median wall time of a fresh process (imports, checkpoint restore, compilation or
cache load, generation):
- plutao with an empty compilation cache (cold), then with it filled (warm), and with the cache
  switched off (PLUTAO_XLA_CACHE=off: what every command did before it existed);
- the reference: a script that does what nanoGPT's sample.py does (import torch, build the model,
  load a state dict saved with torch.save, generate N tokens with a full forward per token, top-k 200),
  on the run's shape with random weights (timing does not depend on them).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = r'''
import math, sys, time
import torch
import torch.nn as nn
from torch.nn import functional as F
vocab, context, n_layers, n_heads, d_model, tokens, ckpt = sys.argv[1:]
vocab, context, n_layers, n_heads, d_model, tokens = map(int, (vocab, context, n_layers, n_heads, d_model, tokens))

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model, bias=False), nn.LayerNorm(d_model, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d_model, 3 * d_model, bias=False), nn.Linear(d_model, d_model, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d_model, 4 * d_model, bias=False), nn.Linear(4 * d_model, d_model, bias=False)
    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, n_heads, d // n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.h = nn.ModuleList(Block() for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x[:, [-1], :]) @ self.wte.weight.T
    @torch.no_grad()
    def generate(self, idx, n, temperature=0.8, top_k=200):
        for _ in range(n):
            logits = self(idx[:, -context:])[:, -1, :] / temperature
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx

if ckpt.endswith("--save"):
    torch.manual_seed(0)
    torch.save({"model": GPT().state_dict()}, ckpt[:-len("--save")])
    sys.exit(0)
torch.manual_seed(1337)
model = GPT()
model.load_state_dict(torch.load(ckpt, map_location="cpu")["model"])
model.eval()
out = model.generate(torch.zeros((1, 1), dtype=torch.long), tokens)
print(out.shape[1] - 1)
'''


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def run_startup_bench(run_dir: str, tokens: int = 100, repeats: int = 5, out=sys.stdout) -> dict:
    from plutao.train.run.rundir import existing_run_config

    model = existing_run_config(Path(run_dir))["model"]
    work = Path(tempfile.mkdtemp(prefix="plutao-bench-startup-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env = base | {"PLUTAO_CACHE": str(work / "cache")}
    sample = [sys.executable, "-m", "plutao.experiments.cli", "sample", run_dir, "--prompt", "\n",
              "--max-new-tokens", str(tokens), "--no-stop"]
    script = work / "nanogpt_sample.py"
    script.write_text(REFERENCE)
    shape = [str(model[k]) for k in ("vocab_size", "context_length", "n_layers", "n_heads", "d_model")]
    subprocess.run([sys.executable, str(script), *shape, str(tokens), f"{work / 'ckpt.pt'}--save"], check=True)
    result = {"tokens": tokens, "cold_s": timed(sample, env)}
    result["warm_s"] = statistics.median(timed(sample, env) for _ in range(repeats))
    result["no_cache_s"] = statistics.median(timed(sample, base | {"PLUTAO_XLA_CACHE": "off"}) for _ in range(repeats))
    reference = [sys.executable, str(script), *shape, str(tokens), str(work / "ckpt.pt")]
    result["nanogpt_s"] = statistics.median(timed(reference, base) for _ in range(repeats))
    result["warm_over_nanogpt"] = result["warm_s"] / result["nanogpt_s"]
    print(f"one-shot sample of {tokens} tokens from {run_dir} (median of {repeats} fresh processes):", file=out)
    print(f"  plutao, compilation cache empty (cold)  {result['cold_s']:.2f} s", file=out)
    print(f"  plutao, cache filled (warm)             {result['warm_s']:.2f} s", file=out)
    print(f"  plutao, cache off                       {result['no_cache_s']:.2f} s", file=out)
    print(f"  nanoGPT's sample.py, same shape (torch) {result['nanogpt_s']:.2f} s", file=out)
    print(f"  warm / nanoGPT: {result['warm_over_nanogpt']:.2f}× (target ≤ 1.2×)", file=out)
    return result


if __name__ == "__main__":
    print(json.dumps(run_startup_bench(sys.argv[1])))
