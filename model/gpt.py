"""The decoder-only Transformer (GPT): embeddings + positions → N residual blocks → (LM head).

Read top to bottom: `GPT` stacks `Block`s (model/blocks.py: causal self-attention then MLP, each
with Add & Norm in pre- or post-norm arrangement) and maps the final hidden states to vocabulary logits (optionally
through the transposed token-embedding matrix).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.attention import init_cache, segment_causal_mask, self_attention_mask
from plutao.model.blocks import ACT_BTD, Block
from plutao.model.config import ModelConfig
from plutao.model.heads import Output, lm_logits
from plutao.model.layers import (
    INIT_STD,
    Norm,
    dropout,
    no_constraint,
    normal_param,
    sinusoidal_table,
)

Array = jax.Array
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg = cfg.resolved()
        self.cfg = cfg
        self.compute_dtype = jnp.dtype(cfg.dtype)
        self.token_embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), INIT_STD,
                                        role="embedding")
        self.pos_embed = (
            normal_param(rngs, (cfg.context_length, cfg.d_model), (None, "embed"), INIT_STD, role="embedding")
            if cfg.positions == "learned" else None
        )
        self.blocks = stacked_blocks(cfg, rngs) if cfg.scan_layers else nnx.List([Block(cfg, rngs)
                                                                                  for _ in range(cfg.n_layers)])
        # Post-norm blocks already end in a norm; pre-norm needs one before the head (GPT-2).
        self.final_norm = Norm(cfg.d_model, cfg.norm_type, cfg.bias, cfg.norm_eps) if cfg.norm == "pre" else None
        self.lm_head = (
            None if cfg.tie_embeddings
            else normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), INIT_STD)
        )

    def init_cache(self, batch: int, length: int):
        """An empty KV cache for incremental decoding (see model/decode.py)."""
        return init_cache(batch, length, self.cfg, self.compute_dtype)

    def __call__(
        self,
        tokens_BT: Array,
        *,
        positions_BT: Array | None = None,
        segment_ids_BT: Array | None = None,
        cache: list[dict[str, Array]] | None = None,
        cache_index: Array | int = 0,
        first_valid_B: Array | None = None,
        dropout_key: Array | None = None,
        return_weights: bool = False,
        constrain=no_constraint,
    ):
        """An `Output` (model/heads.py): final hidden states (B, T, D), the updated cache, and per-layer
        attention weights if asked; `self.logits(hidden)` is the LM head.

        `constrain(x, axis_names)` pins activations to a sharding (the trainer passes one built from
        its mesh); by default nothing is pinned.

        Without a cache, token t attends to tokens ≤ t. With a cache, the T tokens occupy cache
        columns [cache_index, cache_index + T); rows may be left-padded, their real tokens starting
        at column first_valid_B (positions are counted from there). `cache_index` may be one column
        per row (B,); columns outside the cache are not written (model/attention.py: write_cache),
        so a left-padded prefill starting at column len_b − T puts row b's tokens at [0, len_b).

        Packed rows (no cache): `segment_ids_BT` keeps each document's tokens from attending to another
        document's, and `positions_BT` (e.g. restarting at 0 for each document) replaces 0..T-1.
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if cache is None:
            q_index_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
            k_index_S = jnp.arange(T)
        else:
            # One start column for the batch, or one per row (B,): slots decoding at their own columns.
            q_index_BT = jnp.broadcast_to(jnp.reshape(cache_index, (-1, 1)) + jnp.arange(T), (B, T))
            k_index_S = jnp.arange(cache["k"].shape[2] if cfg.scan_layers else cache[0]["k"].shape[1])
        if positions_BT is None:
            positions_BT = q_index_BT if first_valid_B is None else jnp.maximum(q_index_BT - first_valid_B[:, None], 0)
        if segment_ids_BT is not None and cache is None:
            mask = segment_causal_mask(segment_ids_BT)
        else:
            mask = self_attention_mask(q_index_BT, k_index_S, first_valid_B, cached=cache is not None)

        keys = [None] * (cfg.n_layers + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, cfg.n_layers + 1))
        # Lookups read whole tables (gathered first under FSDP/TP): a row gather from a sharded
        # table is something XLA's partitioner can only do by replicating it anyway.
        x_BTD = constrain(self.token_embed[...], (None, None))[tokens_BT]
        if cfg.positions == "learned":
            x_BTD = x_BTD + constrain(self.pos_embed[...], (None, None))[positions_BT]
        elif cfg.positions == "sinusoidal":
            x_BTD = x_BTD + sinusoidal_table(cfg.context_length, cfg.d_model)[positions_BT]
        x_BTD = constrain(dropout(x_BTD, cfg.dropout, keys[-1]).astype(self.compute_dtype), ACT_BTD)

        new_cache, all_weights = [], []
        if cfg.scan_layers:
            if return_weights:
                raise ValueError("attention weights are not collected from scanned layers; use model.scan_layers=false")
            step_keys = None if dropout_key is None else jnp.stack(keys[:-1])
            x_BTD, new_cache = self._scan(x_BTD, mask, positions_BT, cache, cache_index, step_keys, constrain)
        elif cfg.remat != "none" and cache is None and not return_weights:
            def run(block, x_BTD, key):
                return block(x_BTD, mask, positions_BT, dropout_key=key, constrain=constrain)[0]

            run = nnx.remat(run, policy=REMAT_POLICIES[cfg.remat])
            for i, block in enumerate(self.blocks):
                x_BTD = run(block, x_BTD, keys[i])
        else:
            for i, block in enumerate(self.blocks):
                x_BTD, layer_cache, weights = block(
                    x_BTD, mask, positions_BT, cache=None if cache is None else cache[i],
                    cache_index=cache_index, dropout_key=keys[i], return_weights=return_weights, constrain=constrain)
                new_cache.append(layer_cache)
                all_weights.append(weights)
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return Output(x_BTD, None if cache is None else new_cache, all_weights if return_weights else None)

    def logits(self, hidden_BTD: Array, constrain=no_constraint) -> Array:
        """The LM head: hidden states (…, D) → float32 logits (…, V), through the transposed token
        embedding (tied) or `lm_head`."""
        head_DV = self.token_embed[...].T if self.lm_head is None else self.lm_head[...]
        return lm_logits(hidden_BTD, head_DV, constrain)

    def _scan(self, x_BTD, mask, positions_BT, cache, cache_index, keys, constrain):
        """All blocks as one scan over their stacked weights (and stacked cache and dropout keys)."""
        def step(block, x_BTD, layer_cache, key):
            x_BTD, layer_cache, _ = block(x_BTD, mask, positions_BT, cache=layer_cache, cache_index=cache_index,
                                          dropout_key=key, constrain=constrain)
            return x_BTD, layer_cache

        if self.cfg.remat != "none" and cache is None:
            step = nnx.remat(step, policy=REMAT_POLICIES[self.cfg.remat])

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
        def body(x_BTD, block, layer_cache, key):
            return step(block, x_BTD, layer_cache, key)

        return body(x_BTD, self.blocks, cache, keys)


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers blocks as one Block whose parameters have a leading `layers` axis."""
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(cfg, rngs)

    blocks = make(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Param):
            var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
    return blocks
