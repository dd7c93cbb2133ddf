"""The original Transformer (Vaswani et al. 2017): an encoder stack reads the source, a decoder stack
writes the target one token at a time, attending to the encoder output through cross-attention.

One vocabulary is shared by source and target, and one embedding matrix serves the encoder input,
the decoder input and the pre-softmax projection (the paper's weight sharing), with embeddings
scaled by √d_model. Masks are explicit: `src_valid_BS` says which source tokens are real (the rest
is padding that no query may attend to); the decoder is causal, and right padding of the target
comes after every real position, so it cannot affect one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.attention import init_cache, padding_mask, self_attention_mask
from plutao.model.blocks import ACT_BTD, Block, CrossBlock
from plutao.model.config import ModelConfig
from plutao.model.heads import Output, lm_logits
from plutao.model.layers import Norm, dropout, no_constraint, normal_param, sinusoidal_table

Array = jax.Array


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg = cfg.resolved()
        self.cfg = cfg
        self.compute_dtype = jnp.dtype(cfg.dtype)
        # N(0, 1/d) rows: after the √d scaling the embeddings have unit scale, and the tied output
        # projection gives logits of unit scale.
        self.token_embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                        cfg.d_model ** -0.5, role="embedding")
        self.pos_embed = (normal_param(rngs, (cfg.context_length, cfg.d_model), (None, "embed"), 0.02,
                                       role="embedding")
                          if cfg.positions == "learned" else None)
        self.encoder = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_encoder_layers or cfg.n_layers)])
        self.decoder = nnx.List([CrossBlock(cfg, rngs) for _ in range(cfg.n_layers)])
        self.encoder_norm = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps) if cfg.norm == "pre" else None
        self.decoder_norm = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps) if cfg.norm == "pre" else None

    def _embed(self, tokens_BT, positions_BT, key, constrain):
        cfg = self.cfg
        x_BTD = constrain(self.token_embed[...], (None, None))[tokens_BT] * math.sqrt(cfg.d_model)
        if cfg.positions == "learned":
            x_BTD = x_BTD + self.pos_embed[...][positions_BT]
        elif cfg.positions == "sinusoidal":
            x_BTD = x_BTD + sinusoidal_table(cfg.context_length, cfg.d_model)[positions_BT]
        return constrain(dropout(x_BTD, cfg.dropout, key).astype(self.compute_dtype), ACT_BTD)

    def encode(self, src_BS: Array, src_valid_BS: Array, *, dropout_key=None, return_weights=False,
               constrain=no_constraint):
        """The encoder output (B, S, D) and, if asked, each layer's self-attention weights (B, H, S, S)."""
        B, S = src_BS.shape
        keys = [None] * (len(self.encoder) + 1) if dropout_key is None else list(
            jax.random.split(dropout_key, len(self.encoder) + 1))
        positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        x_BSD = self._embed(src_BS, positions_BS, keys[-1], constrain)
        # Every query may see every real source token (bidirectional); padding is never a key.
        mask = padding_mask(src_valid_BS, S)
        weights = []
        for block, key in zip(self.encoder, keys):
            x_BSD, _, w = block(x_BSD, mask, positions_BS, dropout_key=key, return_weights=return_weights,
                                constrain=constrain)
            weights.append(w)
        if self.encoder_norm is not None:
            x_BSD = self.encoder_norm(x_BSD)
        return x_BSD, (weights if return_weights else None)

    def memory_kv(self, memory_BSD: Array) -> list[dict[str, Array]]:
        """Each decoder layer's cross-attention keys and values: computed once per source."""
        return [block.cross_attn.memory_kv(memory_BSD) for block in self.decoder]

    def init_cache(self, batch: int, length: int):
        """Empty self-attention KV caches for the decoder layers."""
        return init_cache(batch, length, self.cfg, self.compute_dtype)

    def decode(self, tgt_BT: Array, memory_kv: list[dict[str, Array]], src_valid_BS: Array, *, cache=None,
               cache_index: Array | int = 0, dropout_key=None, return_weights=False, constrain=no_constraint):
        """An `Output`: decoder hidden states (B, T, D) for target tokens at positions [cache_index,
        cache_index + T); with a cache, the earlier positions' keys and values come from it and the new
        ones are written into it. `self.logits(hidden)` projects them onto the vocabulary."""
        cfg = self.cfg
        B, T = tgt_BT.shape
        keys = [None] * (cfg.n_layers + 1) if dropout_key is None else list(
            jax.random.split(dropout_key, cfg.n_layers + 1))
        q_index_BT = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
        k_index_S = jnp.arange(T if cache is None else cache[0]["k"].shape[1])
        # Target padding needs no mask: it comes after every real target token, which causality already hides.
        self_mask = self_attention_mask(q_index_BT, k_index_S, cached=cache is not None)
        cross_mask = padding_mask(src_valid_BS, T)
        x_BTD = self._embed(tgt_BT, q_index_BT, keys[-1], constrain)
        new_cache, self_weights, cross_weights = [], [], []
        for i, block in enumerate(self.decoder):
            x_BTD, layer_cache, (w_self, w_cross) = block(
                x_BTD, self_mask, q_index_BT, memory_kv[i], cross_mask,
                cache=None if cache is None else cache[i], cache_index=cache_index, dropout_key=keys[i],
                return_weights=return_weights, constrain=constrain)
            new_cache.append(layer_cache)
            self_weights.append(w_self)
            cross_weights.append(w_cross)
        if self.decoder_norm is not None:
            x_BTD = self.decoder_norm(x_BTD)
        weights = {"decoder-self": self_weights, "cross": cross_weights} if return_weights else None
        return Output(x_BTD, None if cache is None else new_cache, weights)

    def logits(self, hidden_BTD: Array, constrain=no_constraint) -> Array:
        """The pre-softmax projection, tied to the shared embedding."""
        return lm_logits(hidden_BTD, self.token_embed[...].T, constrain)

    def __call__(self, src_BS: Array, src_valid_BS: Array, tgt_BT: Array, *, dropout_key=None,
                 return_weights=False, constrain=no_constraint):
        """Teacher-forced decoder hidden states for every target position (an `Output`), and attention
        weights if asked."""
        enc_key, dec_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        memory_BSD, enc_weights = self.encode(src_BS, src_valid_BS, dropout_key=enc_key,
                                              return_weights=return_weights, constrain=constrain)
        out = self.decode(tgt_BT, self.memory_kv(memory_BSD), src_valid_BS, dropout_key=dec_key,
                          return_weights=return_weights, constrain=constrain)
        return out._replace(weights={"encoder-self": enc_weights, **out.weights} if return_weights else None)
