"""Multi-head scaled dot-product attention with an optional KV cache.

The cache is a plain pytree `{"k": (B, S, G, K), "v": (B, S, G, K)}` passed in and returned, so
decoding stays a pure function; G is the number of key/value heads (model.n_kv_heads: the heads
themselves, or fewer under grouped-query attention, which shrinks the cache by n_heads / G). During decoding, queries sit at cache columns
[index, index + T) and may attend to every filled column at or before their own. The index is one
number for the whole batch, or one per row (B,): a batch of decoding slots, each at its own column.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.layers import (
    INIT_STD,
    apply_rotary,
    dropout,
    no_constraint,
    normal_param,
    rope_frequencies,
    zeros_param,
)

Array = jax.Array
MASKED = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def attention_weights(q_BTHK: Array, k_BSHK: Array, mask_BTS: Array | None) -> Array:
    """softmax(QKᵀ/√d_k) over keys, in float32, with disallowed (False) positions masked out."""
    scale = 1.0 / math.sqrt(q_BTHK.shape[-1])
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32) * scale
    if mask_BTS is not None:
        logits_BHTS = jnp.where(mask_BTS[:, None, :, :], logits_BHTS, MASKED)
    return jax.nn.softmax(logits_BHTS, axis=-1)


def causal_mask(q_index_BT: Array, k_index_S: Array, first_valid_B: Array | None = None) -> Array:
    """True where query t may see key s: s ≤ t, and s is not left padding of row b."""
    mask_BTS = k_index_S[None, None, :] <= q_index_BT[:, :, None]
    if first_valid_B is not None:
        mask_BTS &= k_index_S[None, None, :] >= first_valid_B[:, None, None]
    return mask_BTS


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may see, in the two forms the attention paths take.

    `allowed_BTS` (True = may attend) is what the explicit softmax(QKᵀ/√d)V path applies. The fused
    kernels behind `jax.nn.dot_product_attention` want structure instead of a dense mask (which cuDNN
    would turn into an additive bias): `causal` (key s ≤ query t, both counted from 0) and
    `kv_lengths_B` (keys from this index on are padding). They are set only where they describe
    `allowed_BTS` exactly; otherwise the dense mask is passed.
    """

    allowed_BTS: Array
    causal: bool = False
    kv_lengths_B: Array | None = None

    @property
    def structured(self) -> bool:
        return self.causal or self.kv_lengths_B is not None


def self_attention_mask(q_index_BT: Array, k_index_S: Array, first_valid_B: Array | None = None, *,
                        cached: bool = False) -> Mask:
    """Causal self-attention. Without a cache and left padding: `causal`. Decoding one token at cache
    column i_b of row b without left padding: the first i_b + 1 keys, i.e. `kv_lengths_B = i_B + 1`."""
    allowed_BTS = causal_mask(q_index_BT, k_index_S, first_valid_B)
    if first_valid_B is not None:
        return Mask(allowed_BTS)
    if not cached:
        return Mask(allowed_BTS, causal=True)
    if q_index_BT.shape[1] == 1:
        return Mask(allowed_BTS, kv_lengths_B=(q_index_BT[:, 0] + 1).astype(jnp.int32))
    return Mask(allowed_BTS)


def same_segment(segment_ids_BT: Array) -> Array:
    """(B, T, T): True where query t and key s belong to the same packed document."""
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def segment_causal_mask(segment_ids_BT: Array) -> Mask:
    """Causal self-attention within each packed document (block-diagonal causal): a token sees the
    earlier tokens of its own document only."""
    T = segment_ids_BT.shape[1]
    index_T = jnp.arange(T)
    return Mask((index_T[None, :, None] >= index_T[None, None, :]) & same_segment(segment_ids_BT))


def segment_bidirectional_mask(segment_ids_BT: Array, valid_BT: Array) -> Mask:
    """Bidirectional attention within each packed document (block-diagonal), never to padding. A
    query whose document has no real key (a padding row) keeps its own position, so no softmax is over
    nothing."""
    T = segment_ids_BT.shape[1]
    allowed_BTS = same_segment(segment_ids_BT) & valid_BT[:, None, :]
    allowed_BTS |= jnp.eye(T, dtype=bool)[None] & ~jnp.any(allowed_BTS, axis=-1, keepdims=True)
    return Mask(allowed_BTS)


def padding_mask(valid_BS: Array, T: int) -> Mask:
    """Every query may see every real key; `valid_BS` must be a prefix of each row (right padding), as
    every batch here is. A row of padding only keeps one key, so no softmax is over nothing."""
    B, S = valid_BS.shape
    lengths_B = jnp.maximum(jnp.sum(valid_BS, axis=-1), 1).astype(jnp.int32)
    keys_BS = jnp.arange(S)[None, :] < lengths_B[:, None]
    return Mask(jnp.broadcast_to(keys_BS[:, None, :], (B, T, S)), kv_lengths_B=lengths_B)


def init_cache(batch: int, length: int, cfg: ModelConfig, dtype=jnp.float32):
    """An empty KV cache for every layer: a list of per-layer dicts, or one dict of (L, ...) arrays
    when the layers are scanned."""
    cfg = cfg.resolved()
    shape = (batch, length, cfg.kv_heads, cfg.d_head)
    if cfg.scan_layers:
        stacked = (cfg.n_layers, *shape)
        return {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def write_cache(cache_BSHK: Array, new_BTHK: Array, cache_index: Array | int) -> Array:
    """The cache with `new_BTHK` written at columns [cache_index, cache_index + T).

    One index for the batch is a dynamic_update_slice. One index per row (B,) lets every row of a
    batch of decoding slots write at its own column; columns outside [0, S) are dropped rather than
    clamped, so a left-padded prefill can start at a negative column and only its real tokens land
    in the cache (from column 0), and a write past the end changes nothing.
    """
    new_BTHK = new_BTHK.astype(cache_BSHK.dtype)
    if jnp.ndim(cache_index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache_BSHK, new_BTHK, cache_index, 1)
    B, T = new_BTHK.shape[:2]
    S = cache_BSHK.shape[1]
    cols_BT = jnp.asarray(cache_index, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
    # Negative indices would wrap around; send them past the end, where mode="drop" discards them.
    cols_BT = jnp.where((cols_BT >= 0) & (cols_BT < S), cols_BT, S)
    return cache_BSHK.at[jnp.arange(B)[:, None], cols_BT].set(new_BTHK, mode="drop")


def attend(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array, mask: Mask, w_o_HKD: Array, b_o, *, impl: str,
           dropout_rate: float, dropout_key: Array | None, return_weights: bool) -> tuple[Array, Array | None]:
    """softmax(QKᵀ/√d_k)V per head, heads concatenated and projected by W^O: (out (B, T, D), weights or None).

    Keys and values may have fewer heads G than the queries' H (grouped-query attention): query head h
    reads key/value head h // (H / G). impl != "naive" calls the fused `jax.nn.dot_product_attention` with the mask's structure, except
    where a setting needs the explicit path: returned weights, or dropout on the weights."""
    dt = q_BTHK.dtype
    B, T, H, K = q_BTHK.shape
    D = w_o_HKD.shape[-1]
    fused = impl != "naive" and not return_weights and (dropout_key is None or dropout_rate == 0.0)
    if fused:
        weights_BHTS = None
        implementation = None if impl == "auto" else impl
        if mask.structured:
            out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=mask.causal,
                                                    key_value_seq_lengths=mask.kv_lengths_B,
                                                    implementation=implementation)
        else:
            out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask.allowed_BTS[:, None],
                                                    implementation=implementation)
    else:
        if k_BSHK.shape[2] != H:  # (each key/value head repeated for the query heads of its group)
            k_BSHK, v_BSHK = (jnp.repeat(a, H // a.shape[2], axis=2) for a in (k_BSHK, v_BSHK))
        weights_BHTS = attention_weights(q_BTHK, k_BSHK, mask.allowed_BTS)
        probs_BHTS = dropout(weights_BHTS, dropout_rate, dropout_key).astype(dt)
        out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
    out_BTD = (out_BTHK.reshape(B * T, H * K) @ w_o_HKD.astype(dt).reshape(H * K, D)).reshape(B, T, D)
    if b_o is not None:
        out_BTD = out_BTD + b_o[...].astype(dt)
    return out_BTD, (weights_BHTS if return_weights else None)


class MultiHeadAttention(nnx.Module):
    """h heads of scaled dot-product attention, concatenated and projected by W^O. With fewer key/value
    heads than query heads (model.n_kv_heads, grouped-query attention) W^Q and W^{KV} are separate
    weights; otherwise one fused W^{QKV}, so a single matmul reads x once."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, g = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.kv_heads
        self.rotary = cfg.positions == "rotary"
        self.rope = cfg  # (static: the frequencies are constants of the traced program)
        self.dropout_rate = cfg.dropout
        self.impl = cfg.attention
        bias = cfg.attn_bias
        if cfg.grouped:
            self.w_q = normal_param(rngs, (d, h, k), ("embed", "heads", "kv"), INIT_STD)
            self.w_kv = normal_param(rngs, (d, 2, g, k), ("embed", None, "kv_heads", "kv"), INIT_STD)
            self.b_q = zeros_param((h, k), ("heads", "kv")) if bias else None
            self.b_kv = zeros_param((2, g, k), (None, "kv_heads", "kv")) if bias else None
        else:
            # W^Q, W^K, W^V stored as one (D, 3, H, K) tensor.
            self.w_qkv = normal_param(rngs, (d, 3, h, k), ("embed", None, "heads", "kv"), INIT_STD)
            self.b_qkv = zeros_param((3, h, k), (None, "heads", "kv")) if bias else None
        self.w_o = normal_param(rngs, (h, k, d), ("heads", "kv", "embed"), INIT_STD / math.sqrt(2 * cfg.n_layers))
        self.b_o = zeros_param((d,), ("embed",)) if bias else None

    def project(self, x_BTD: Array, constrain=no_constraint) -> tuple[Array, Array, Array]:
        """Queries (B, T, H, K), keys and values (B, T, G, K) of x."""
        dt = x_BTD.dtype
        B, T, D = x_BTD.shape
        # Projections on flat (B·T, D) rows: the layout XLA's CPU backend handles best. The weights keep
        # heads a separate axis that tensor parallelism can split.
        x_ND = x_BTD.reshape(B * T, D)
        if hasattr(self, "w_qkv"):
            qkv_N3HK = jnp.einsum("nd,dshk->nshk", x_ND, self.w_qkv[...].astype(dt))
            if self.b_qkv is not None:
                qkv_N3HK = qkv_N3HK + self.b_qkv[...].astype(dt)
            H, K = qkv_N3HK.shape[2:]
            return tuple(constrain(qkv_N3HK[:, i].reshape(B, T, H, K), ("batch", "length", "heads", "kv"))
                         for i in range(3))
        q_NHK = jnp.einsum("nd,dhk->nhk", x_ND, self.w_q[...].astype(dt))
        kv_N2GK = jnp.einsum("nd,dsgk->nsgk", x_ND, self.w_kv[...].astype(dt))
        if self.b_q is not None:
            q_NHK, kv_N2GK = q_NHK + self.b_q[...].astype(dt), kv_N2GK + self.b_kv[...].astype(dt)
        G, K = kv_N2GK.shape[2:]
        q_BTHK = constrain(q_NHK.reshape(B, T, -1, K), ("batch", "length", "heads", "kv"))
        k_BTGK, v_BTGK = (constrain(kv_N2GK[:, i].reshape(B, T, G, K), ("batch", "length", "kv_heads", "kv"))
                          for i in range(2))
        return q_BTHK, k_BTGK, v_BTGK

    def __call__(
        self,
        x_BTD: Array,
        mask: Mask,
        positions_BT: Array,
        *,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        dropout_key: Array | None = None,
        return_weights: bool = False,
        constrain=no_constraint,
    ):
        dt = x_BTD.dtype
        q_BTHK, k_BTGK, v_BTGK = self.project(x_BTD, constrain)
        if self.rotary:
            inv_freq_F = rope_frequencies(q_BTHK.shape[-1], self.rope)
            q_BTHK = apply_rotary(q_BTHK, positions_BT, inv_freq_F)
            k_BTGK = apply_rotary(k_BTGK, positions_BT, inv_freq_F)
        if cache is not None:
            k_BSGK = write_cache(cache["k"], k_BTGK, cache_index)
            v_BSGK = write_cache(cache["v"], v_BTGK, cache_index)
            cache = {"k": k_BSGK, "v": v_BSGK}
            k_BSGK, v_BSGK = k_BSGK.astype(dt), v_BSGK.astype(dt)
        else:
            k_BSGK, v_BSGK = k_BTGK, v_BTGK
        out_BTD, weights_BHTS = attend(q_BTHK, k_BSGK, v_BSGK, mask, self.w_o[...], self.b_o, impl=self.impl,
                                       dropout_rate=self.dropout_rate, dropout_key=dropout_key,
                                       return_weights=return_weights)
        return out_BTD, cache, (weights_BHTS if return_weights else None)


class CrossAttention(nnx.Module):
    """Encoder-decoder attention: queries from the decoder, keys and values from the encoder output.

    The keys and values depend only on the encoder output, so a decoder computes them once per
    source (`memory_kv`) and reuses them at every decoding step.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k = cfg.d_model, cfg.n_heads, cfg.d_head
        self.dropout_rate = cfg.dropout
        self.impl = cfg.attention
        self.w_q = normal_param(rngs, (d, h, k), ("embed", "heads", "kv"), INIT_STD)
        self.w_kv = normal_param(rngs, (d, 2, h, k), ("embed", None, "heads", "kv"), INIT_STD)
        self.w_o = normal_param(rngs, (h, k, d), ("heads", "kv", "embed"), INIT_STD / math.sqrt(2 * cfg.n_layers))
        self.b_q = zeros_param((h, k), ("heads", "kv")) if cfg.bias else None
        self.b_kv = zeros_param((2, h, k), (None, "heads", "kv")) if cfg.bias else None
        self.b_o = zeros_param((d,), ("embed",)) if cfg.bias else None

    def memory_kv(self, memory_BSD: Array) -> dict[str, Array]:
        B, S, D = memory_BSD.shape
        dt = memory_BSD.dtype
        kv_N2HK = jnp.einsum("nd,dshk->nshk", memory_BSD.reshape(B * S, D), self.w_kv[...].astype(dt))
        if self.b_kv is not None:
            kv_N2HK = kv_N2HK + self.b_kv[...].astype(dt)
        H, K = kv_N2HK.shape[2:]
        return {"k": kv_N2HK[:, 0].reshape(B, S, H, K), "v": kv_N2HK[:, 1].reshape(B, S, H, K)}

    def __call__(self, x_BTD: Array, kv: dict[str, Array], mask: Mask, *, dropout_key: Array | None = None,
                 return_weights: bool = False, constrain=no_constraint):
        B, T, D = x_BTD.shape
        dt = x_BTD.dtype
        q_BTHK = jnp.einsum("nd,dhk->nhk", x_BTD.reshape(B * T, D), self.w_q[...].astype(dt))
        if self.b_q is not None:
            q_BTHK = q_BTHK + self.b_q[...].astype(dt)
        q_BTHK = constrain(q_BTHK.reshape(B, T, *q_BTHK.shape[1:]), ("batch", "length", "heads", "kv"))
        return attend(q_BTHK, kv["k"].astype(dt), kv["v"].astype(dt), mask, self.w_o[...], self.b_o,
                      impl=self.impl, dropout_rate=self.dropout_rate, dropout_key=dropout_key,
                      return_weights=return_weights)
