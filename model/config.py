"""Model hyperparameters as typed, validated data."""

from __future__ import annotations

import dataclasses
from typing import Literal

Norm = Literal["pre", "post"]
NormType = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "sinusoidal", "rotary"]
Activation = Literal["relu", "gelu", "swiglu"]
# Transformers (decoder-only GPT, encoder-decoder, encoder-only BERT) and the baselines they replaced.
Family = Literal["decoder", "encoder_decoder", "encoder", "lstm", "gru", "rnn", "ngram"]
Smoothing = Literal["kneser_ney", "add_k"]
Dtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots_saveable"]
AttentionImpl = Literal["naive", "xla", "cudnn", "auto"]
RopeScaling = Literal["none", "linear", "llama3"]
Switch = Literal["auto", "on", "off"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and architectural switches of a Transformer.

    `d_head` defaults to d_model // n_heads and `d_ff` to 4 * d_model; both are resolved in
    `resolved()` so a saved config always states them explicitly.
    """

    family: Family = "decoder"
    vocab_size: int = 256
    context_length: int = 128
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    # Key/value heads (grouped-query attention): query head h reads key/value head h // (n_heads //
    # n_kv_heads); 1 is multi-query attention. 0 = n_heads (multi-head attention).
    n_kv_heads: int = 0
    d_head: int = 0
    d_ff: int = 0
    dropout: float = 0.0
    norm: Norm = "pre"
    norm_type: NormType = "layernorm"
    positions: Positions = "learned"
    activation: Activation = "gelu"
    bias: bool = False  # biases of every projection and of LayerNorm
    # The projections' biases on their own ("auto" follows model.bias): Llama-family checkpoints set
    # attention (q, k, v, o) and MLP biases separately, with no norm bias.
    attention_bias: Switch = "auto"
    mlp_bias: Switch = "auto"
    norm_eps: float = 1e-5
    # Rotary positions: the base θ of the frequencies θ^(-2i/d_head), and the long-context rescaling
    # of them ("linear": every frequency / rope_factor; "llama3": Llama 3.1's by wavelength, between
    # rope_original_context / rope_low_freq_factor and / rope_high_freq_factor).
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    tie_embeddings: bool = True
    dtype: Dtype = "float32"  # compute dtype; parameters are always float32
    # Recompute each block's activations in the backward pass instead of storing them: "full" keeps
    # only block inputs, "dots_saveable" also keeps matmul outputs (less recomputation, more memory).
    remat: Remat = "none"
    # "naive" is the explicit softmax(QKᵀ/√d)V (and can return the weights); the others call
    # jax.nn.dot_product_attention: "xla" everywhere, "cudnn" fused kernels on NVIDIA GPUs, "auto" picks.
    attention: AttentionImpl = "naive"
    # One block traced once and run by a scan over stacked per-layer weights: compile time stops
    # growing with depth. Changes the parameter layout (a leading `layers` axis).
    scan_layers: bool = False
    # encoder_decoder: layers of the encoder stack (0 = n_layers); the decoder has n_layers.
    n_encoder_layers: int = 0
    # ngram: order n (the last n-1 tokens condition the next), smoothing, and add-k's k.
    ngram_order: int = 3
    ngram_smoothing: Smoothing = "kneser_ney"
    ngram_k: float = 1.0

    def resolved(self) -> ModelConfig:
        d_head = self.d_head or (self.d_model // self.n_heads if self.n_heads else 0)
        d_ff = self.d_ff or 4 * self.d_model
        return dataclasses.replace(self, d_head=d_head, d_ff=d_ff, n_kv_heads=self.n_kv_heads or self.n_heads)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def grouped(self) -> bool:
        """Fewer key/value heads than query heads: separate W^Q and W^{KV} (a fused W^{QKV} otherwise)."""
        return self.kv_heads != self.n_heads

    @property
    def attn_bias(self) -> bool:
        return self.bias if self.attention_bias == "auto" else self.attention_bias == "on"

    @property
    def ffn_bias(self) -> bool:
        return self.bias if self.mlp_bias == "auto" else self.mlp_bias == "on"

    def problems(self) -> list[str]:
        """Every reason this config cannot build a model, as user-facing sentences."""
        out = []
        for name in ("vocab_size", "context_length", "n_layers", "d_model", "n_heads"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_heads > 0 and not self.d_head and self.d_model % self.n_heads:
            out.append(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.d_head explicitly"
            )
        if self.positions == "rotary" and (self.resolved().d_head % 2):
            out.append(f"rotary positions need an even head size, got d_head={self.resolved().d_head}")
        if self.n_kv_heads < 0 or (self.n_heads > 0 and self.n_kv_heads and self.n_heads % self.n_kv_heads):
            out.append(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} (each key/value "
                       "head serves a group of query heads); choose a divisor, or 0 for one per query head")
        if self.norm_eps <= 0:
            out.append(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.rope_theta <= 0 or self.rope_factor <= 0:
            out.append(f"model.rope_theta and model.rope_factor must be positive, got {self.rope_theta} and "
                       f"{self.rope_factor}")
        if self.rope_scaling == "llama3" and not (0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            out.append("llama3 rope scaling needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, got "
                       f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        return out
