"""The encoder-only Transformer (BERT): bidirectional self-attention over the whole sequence, trained
as a masked language model (predict the tokens hidden behind <mask>; see train/tasks/masked_lm.py).

The same `Block` as GPT with a padding mask instead of a causal one, and the LM head tied to the
token embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.attention import padding_mask, segment_bidirectional_mask
from plutao.model.blocks import ACT_BTD, Block
from plutao.model.config import ModelConfig
from plutao.model.heads import Output, lm_logits
from plutao.model.layers import INIT_STD, Norm, dropout, no_constraint, normal_param, sinusoidal_table

Array = jax.Array


class BERT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg = cfg.resolved()
        self.cfg = cfg
        self.compute_dtype = jnp.dtype(cfg.dtype)
        self.token_embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), INIT_STD,
                                        role="embedding")
        self.pos_embed = (normal_param(rngs, (cfg.context_length, cfg.d_model), (None, "embed"), INIT_STD,
                                       role="embedding")
                          if cfg.positions == "learned" else None)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps) if cfg.norm == "pre" else None
        self.lm_head = (None if cfg.tie_embeddings
                        else normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), INIT_STD))

    def __call__(self, tokens_BT: Array, valid_BT: Array | None = None, *, positions_BT: Array | None = None,
                 segment_ids_BT: Array | None = None, dropout_key=None, return_weights=False, constrain=no_constraint):
        """An `Output`: hidden states (B, T, D) at every position (each sees the whole sequence but
        padding, or with `segment_ids_BT` its own packed document only), and weights if asked."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        keys = [None] * (cfg.n_layers + 1) if dropout_key is None else list(
            jax.random.split(dropout_key, cfg.n_layers + 1))
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x_BTD = constrain(self.token_embed[...], (None, None))[tokens_BT]
        if cfg.positions == "learned":
            x_BTD = x_BTD + self.pos_embed[...][positions_BT]
        elif cfg.positions == "sinusoidal":
            x_BTD = x_BTD + sinusoidal_table(cfg.context_length, cfg.d_model)[positions_BT]
        x_BTD = constrain(dropout(x_BTD, cfg.dropout, keys[-1]).astype(self.compute_dtype), ACT_BTD)
        valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT
        mask = padding_mask(valid_BT, T) if segment_ids_BT is None else segment_bidirectional_mask(segment_ids_BT,
                                                                                                   valid_BT)
        weights = []
        for block, key in zip(self.blocks, keys):
            x_BTD, _, w = block(x_BTD, mask, positions_BT, dropout_key=key, return_weights=return_weights,
                                constrain=constrain)
            weights.append(w)
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return Output(x_BTD, None, weights if return_weights else None)

    def logits(self, hidden_BTD: Array, constrain=no_constraint) -> Array:
        """The masked-LM head: hidden states → float32 logits over the vocabulary."""
        head_DV = self.token_embed[...].T if self.lm_head is None else self.lm_head[...]
        return lm_logits(hidden_BTD, head_DV, constrain)
