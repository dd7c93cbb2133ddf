"""Named experiments: a model size plus the data, batch and optimizer settings it is trained with.

Each preset is a flat dict of `section.key` overrides on top of the defaults in train/config/schema.py,
so a preset reads exactly like a command line.
"""

from __future__ import annotations

import dataclasses

from plutao.model.presets import MODEL_PRESETS


def _model(name: str) -> dict:
    cfg = MODEL_PRESETS[name]
    return {f"model.{k}": v for k, v in dataclasses.asdict(cfg).items() if k not in ("vocab_size",)}


def _gpt3(name: str, batch_sequences: int, lr: float) -> dict:
    # Brown et al. 2020, Table 2.1: batch size (0.5M, 1M, 2M, 3.2M tokens = 256, 512, 1024, 1536
    # sequences of 2048), peak learning rate; GPT-2's BPE vocabulary.
    return _model(name) | {
        "model.vocab_size": 50257, "data.tokenizer": "bpe", "data.vocab_size": 50257,
        "train.batch_size": batch_sequences, "optim.lr": lr, "optim.min_lr": lr / 10,
        "optim.beta2": 0.95, "optim.eps": 1e-8, "optim.weight_decay": 0.1, "optim.warmup_steps": 375,
        "optim.grad_clip": 1.0,
    }


NANOGPT_RECIPE = {
    "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.beta2": 0.99, "optim.weight_decay": 0.1,
    "optim.warmup_steps": 100, "optim.grad_clip": 1.0, "optim.schedule": "cosine", "data.tokenizer": "char",
}

PRESETS: dict[str, dict] = {
    # `plutao train` with no config: a small char-level GPT on the standard library's docstrings.
    "default": {
        "data.path": "builtin:python-docs", "data.tokenizer": "char",
        "model.n_layers": 4, "model.d_model": 128, "model.n_heads": 4, "model.context_length": 128,
        "train.batch_size": 16, "train.steps": 1200, "train.eval_every": 200, "train.sample_every": 200,
        "train.checkpoint_every": 400, "train.eval_batches": 20, **NANOGPT_RECIPE,
    },
    "tiny": _model("tiny") | {
        "data.tokenizer": "char", "train.batch_size": 8, "train.steps": 50, "train.eval_every": 25,
        "train.sample_every": 0, "train.checkpoint_every": 25, "train.eval_batches": 2, "train.log_every": 5,
        "optim.lr": 3e-3, "optim.warmup_steps": 5,
    },
    # nanoGPT's CPU configuration for char-level Tiny Shakespeare (what `plutao bench` runs).
    "nanogpt-cpu": _model("nanogpt-cpu") | NANOGPT_RECIPE | {
        "data.path": "tinyshakespeare", "train.batch_size": 12, "train.steps": 2000, "train.eval_every": 250,
        "train.sample_every": 500, "train.checkpoint_every": 500, "train.eval_batches": 20,
    },
    "shakespeare-char": _model("shakespeare-char") | NANOGPT_RECIPE | {
        "data.path": "tinyshakespeare", "train.batch_size": 64, "train.steps": 5000, "train.eval_every": 250,
        "train.sample_every": 1000, "train.checkpoint_every": 1000, "train.eval_batches": 200,
    },
    # Vaswani et al. 2017's base model and recipe: Adam β=(0.9, 0.98), ε=1e-9, lr = d^-0.5·min(step^-0.5,
    # step·4000^-1.5) (peak 512^-0.5·4000^-0.5 ≈ 7e-4), label smoothing 0.1, shared BPE vocabulary.
    "transformer-base": _model("transformer-base") | {
        "data.tokenizer": "bpe", "data.vocab_size": 37000, "train.batch_size": 256, "train.steps": 100000,
        "optim.name": "adamw", "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-9, "optim.weight_decay": 0.0,
        "optim.schedule": "inverse_sqrt", "optim.warmup_steps": 4000, "optim.lr": 512 ** -0.5 * 4000 ** -0.5,
        "optim.grad_clip": 0.0, "optim.label_smoothing": 0.1, "train.eval_every": 1000, "train.sample_every": 1000,
        "train.checkpoint_every": 1000,
    },
    # French→English on 2 CPU cores: `plutao train translate-cpu data.path=…/fra-eng/train.tsv`.
    "translate-cpu": _model("translate-cpu") | {
        "data.tokenizer": "bpe", "data.vocab_size": 4000, "train.batch_size": 64, "train.steps": 3500,
        "optim.name": "adamw", "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-9, "optim.weight_decay": 0.01,
        "optim.schedule": "cosine", "optim.warmup_steps": 300, "optim.lr": 1e-3, "optim.min_lr": 5e-5,
        "optim.grad_clip": 1.0, "optim.label_smoothing": 0.1, "train.eval_every": 500, "train.eval_batches": 15,
        "train.sample_every": 500, "train.checkpoint_every": 500, "data.val_fraction": 0.02,
    },
    "bert-cpu": _model("bert-cpu") | NANOGPT_RECIPE | {
        "data.tokenizer": "bpe", "data.vocab_size": 4000, "data.path": "builtin:python-docs", "train.batch_size": 32,
        "train.steps": 2000, "optim.lr": 5e-4, "optim.warmup_steps": 200, "train.eval_every": 250,
        "train.sample_every": 500, "train.checkpoint_every": 500,
    },
    "lstm-small": _model("lstm-small") | {
        "data.tokenizer": "word", "train.batch_size": 20, "train.steps": 4000, "optim.name": "adamw",
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 100, "optim.weight_decay": 0.0,
        "optim.grad_clip": 5.0, "train.eval_every": 500, "train.sample_every": 1000, "train.checkpoint_every": 1000,
    },
    "gpt2-124m": _model("gpt2-124m") | {
        "model.vocab_size": 50257, "data.tokenizer": "bpe", "data.vocab_size": 50257, "train.batch_size": 480,
        "optim.lr": 6e-4, "optim.min_lr": 6e-5, "optim.beta2": 0.95, "optim.warmup_steps": 2000,
        "train.steps": 600000, "train.grad_accum": 1,
    },
    # The arithmetic world's base model (train/worlds/arith.py): equations in many surface forms (some
    # wrong), run-on pseudo-dialogue and prose; char-level, so every digit is one token.
    "arith-base": NANOGPT_RECIPE | {
        "data.path": ["builtin:arith-equations", "builtin:arith-dialogue", "builtin:python-docs"],
        "data.weights": [0.6, 0.3, 0.1], "data.tokenizer": "char", "data.separate_documents": True,
        "model.n_layers": 4, "model.d_model": 128, "model.n_heads": 4, "model.context_length": 192,
        "model.positions": "rotary", "train.batch_size": 24, "train.steps": 1600, "train.eval_every": 400, "train.sample_every": 800,
        "train.checkpoint_every": 400, "train.eval_batches": 20, "optim.lr": 2e-3, "optim.min_lr": 2e-4,
        "train.sample_prompt": "Q: What is 23 plus 45?\nA:", "train.sample_tokens": 80,
    },
    "llama-1b": _model("llama-1b") | {
        "model.vocab_size": 128256, "data.tokenizer": "bpe", "data.vocab_size": 128256, "train.batch_size": 256,
        "optim.lr": 3e-4, "optim.min_lr": 3e-5, "optim.beta2": 0.95, "optim.weight_decay": 0.1,
        "optim.warmup_steps": 2000, "optim.grad_clip": 1.0,
    },
    "gpt3-small": _gpt3("gpt3-small", 256, 6.0e-4),
    "gpt3-medium": _gpt3("gpt3-medium", 256, 3.0e-4),
    "gpt3-large": _gpt3("gpt3-large", 256, 2.5e-4),
    "gpt3-xl": _gpt3("gpt3-xl", 512, 2.0e-4),
    "gpt3-2.7b": _gpt3("gpt3-2.7b", 512, 1.6e-4),
    "gpt3-6.7b": _gpt3("gpt3-6.7b", 1024, 1.2e-4),
    "gpt3-13b": _gpt3("gpt3-13b", 1024, 1.0e-4),
    "gpt3-175b": _gpt3("gpt3-175b", 1536, 0.6e-4),
}


# What `plutao sft` and `plutao reward` set on top of the parent run's model and tokenizer (the
# user's key=value overrides come after these).
STAGE_PRESETS: dict[str, dict] = {
    "sft": {
        "train.task": "sft", "train.batch_size": 32, "train.steps": 600, "train.eval_every": 100,
        "train.eval_batches": 10, "train.sample_every": 200, "train.checkpoint_every": 200, "train.log_every": 10,
        "optim.lr": 5e-4, "optim.min_lr": 5e-5, "optim.warmup_steps": 30, "optim.schedule": "cosine",
        "optim.weight_decay": 0.0, "model.dropout": 0.0,
    },
    "reward": {
        "train.task": "reward", "train.batch_size": 16, "train.steps": 300, "train.eval_every": 100,
        "train.eval_batches": 100, "train.sample_every": 0, "train.checkpoint_every": 100, "train.log_every": 10,
        "optim.lr": 2e-4, "optim.min_lr": 2e-5, "optim.warmup_steps": 30, "optim.schedule": "cosine",
        "optim.weight_decay": 0.0, "model.dropout": 0.0,
    },
    # RL stages: train.steps counts rollout batches; the learning rate is small and constant after a
    # short warm-up (the policy starts good and must move little). Calibrated on the arithmetic world
    # (docs/figures.md): at 1e-4 GRPO with the gold checker and PPO both lose accuracy within 30 steps,
    # at 3e-5 GRPO gains it and holds it over 40, and PPO does with β = 0.1 (in units of the reward
    # model's spread over SFT samples; at β = 0.02 it hacks the reward model after 15 steps).
    "ppo": {
        "train.task": "ppo", "train.steps": 40, "train.eval_every": 10, "train.sample_every": 20,
        "train.checkpoint_every": 10, "train.log_every": 1, "optim.lr": 3e-5, "optim.min_lr": 3e-5,
        "optim.warmup_steps": 10, "optim.schedule": "constant", "optim.weight_decay": 0.0, "model.dropout": 0.0,
        "rl.prompts": 64, "rl.group": 1, "rl.epochs": 2, "rl.minibatches": 4, "rl.beta": 0.1, "rl.value_lr": 1e-4,
    },
    "grpo": {
        "train.task": "grpo", "train.steps": 40, "train.eval_every": 10, "train.sample_every": 20,
        "train.checkpoint_every": 10, "train.log_every": 1, "optim.lr": 3e-5, "optim.min_lr": 3e-5,
        "optim.warmup_steps": 10, "optim.schedule": "constant", "optim.weight_decay": 0.0, "model.dropout": 0.0,
        "rl.prompts": 8, "rl.group": 8, "rl.epochs": 2, "rl.minibatches": 4, "rl.beta": 0.04,
    },
    "dpo": {
        "train.task": "dpo", "train.batch_size": 16, "train.steps": 300, "train.eval_every": 100,
        "train.eval_batches": 100, "train.sample_every": 100, "train.checkpoint_every": 100, "train.log_every": 10,
        "optim.lr": 2e-5, "optim.min_lr": 2e-6, "optim.warmup_steps": 20, "optim.schedule": "cosine",
        "optim.weight_decay": 0.0, "model.dropout": 0.0, "rl.beta": 0.1,
    },
}
