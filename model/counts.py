"""Parameter counts without allocating (the model traced abstractly) and training FLOPs per token."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.families import TRANSFORMERS, build_model


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

