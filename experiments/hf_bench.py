"""`plutao bench-hf`: importing and exporting Hugging Face checkpoints, and what grouped-query
attention saves.

For each model (random GPT-2 124M and a Llama-shaped ~1B, built here with transformers, f32):
- import and export wall time and peak resident memory, each in its own process (`plutao import-hf`,
  `plutao export-hf`), against the checkpoint's size; the resident memory of a process that only
  imports the same modules is reported beside it (what JAX and the libraries take before any weight);
- logit agreement with transformers on the same batch: max |Δ| and the mean per-token KL(hf ‖ ours).
Then, on one model shape with n_kv_heads = n_heads and n_heads / 4: KV-cache bytes per slot at the
full context and decode tokens/s of the slot sampler with 16 rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from plutao.train.interop.hf_models import LAYOUTS

MODELS = {
    "gpt2-124m": {"arch": "GPT2LMHeadModel", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    "llama-1b": {"arch": "LlamaForCausalLM", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                 "max_position_embeddings": 8192, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
}


def build(name: str, directory: Path) -> None:
    """A randomly initialised model saved by save_pretrained, with a byte-level tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    torch.manual_seed(0)
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"eos_token": "<|endoftext|>"})
    model_type = LAYOUTS[arch].MODEL_TYPE
    config = AutoConfig.for_model(model_type, **spec, eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    with torch.device("cpu"):
        model = getattr(transformers, arch)(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)


def measured(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak resident bytes) of a child process. (Linux carries a process's peak over fork and
    exec, so the parent stays small: models are built and compared in processes of their own.)"""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.read()[-1000:]}")
    return seconds, usage.ru_maxrss * 1024


def agreement(hf_dir: Path, run_dir: Path, seed: int = 0) -> dict:
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from plutao.model.heads import forward_logits
    from plutao.train.run.lineage import load_run

    run = load_run(run_dir)
    ids = np.random.default_rng(seed).integers(0, run.tokenizer.vocab_size, (2, 64))
    ours = np.asarray(forward_logits(run.model, jnp.asarray(ids, jnp.int32))[0], np.float64)
    del run
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.double().numpy()
    del ref

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(theirs), log_softmax(ours)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"max_abs_logit_diff": float(np.abs(ours - theirs).max()), "mean_kl_per_token": float(kl.mean())}


def gqa_decode(n_heads: int = 16, layers: int = 8, d_model: int = 512, context: int = 1024, rows: int = 16,
               new_tokens: int = 128) -> list[dict]:
    import jax
    from flax import nnx

    from plutao.model.attention import init_cache
    from plutao.model.config import ModelConfig
    from plutao.model.decode import complete
    from plutao.model.gpt import GPT
    from plutao.model.sampling import SamplingConfig

    out = []
    for n_kv in (n_heads, n_heads // 4):
        cfg = ModelConfig(vocab_size=4096, context_length=context, n_layers=layers, d_model=d_model, n_heads=n_heads,
                          n_kv_heads=n_kv, norm_type="rmsnorm", positions="rotary", activation="swiglu",
                          attention="xla").resolved()
        model = GPT(cfg, nnx.Rngs(0))
        cache_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                          for layer in jax.eval_shape(lambda cfg=cfg: init_cache(1, context, cfg)) for a in layer.values())
        prompts = [list(range(1 + i, 33 + i)) for i in range(rows)]
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens, stop_at_eot=False)
        complete(model, prompts, sampling, eot_id=0, pad_id=0)  # (compiles)
        t0 = time.perf_counter()
        done = complete(model, prompts, sampling, eot_id=0, pad_id=0)
        seconds = time.perf_counter() - t0
        out.append({"n_heads": n_heads, "n_kv_heads": n_kv, "kv_cache_bytes_per_slot": int(cache_bytes),
                    "decode_tokens_per_s": sum(len(d.content) for d in done) / seconds})
    return out


def run_hf_bench(models: list[str], workdir: str | None = None, out=sys.stdout) -> dict:
    root = Path(workdir or tempfile.mkdtemp(prefix="plutao-bench-hf-"))
    root.mkdir(parents=True, exist_ok=True)
    plutao = [sys.executable, "-m", "plutao.experiments.cli"]
    _, baseline = measured([sys.executable, "-c", "import plutao.train.interop.hf_run, plutao.train.run.lineage"])
    result: dict = {"baseline_rss_bytes": baseline, "models": {}}
    print(f"a process that only imports plutao's import/export code: {baseline / 2**20:,.0f} MiB resident", file=out)
    for name in models:
        hf_dir, run_dir, back = root / f"{name}-hf", root / f"{name}-run", root / f"{name}-back"
        if not (hf_dir / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "plutao.experiments.hf_bench", "--build", name, str(hf_dir)], check=True)
        size = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
        for d in (run_dir, back):
            subprocess.run(["rm", "-rf", str(d)], check=True)
        t_imp, rss_imp = measured([*plutao, "import-hf", str(hf_dir), "--workdir", str(run_dir)])
        t_exp, rss_exp = measured([*plutao, "export-hf", str(run_dir), "--out", str(back)])
        row = {"checkpoint_bytes": size, "import_s": t_imp, "import_peak_rss_bytes": rss_imp, "export_s": t_exp,
               "export_peak_rss_bytes": rss_exp}
        agree = subprocess.run([sys.executable, "-m", "plutao.experiments.hf_bench", "--agree", str(hf_dir), str(run_dir)],
                               check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row |= json.loads(agree)
        result["models"][name] = row
        print(f"{name}: checkpoint {size / 2**20:,.0f} MiB; import {t_imp:.1f} s, peak {rss_imp / 2**20:,.0f} MiB "
              f"({rss_imp / size:.2f}× the checkpoint, {(rss_imp - baseline) / size:.2f}× above the libraries); "
              f"export {t_exp:.1f} s, peak {rss_exp / 2**20:,.0f} MiB ({rss_exp / size:.2f}×, "
              f"{(rss_exp - baseline) / size:.2f}× above); max |Δlogit| {row['max_abs_logit_diff']:.2e}, "
              f"KL {row['mean_kl_per_token']:.2e}", file=out)
    result["gqa"] = gqa_decode()
    for g in result["gqa"]:
        print(f"n_heads {g['n_heads']}, n_kv_heads {g['n_kv_heads']}: KV cache {g['kv_cache_bytes_per_slot'] / 2**20:.1f} "
              f"MiB per slot, decode {g['decode_tokens_per_s']:,.0f} tokens/s (16 rows)", file=out)
    return result


if __name__ == "__main__":
    if sys.argv[1] == "--build":
        build(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1] == "--agree":
        print(json.dumps(agreement(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        print(json.dumps(run_hf_bench(sys.argv[1:] or list(MODELS))))
