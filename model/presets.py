"""Named model sizes, parameter counts without allocation, and FLOPs per token."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.families import TRANSFORMERS, build_model

GPT2_VOCAB = 50257


def _gpt3(n_layers: int, d_model: int, n_heads: int, d_head: int) -> ModelConfig:
    # GPT-3 (Brown et al. 2020, Table 2.1): GPT-2 architecture, context 2048, d_ff = 4·d_model.
    return ModelConfig(vocab_size=GPT2_VOCAB, context_length=2048, n_layers=n_layers, d_model=d_model,
                       n_heads=n_heads, d_head=d_head, bias=True, activation="gelu")


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=64, context_length=32, n_layers=2, d_model=32, n_heads=2),
    # nanoGPT's CPU configuration for char-level Shakespeare.
    "nanogpt-cpu": ModelConfig(vocab_size=65, context_length=64, n_layers=4, d_model=128, n_heads=4),
    # nanoGPT's GPU "shakespeare_char" configuration.
    "shakespeare-char": ModelConfig(vocab_size=65, context_length=256, n_layers=6, d_model=384, n_heads=6,
                                    dropout=0.2),
    # The original Transformer "base" (Vaswani et al. 2017, Table 3): 6+6 layers, post-norm, sinusoidal.
    "transformer-base": ModelConfig(family="encoder_decoder", vocab_size=37000, context_length=256, n_layers=6,
                                    d_model=512, n_heads=8, d_ff=2048, dropout=0.1, norm="post",
                                    positions="sinusoidal", activation="relu", bias=True),
    # A small translation model that trains on 2 CPU cores in minutes.
    "translate-cpu": ModelConfig(family="encoder_decoder", vocab_size=4000, context_length=32, n_layers=3,
                                 d_model=256, n_heads=4, d_ff=1024, dropout=0.1, norm="pre",
                                 positions="sinusoidal", activation="relu"),
    # BERT-style masked LM, CPU-sized.
    "bert-cpu": ModelConfig(family="encoder", vocab_size=4000, context_length=128, n_layers=4, d_model=256,
                            n_heads=4, dropout=0.1, activation="gelu"),
    # Zaremba et al. 2014's small LSTM for Penn Treebank: 2 layers of 200.
    "lstm-small": ModelConfig(family="lstm", vocab_size=10000, context_length=35, n_layers=2, d_model=200,
                              n_heads=1),
    "gpt2-124m": ModelConfig(vocab_size=GPT2_VOCAB, context_length=1024, n_layers=12, d_model=768, n_heads=12,
                             bias=True),
    "gpt3-small": _gpt3(12, 768, 12, 64),
    "gpt3-medium": _gpt3(24, 1024, 16, 64),
    "gpt3-large": _gpt3(24, 1536, 16, 96),
    # The paper lists 24 heads of 128 for XL, which cannot tile d_model=2048 (24·128 = 3072) and
    # would give 1.52B parameters; 16 heads of 128 tile it and give the published 1.3B.
    "gpt3-xl": _gpt3(24, 2048, 16, 128),
    "gpt3-2.7b": _gpt3(32, 2560, 32, 80),
    "gpt3-6.7b": _gpt3(32, 4096, 32, 128),
    "gpt3-13b": _gpt3(40, 5140, 40, 128),
    "gpt3-175b": _gpt3(96, 12288, 96, 128),
}

# Published sizes, to check our counts against (parameters).
PUBLISHED_PARAMS = {
    "transformer-base": 65e6, "gpt2-124m": 124e6, "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
}


def abstract_params(cfg: ModelConfig) -> nnx.State:
    """The model's parameter shapes and axis names, traced abstractly: nothing is allocated."""
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters and the part in embeddings (token + learned positions)."""
    state = abstract_params(cfg)
    sizes = {
        "/".join(map(str, path)): int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        for path in [tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)]
    }
    total = sum(sizes.values())
    embedding = sum(n for p, n in sizes.items() if p.startswith(("token_embed", "pos_embed")))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·d_head·T (forward + backward).

    6N counts a multiply-add (2 FLOPs) per parameter per token forward and twice that backward,
    for every matmul weight (N = non-embedding parameters plus the LM head, since the head is a
    matmul even when tied). The second term is attention's QKᵀ and AV products (PaLM, App. B).
    """
    cfg = cfg.resolved()
    counts = count_params(cfg)
    # The LM head is a matmul; untied, it is already among the non-embedding parameters.
    matmul_params = counts["non_embedding"] + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    T = context or cfg.context_length
    if cfg.family not in TRANSFORMERS:  # recurrent: every weight is a matmul per token, no attention
        return 6.0 * matmul_params
    attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.d_head * T
    if cfg.family == "encoder_decoder":
        # A source token passes the encoder, a target token the decoder and the head: with sources
        # and targets of similar length, a token costs about half of all weights, plus its attention.
        return 6.0 * matmul_params / 2 + attention
    return 6.0 * matmul_params + attention

