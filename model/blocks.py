"""Transformer layers shared by every family: residual sub-layers with Add & Norm.

`Block` is self-attention then MLP: causal in a decoder (GPT), bidirectional with a padding mask in
an encoder (BERT, the encoder of the original Transformer). `CrossBlock` adds encoder-decoder
attention between the two: the decoder layer of the original Transformer.
Each sub-layer is x + Dropout(F(Norm(x))) (pre-norm, GPT-2) or Norm(x + Dropout(F(x))) (post-norm,
Vaswani et al. 2017).
"""

from __future__ import annotations

import jax
from flax import nnx

from plutao.model.attention import CrossAttention, MultiHeadAttention
from plutao.model.config import ModelConfig
from plutao.model.layers import FeedForward, Norm, dropout, no_constraint

ACT_BTD = ("batch", "length", "act_embed")  # the residual stream: split over the batch only


def _keys(dropout_key, n):
    return [None] * n if dropout_key is None else list(jax.random.split(dropout_key, n))


def add_and_norm(x_BTD, sublayer, norm: Norm, pre_norm: bool, rate: float, key):
    """One residual sub-layer: x + Dropout(F(Norm(x))) (pre-norm) or Norm(x + Dropout(F(x))) (post-norm).
    `sublayer` returns F's output and anything else it computed (a cache, attention weights)."""
    out_BTD, extra = sublayer(norm(x_BTD) if pre_norm else x_BTD)
    x_BTD = x_BTD + dropout(out_BTD, rate, key)
    return (x_BTD if pre_norm else norm(x_BTD)), extra


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)) (pre-norm, GPT-2); or Norm(x + Attn(x)) ... (post-norm)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm == "pre"
        self.dropout_rate = cfg.dropout
        self.norm_attn = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps)
        self.attn = MultiHeadAttention(cfg, rngs)
        self.norm_mlp = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps)
        self.mlp = FeedForward(cfg, rngs)

    def __call__(self, x_BTD, mask, positions_BT, *, cache=None, cache_index=None, dropout_key=None,
                 return_weights=False, constrain=no_constraint):
        keys = _keys(dropout_key, 3)

        def attention(h):
            out, new_cache, weights = self.attn(h, mask, positions_BT, cache=cache, cache_index=cache_index,
                                                dropout_key=keys[0], return_weights=return_weights,
                                                constrain=constrain)
            return out, (new_cache, weights)

        x_BTD, (cache, weights) = add_and_norm(x_BTD, attention, self.norm_attn, self.pre_norm, self.dropout_rate,
                                               keys[1])
        x_BTD, _ = add_and_norm(x_BTD, lambda h: (self.mlp(h, constrain), None), self.norm_mlp, self.pre_norm,
                                self.dropout_rate, keys[2])
        return constrain(x_BTD, ACT_BTD), cache, weights


class CrossBlock(nnx.Module):
    """A decoder layer of the original Transformer: causal self-attention, cross-attention over the
    encoder output, then the MLP; each wrapped in Add & Norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm == "pre"
        self.dropout_rate = cfg.dropout
        self.norm_self = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps)
        self.self_attn = MultiHeadAttention(cfg, rngs)
        self.norm_cross = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg, rngs)
        self.norm_mlp = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps)
        self.mlp = FeedForward(cfg, rngs)

    def __call__(self, x_BTD, self_mask, positions_BT, memory_kv, cross_mask, *, cache=None,
                 cache_index=None, dropout_key=None, return_weights=False, constrain=no_constraint):
        keys = _keys(dropout_key, 5)

        def self_attention(h):
            out, new_cache, weights = self.self_attn(h, self_mask, positions_BT, cache=cache,
                                                     cache_index=cache_index, dropout_key=keys[0],
                                                     return_weights=return_weights, constrain=constrain)
            return out, (new_cache, weights)

        def cross_attention(h):
            return self.cross_attn(h, memory_kv, cross_mask, dropout_key=keys[2], return_weights=return_weights,
                                   constrain=constrain)

        x_BTD, (cache, self_weights) = add_and_norm(x_BTD, self_attention, self.norm_self, self.pre_norm,
                                                    self.dropout_rate, keys[1])
        x_BTD, cross_weights = add_and_norm(x_BTD, cross_attention, self.norm_cross, self.pre_norm,
                                            self.dropout_rate, keys[3])
        x_BTD, _ = add_and_norm(x_BTD, lambda h: (self.mlp(h, constrain), None), self.norm_mlp, self.pre_norm,
                                self.dropout_rate, keys[4])
        return constrain(x_BTD, ACT_BTD), cache, (self_weights, cross_weights)
