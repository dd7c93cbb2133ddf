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


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)) (pre-norm, GPT-2); or Norm(x + Attn(x)) ... (post-norm)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm == "pre"
        self.dropout_rate = cfg.dropout
        self.norm_attn = Norm(cfg.d_model, cfg.norm_type, cfg.bias)
        self.attn = MultiHeadAttention(cfg, rngs)
        self.norm_mlp = Norm(cfg.d_model, cfg.norm_type, cfg.bias)
        self.mlp = FeedForward(cfg, rngs)

    def __call__(self, x_BTD, mask_BTS, positions_BT, *, cache=None, cache_index=None, dropout_key=None,
                 return_weights=False, constrain=no_constraint):
        keys = _keys(dropout_key, 3)
        h = self.norm_attn(x_BTD) if self.pre_norm else x_BTD
        attn_BTD, cache, weights = self.attn(h, mask_BTS, positions_BT, cache=cache, cache_index=cache_index,
                                             dropout_key=keys[0], return_weights=return_weights, constrain=constrain)
        x_BTD = x_BTD + dropout(attn_BTD, self.dropout_rate, keys[1])
        if not self.pre_norm:
            x_BTD = self.norm_attn(x_BTD)
        h = self.norm_mlp(x_BTD) if self.pre_norm else x_BTD
        x_BTD = x_BTD + dropout(self.mlp(h, constrain), self.dropout_rate, keys[2])
        if not self.pre_norm:
            x_BTD = self.norm_mlp(x_BTD)
        return constrain(x_BTD, ACT_BTD), cache, weights


class CrossBlock(nnx.Module):
    """A decoder layer of the original Transformer: causal self-attention, cross-attention over the
    encoder output, then the MLP; each wrapped in Add & Norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm == "pre"
        self.dropout_rate = cfg.dropout
        self.norm_self = Norm(cfg.d_model, cfg.norm_type, cfg.bias)
        self.self_attn = MultiHeadAttention(cfg, rngs)
        self.norm_cross = Norm(cfg.d_model, cfg.norm_type, cfg.bias)
        self.cross_attn = CrossAttention(cfg, rngs)
        self.norm_mlp = Norm(cfg.d_model, cfg.norm_type, cfg.bias)
        self.mlp = FeedForward(cfg, rngs)

    def __call__(self, x_BTD, self_mask_BTS, positions_BT, memory_kv, cross_mask_BTS, *, cache=None,
                 cache_index=None, dropout_key=None, return_weights=False, constrain=no_constraint):
        keys = _keys(dropout_key, 5)
        h = self.norm_self(x_BTD) if self.pre_norm else x_BTD
        a_BTD, cache, self_weights = self.self_attn(h, self_mask_BTS, positions_BT, cache=cache,
                                                    cache_index=cache_index, dropout_key=keys[0],
                                                    return_weights=return_weights, constrain=constrain)
        x_BTD = x_BTD + dropout(a_BTD, self.dropout_rate, keys[1])
        if not self.pre_norm:
            x_BTD = self.norm_self(x_BTD)
        h = self.norm_cross(x_BTD) if self.pre_norm else x_BTD
        c_BTD, cross_weights = self.cross_attn(h, memory_kv, cross_mask_BTS, dropout_key=keys[2],
                                               return_weights=return_weights, constrain=constrain)
        x_BTD = x_BTD + dropout(c_BTD, self.dropout_rate, keys[3])
        if not self.pre_norm:
            x_BTD = self.norm_cross(x_BTD)
        h = self.norm_mlp(x_BTD) if self.pre_norm else x_BTD
        x_BTD = x_BTD + dropout(self.mlp(h, constrain), self.dropout_rate, keys[4])
        if not self.pre_norm:
            x_BTD = self.norm_mlp(x_BTD)
        return constrain(x_BTD, ACT_BTD), cache, (self_weights, cross_weights)
