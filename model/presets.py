"""Named model sizes (the GPT-3 family and others) and the published parameter counts to check them against;
the counting itself is model/counts.py."""

from __future__ import annotations

from plutao.model.config import ModelConfig

GPT2_VOCAB = 50257
LLAMA3_VOCAB = 128256


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
    # Llama 3.2 1B's shape (Meta 2024): grouped-query attention (32 query heads, 8 key/value heads),
    # RMSNorm, SwiGLU, rotary θ = 500000 with Llama 3.1's long-context scaling, tied embeddings.
    "llama-1b": ModelConfig(vocab_size=LLAMA3_VOCAB, context_length=8192, n_layers=16, d_model=2048, n_heads=32,
                            n_kv_heads=8, d_head=64, d_ff=8192, norm_type="rmsnorm", positions="rotary",
                            activation="swiglu", norm_eps=1e-5, rope_theta=500000.0, rope_scaling="llama3",
                            rope_factor=32.0, rope_original_context=8192),
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
    "transformer-base": 65e6, "gpt2-124m": 124e6, "llama-1b": 1.24e9, "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
}
