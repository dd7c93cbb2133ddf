"""Recurrent language models (Elman RNN, LSTM, GRU): the baselines the Transformer replaced.

`RecurrentLM` has the GPT class's interface, so the trainer and the sampler run it unchanged: the
"cache" is the recurrent state (h, and c for the LSTM, per layer) and `cache_index` only serves to
tell left padding from real tokens. Activations run time-major (T, B, D) inside, because
`jax.lax.scan` steps over the leading axis.

Each layer computes the input projections of all time steps in one (T·B, D) @ (D, G·H) matmul
before the scan, so the sequential part is only the small recurrent matmul and the gate math.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.heads import Output
from plutao.model.layers import dropout, no_constraint, normal_param, zeros_param

Array = jax.Array
ACT_TBD = ("length", "batch", "act_embed")  # the same axes as GPT's x_BTD, time-major
N_GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # LSTM: input, forget, cell, output; GRU: reset, update, new


def orthogonal_param(rngs: nnx.Rngs, d_hidden: int, n_gates: int, axes: tuple[str | None, ...]) -> nnx.Param:
    """(H, G, H) recurrent weights with an orthogonal (H, H) block per gate.

    An orthogonal matrix preserves the norm of what it multiplies, so at initialisation the
    gradient through many time steps neither explodes nor vanishes because of the recurrent
    weights (Saxe et al., 2014). The plain tanh RNN, which has no gates to rescue it, needs this most.
    """
    keys = jax.random.split(rngs.params(), n_gates)
    q_GHH = jax.vmap(lambda k: orthogonal(k, d_hidden))(keys)
    return nnx.Param(q_GHH.transpose(1, 0, 2), axes=axes, role="weight")


def orthogonal(key: Array, n: int, iterations: int = 60) -> Array:
    """A random orthogonal (n, n) matrix: the polar factor of a Gaussian matrix (Haar-distributed, like
    QR with sign correction), by Newton–Schulz iteration X ← 1.5·X − 0.5·X·Xᵀ·X, which uses matmuls only.

    Not QR: XLA CPU's QR factorisation inside a jitted initialiser can deadlock its 2-thread pool on
    a 2-core machine (seen with jaxlib 0.10.2). Scaling by the Frobenius norm puts every singular value
    in (0, 1]; each iteration multiplies small ones by ~1.5 and then converges quadratically to 1.
    """
    a_NN = jax.random.normal(key, (n, n), jnp.float32)
    x_NN = a_NN / jnp.linalg.norm(a_NN)

    def step(x_NN, _):
        return 1.5 * x_NN - 0.5 * (x_NN @ x_NN.T) @ x_NN, None

    return jax.lax.scan(step, x_NN, None, length=iterations)[0]


class RecurrentLayer(nnx.Module):
    """One recurrent layer over a time-major sequence, starting from (and returning) its state.

    rnn:  h' = tanh(W x + U h + b)
    lstm: i, f, o = σ(·), g = tanh(·) of W x + U h + b;  c' = f c + i g;  h' = o tanh(c')
    gru:  r, z = σ(W x + U h + b);  n = tanh(W_n x + b_n + r (U_n h + b_hn));  h' = (1 - z) n + z h
    The GRU applies the reset gate after the recurrent matmul (as cuDNN and PyTorch do), so one
    (H, 3H) matmul per step serves all three gates.
    """

    def __init__(self, kind: str, d_in: int, d_hidden: int, rngs: nnx.Rngs):
        n_gates = N_GATES[kind]
        self.kind = kind
        # LeCun scale 1/√fan_in: a pre-activation's std equals the rms of the input, so hidden states in
        # (-1, 1) drive the gates within their responsive range rather than into saturation.
        self.w_x = normal_param(rngs, (d_in, n_gates, d_hidden), ("embed", None, "mlp"), 1.0 / math.sqrt(d_in))
        # Output units split over `mlp` like w_x's: under tensor parallelism the gates of a unit then
        # live on one device, and a step needs only h (B, H) gathered, not partial sums of all gates.
        self.w_h = orthogonal_param(rngs, d_hidden, n_gates, (None, None, "mlp"))
        b_GH = jnp.zeros((n_gates, d_hidden), jnp.float32)
        if kind == "lstm":
            # Forget gate open at the start (Gers et al., 2000; Jozefowicz et al., 2015): the cell
            # carries information and gradient across time until training learns to forget.
            b_GH = b_GH.at[1].set(1.0)
        self.b = nnx.Param(b_GH, axes=(None, "mlp"), role="bias")
        self.b_hn = zeros_param((d_hidden,), ("mlp",)) if kind == "gru" else None

    def __call__(self, x_TBD: Array, state: dict[str, Array], keep_TB: Array | None):
        """Outputs h (T, B, H) in x's dtype and the final state; steps where keep_TB is False leave the
        state unchanged."""
        dt = x_TBD.dtype
        T, B, D = x_TBD.shape
        _, G, H = self.w_x.shape
        xg_TBGH = (x_TBD.reshape(T * B, D) @ self.w_x[...].astype(dt).reshape(D, G * H)).reshape(T, B, G, H)
        xg_TBGH = xg_TBGH.astype(jnp.float32) + self.b[...]
        w_h_HN = self.w_h[...].astype(dt).reshape(H, G * H)
        b_hn_H = None if self.b_hn is None else self.b_hn[...]
        kind = self.kind

        def step(state, inputs):
            xg_BGH, keep_B = inputs
            h_BH = state["h"]
            hg_BGH = (h_BH.astype(dt) @ w_h_HN).reshape(B, G, H).astype(jnp.float32)
            h_BH = h_BH.astype(jnp.float32)
            if kind == "rnn":
                new = {"h": jnp.tanh(xg_BGH[:, 0] + hg_BGH[:, 0])}
            elif kind == "lstm":
                z_BGH = xg_BGH + hg_BGH
                i_BH, f_BH, o_BH = (jax.nn.sigmoid(z_BGH[:, k]) for k in (0, 1, 3))
                c_BH = f_BH * state["c"].astype(jnp.float32) + i_BH * jnp.tanh(z_BGH[:, 2])
                new = {"h": o_BH * jnp.tanh(c_BH), "c": c_BH}
            else:
                r_BH = jax.nn.sigmoid(xg_BGH[:, 0] + hg_BGH[:, 0])
                z_BH = jax.nn.sigmoid(xg_BGH[:, 1] + hg_BGH[:, 1])
                n_BH = jnp.tanh(xg_BGH[:, 2] + r_BH * (hg_BGH[:, 2] + b_hn_H))
                new = {"h": (1.0 - z_BH) * n_BH + z_BH * h_BH}
            if keep_B is not None:
                new = {k: jnp.where(keep_B[:, None], v, state[k]) for k, v in new.items()}
            # The carry keeps the dtype it came in with (scan and the sampler's while_loop need it).
            new = {k: v.astype(state[k].dtype) for k, v in new.items()}
            return new, new["h"].astype(dt)

        state, h_TBH = jax.lax.scan(step, state, (xg_TBGH, keep_TB))
        return h_TBH, state


class RecurrentLM(nnx.Module):
    """Embedding → n_layers recurrent layers (hidden size d_model) → vocabulary logits.

    Its "cache" is a state every fed token passes through, so padding cannot be fed after a row's
    tokens (model/agent.py: extend refuses it: `state_carries_padding`).

    Dropout follows Zaremba et al. (2014): on the non-recurrent connections only (embeddings,
    between layers, before the head), so the memory carried through time is not corrupted.
    Positions need no encoding: the recurrence itself orders the tokens.
    """

    state_carries_padding = True  # (model/agent.py: no right-padded extension of a live slot)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.family not in N_GATES:
            raise ValueError(f"RecurrentLM builds model.family rnn, lstm or gru, got {cfg.family!r}")
        self.cfg = cfg.resolved()
        self.compute_dtype = jnp.dtype(cfg.dtype)
        d = cfg.d_model
        # Std 1/√d, like the untied head's: tied or not, the initial logits have std rms(h) ≤ 1, a
        # near-uniform prediction.
        self.token_embed = normal_param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), 1.0 / math.sqrt(d),
                                        role="embedding")
        self.layers = nnx.List([RecurrentLayer(cfg.family, d, d, rngs) for _ in range(cfg.n_layers)])
        self.lm_head = (
            None if cfg.tie_embeddings
            else normal_param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), 1.0 / math.sqrt(d))
        )

    def init_cache(self, batch: int, length: int) -> list[dict[str, Array]]:
        """The zero state of every layer: {"h": (B, D)}, plus "c" for the LSTM. `length` is ignored (the
        state does not grow with the sequence); it is accepted because the sampler passes its context."""
        shape = (batch, self.cfg.d_model)
        names = ("h", "c") if self.cfg.family == "lstm" else ("h",)
        return [{k: jnp.zeros(shape, jnp.float32) for k in names} for _ in range(self.cfg.n_layers)]

    def __call__(
        self,
        tokens_BT: Array,
        *,
        cache: list[dict[str, Array]] | None = None,
        cache_index: Array | int = 0,
        first_valid_B: Array | None = None,
        dropout_key: Array | None = None,
        return_weights: bool = False,
        constrain=no_constraint,
    ):
        """An `Output`: hidden states (B, T, D), the updated state (None without a cache), and no
        attention weights.

        Without a cache the sequence starts from the zero state; with one it continues from it. Step t
        of row b is left padding when cache_index + t < first_valid_B[b] (cache_index: one number, or
        one per row): the state passes through unchanged, so padding never reaches real positions
        (its own logits are meaningless).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        keys = [None] * (cfg.n_layers + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, cfg.n_layers + 1))
        keep_TB = None
        if first_valid_B is not None:
            # cache_index is one number or one per row (B,) (decoding slots at their own columns).
            column_TB = jnp.reshape(cache_index, (1, -1)) + jnp.arange(T)[:, None]
            keep_TB = column_TB >= jnp.asarray(first_valid_B)[None, :]

        x_TBD = constrain(self.token_embed[...], (None, None))[jnp.asarray(tokens_BT).T]
        x_TBD = constrain(dropout(x_TBD, cfg.dropout, keys[-1]).astype(self.compute_dtype), ACT_TBD)
        state = self.init_cache(B, T) if cache is None else cache
        new_cache = []
        for i, layer in enumerate(self.layers):
            x_TBD, layer_state = layer(x_TBD, state[i], keep_TB)
            x_TBD = constrain(dropout(x_TBD, cfg.dropout, keys[i]), ACT_TBD)
            new_cache.append(layer_state)

        return Output(x_TBD.swapaxes(0, 1), None if cache is None else new_cache, None)

    def logits(self, hidden_BTD: Array, constrain=no_constraint) -> Array:
        """The LM head, on flat (B·T, D) rows: the layout XLA's CPU backend differentiates fastest."""
        head_DV = self.token_embed[...].T if self.lm_head is None else self.lm_head[...]
        lead = hidden_BTD.shape[:-1]
        x_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        logits = (x_ND @ head_DV.astype(self.compute_dtype)).astype(jnp.float32).reshape(*lead, -1)
        return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits
