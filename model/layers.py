"""Building blocks shared by every model family: linear maps, embeddings, positions, norms, MLPs.

Parameters carry semantic axis names (`axes=("embed", "mlp")`); train/parallel/sharding.py maps those names
to mesh axes through one table, so nothing here knows about devices. Parameters are float32; each
layer casts them to the compute dtype at use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.config import ModelConfig

Array = jax.Array
INIT_STD = 0.02  # GPT-2's initialiser scale


def no_constraint(x: Array, axes: tuple[str, ...]) -> Array:
    """The default activation-sharding hook: leave placement to XLA (or to a single device)."""
    return x


# What a parameter is for, recorded on it (`role` metadata) where it is created: the optimizer
# decays weights (and, if asked, embeddings) by role, never by shape (a stacked norm scale is 2-D).
ROLES = ("weight", "embedding", "bias", "norm", "adapter")


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float,
                 role: str = "weight") -> nnx.Param:
    assert len(shape) == len(axes) and role in ROLES, (shape, axes, role)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes, role=role)


def zeros_param(shape: tuple[int, ...], axes: tuple[str | None, ...], role: str = "bias") -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), axes=axes, role=role)


def ones_param(shape: tuple[int, ...], axes: tuple[str | None, ...], role: str = "norm") -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.float32), axes=axes, role=role)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; a no-op when rate is 0 or no key is given (evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def sinusoidal_table(length: int, d_model: int) -> Array:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos_L1 = jnp.arange(length, dtype=jnp.float32)[:, None]
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)
    angle_LH = pos_L1 / jnp.power(10000.0, two_i / d_model)
    table_LD = jnp.zeros((length, d_model), jnp.float32)
    table_LD = table_LD.at[:, 0::2].set(jnp.sin(angle_LH))
    return table_LD.at[:, 1::2].set(jnp.cos(angle_LH[:, : d_model // 2]))


def rope_frequencies(d_head: int, cfg: ModelConfig | None = None) -> Array:
    """The rotary frequencies θ^(-2i/d_head), i < d_head/2 (θ = model.rope_theta, 10000 by default),
    rescaled for long contexts as model.rope_scaling says (what Llama-family configs call
    rope_scaling / rope_parameters: "linear", or Llama 3.1's "llama3")."""
    half = d_head // 2
    theta = cfg.rope_theta if cfg is not None else 10000.0
    inv_freq_F = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if cfg is None or cfg.rope_scaling == "none":
        return inv_freq_F
    if cfg.rope_scaling == "linear":
        return inv_freq_F / cfg.rope_factor
    # llama3: long wavelengths slowed by the factor, short ones kept, the band between interpolated.
    factor, old = cfg.rope_factor, cfg.rope_original_context
    low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
    wavelen_F = 2 * math.pi / inv_freq_F
    scaled_F = jnp.where(wavelen_F > low_wavelen, inv_freq_F / factor, inv_freq_F)
    smooth_F = (old / wavelen_F - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed_F = (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F
    medium_F = (wavelen_F >= high_wavelen) & (wavelen_F <= low_wavelen)
    return jnp.where(medium_F, smoothed_F, scaled_F)


def apply_rotary(x_BTHK: Array, positions_BT: Array, inv_freq_F: Array | None = None) -> Array:
    """Rotate feature pairs (i, i + K/2) by position × frequency i (RoPE in the half-split layout that
    Llama-family checkpoints use); `inv_freq_F` defaults to θ = 10000."""
    half = x_BTHK.shape[-1] // 2
    if inv_freq_F is None:
        inv_freq_F = rope_frequencies(x_BTHK.shape[-1])
    angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
    sin_BT1F = jnp.sin(angle_BTF)[:, :, None, :]
    cos_BT1F = jnp.cos(angle_BTF)[:, :, None, :]
    x1, x2 = x_BTHK[..., :half].astype(jnp.float32), x_BTHK[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return out.astype(x_BTHK.dtype)


class Norm(nnx.Module):
    """LayerNorm (mean/variance, optional bias) or RMSNorm (root mean square only); computed in f32."""

    def __init__(self, d_model: int, kind: str, bias: bool, eps: float = 1e-5):  # (eps: model.norm_eps)
        self.kind, self.eps = kind, eps
        self.scale = ones_param((d_model,), ("embed",))
        self.bias = zeros_param((d_model,), ("embed",)) if (bias and kind == "layernorm") else None

    def __call__(self, x_BTD: Array) -> Array:
        x = x_BTD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...]
        if self.bias is not None:
            x = x + self.bias[...]
        return x.astype(x_BTD.dtype)


class FeedForward(nnx.Module):
    """Position-wise MLP: relu/gelu (two maps) or SwiGLU (gated, three maps)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.activation = cfg.activation
        self.w_in = normal_param(rngs, (d, f), ("embed", "mlp"), INIT_STD)
        self.w_gate = normal_param(rngs, (d, f), ("embed", "mlp"), INIT_STD) if cfg.activation == "swiglu" else None
        # Residual-path outputs are scaled down with depth (GPT-2) so the stream's variance stays bounded.
        self.w_out = normal_param(rngs, (f, d), ("mlp", "embed"), INIT_STD / math.sqrt(2 * cfg.n_layers))
        self.b_in = zeros_param((f,), ("mlp",)) if cfg.ffn_bias else None
        self.b_out = zeros_param((d,), ("embed",)) if cfg.ffn_bias else None
        # (the gate's bias only when asked for by name: runs saved with model.bias=true and SwiGLU have none)
        self.b_gate = zeros_param((f,), ("mlp",)) if cfg.activation == "swiglu" and cfg.mlp_bias == "on" else None

    def __call__(self, x_BTD: Array, constrain=no_constraint) -> Array:
        dt = x_BTD.dtype
        B, T, D = x_BTD.shape
        # Flat (B·T, D) rows: XLA's CPU backend transposes 2-D activations for the weight
        # gradients far faster than 3-D ones.
        x_ND = x_BTD.reshape(B * T, D)
        h_NF = x_ND @ self.w_in[...].astype(dt)
        if self.b_in is not None:
            h_NF = h_NF + self.b_in[...].astype(dt)
        h_NF = constrain(h_NF, ("batch", "mlp"))
        if self.activation == "relu":
            h_NF = jax.nn.relu(h_NF)
        elif self.activation == "gelu":
            h_NF = jax.nn.gelu(h_NF, approximate=True)
        else:
            gate_NF = x_ND @ self.w_gate[...].astype(dt)
            if self.b_gate is not None:
                gate_NF = gate_NF + self.b_gate[...].astype(dt)
            h_NF = jax.nn.silu(gate_NF) * h_NF
        out_ND = h_NF @ self.w_out[...].astype(dt)
        if self.b_out is not None:
            out_ND = out_ND + self.b_out[...].astype(dt)
        return out_ND.reshape(B, T, D)
