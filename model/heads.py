"""What every model returns, and the heads that read it.

A model's forward pass returns an `Output`: the final hidden states (after the last norm), plus the
updated KV cache and the attention weights when asked for. Heads are separate:

- the LM head, `model.logits(hidden_..D)`: hidden states → vocabulary logits, through the transposed
  token embedding (tied) or the model's own `lm_head` matrix. It reads any subset of positions, so
  sampling computes logits for the last position only;
- `ScalarHead`: one number per sequence read from the hidden state at a chosen position (the score of
  a reward model, the value of a state), or one per position.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.layers import INIT_STD, no_constraint, normal_param, zeros_param

Array = jax.Array


class Output(NamedTuple):
    hidden_BTD: Array  # final hidden states, in the compute dtype
    cache: Any = None  # the updated KV cache (or recurrent state), when decoding with one
    weights: Any = None  # per-layer attention weights, when asked for


def lm_logits(hidden_BTD: Array, head_DV: Array, constrain=no_constraint) -> Array:
    """Hidden states (…, D) → float32 logits (…, V) through a (D, V) head matrix."""
    logits = (hidden_BTD @ head_DV.astype(hidden_BTD.dtype)).astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits


def forward_logits(model, *args, **kwargs) -> tuple[Array, Output]:
    """`model(*args, **kwargs)` followed by its LM head at every position: (logits, output)."""
    out = model(*args, **kwargs)
    return model.logits(out.hidden_BTD, constrain=kwargs.get("constrain", no_constraint)), out


class ScalarHead(nnx.Module):
    """A scalar from a hidden state: w·h + b. Initialised near zero (w ~ N(0, 0.02²), b = 0), so a fresh
    reward or value head starts out indifferent."""

    def __init__(self, d_model: int, rngs: nnx.Rngs):
        self.w = normal_param(rngs, (d_model,), ("embed",), INIT_STD)
        self.b = zeros_param((), ())

    def __call__(self, hidden_BTD: Array, index_B: Array | None = None) -> Array:
        """(B,) scores read at position index_B[b] of each row, or (B, T) scores at every position."""
        if index_B is not None:
            hidden_BTD = jnp.take_along_axis(hidden_BTD, index_B[:, None, None], axis=1)[:, 0]
        return (hidden_BTD.astype(jnp.float32) @ self.w[...]) + self.b[...]
