"""Grouped-query attention and the Llama-family settings: GQA equals multi-head attention with each
key/value head repeated for its group; cached decoding equals the full forward; the cache shrinks by
n_heads / n_kv_heads; rotary θ and its long-context scaling match their formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import decoded_with_cache  # (tests/test_model.py)

from plutao.model.attention import init_cache
from plutao.model.config import ModelConfig
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits
from plutao.model.layers import rope_frequencies
from plutao.model.lora import Adapters, adapted_params
from plutao.train.config.schema import LoRAConfig

LLAMA = ModelConfig(vocab_size=67, context_length=24, n_layers=2, d_model=48, n_heads=4, norm_type="rmsnorm",
                    positions="rotary", activation="swiglu", rope_theta=500.0, norm_eps=1e-6)


def with_kv(n_kv, **kw):
    return ModelConfig(**{**LLAMA.__dict__, "n_kv_heads": n_kv, **kw}).resolved()


def as_multi_head(gqa: GPT, cfg: ModelConfig) -> GPT:
    """The same model with multi-head attention: W^K, W^V of key/value head g copied to each query
    head of its group (h // group == g)."""
    mha = GPT(with_kv(0, attention_bias=cfg.attention_bias), nnx.Rngs(9))
    params = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    group = cfg.n_heads // cfg.kv_heads
    for block in params["blocks"].values():
        attn = block["attn"]
        w_kv = np.repeat(np.asarray(attn.pop("w_kv")), group, axis=2)
        attn["w_qkv"] = np.concatenate([np.asarray(attn.pop("w_q"))[:, None], w_kv], axis=1)
        if "b_q" in attn:
            b_kv = np.repeat(np.asarray(attn.pop("b_kv")), group, axis=1)
            attn["b_qkv"] = np.concatenate([np.asarray(attn.pop("b_q"))[None], b_kv], axis=0)
    state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(mha, state)
    return mha


@pytest.mark.parametrize("n_kv", [1, 2])
@pytest.mark.parametrize("bias", ["off", "on"])
def test_grouped_query_attention_is_multi_head_with_shared_keys_and_values(n_kv, bias):
    cfg = with_kv(n_kv, attention_bias=bias)
    model = GPT(cfg, nnx.Rngs(0))
    if bias == "on":  # (non-zero biases, so they are checked too)
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param) and var.get_metadata().get("role") == "bias":
                var[...] = jnp.asarray(np.random.default_rng(3).normal(0, 0.1, var.shape), jnp.float32)
    tokens = np.random.default_rng(1).integers(0, 67, (3, 24)).astype(np.int32)
    a, _ = forward_logits(model, tokens)
    b, _ = forward_logits(as_multi_head(model, cfg), tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "xla"])
@pytest.mark.parametrize("n_kv", [1, 2])
def test_grouped_kv_cache_decoding_equals_full_forward(n_kv, impl):
    cfg = with_kv(n_kv, attention=impl)
    model = GPT(cfg, nnx.Rngs(0))
    tokens = np.random.default_rng(2).integers(0, 67, (3, 24)).astype(np.int32)
    full, _ = forward_logits(model, tokens)
    naive, _ = forward_logits(GPT(with_kv(n_kv, attention="naive"), nnx.Rngs(0)), tokens)  # (same weights)
    np.testing.assert_allclose(np.asarray(full), np.asarray(naive), atol=1e-5, rtol=1e-5)
    assert init_cache(3, 24, cfg)[0]["k"].shape == (3, 24, n_kv, cfg.d_head)
    np.testing.assert_allclose(decoded_with_cache(model, cfg, tokens), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_the_cache_shrinks_by_the_group_size():
    def nbytes(cfg):
        return sum(a.nbytes for layer in init_cache(2, 24, cfg) for a in layer.values())

    assert nbytes(with_kv(0)) == 4 * nbytes(with_kv(1)) == 2 * nbytes(with_kv(2))


def test_n_kv_heads_must_divide_n_heads():
    assert any("model.n_kv_heads=3 must divide model.n_heads=4" in p for p in with_kv(3).problems())
    assert not with_kv(2).problems()


def test_rope_frequencies_follow_theta_and_llama3_scaling():
    K = 64
    plain = np.asarray(rope_frequencies(K, with_kv(0, rope_theta=500000.0)))
    np.testing.assert_allclose(plain, [500000.0 ** (-2 * i / K) for i in range(K // 2)], rtol=1e-6)
    linear = np.asarray(rope_frequencies(K, with_kv(0, rope_theta=500000.0, rope_scaling="linear", rope_factor=4.0)))
    np.testing.assert_allclose(linear, plain / 4, rtol=1e-6)
    cfg = with_kv(0, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_context=8192)
    scaled = np.asarray(rope_frequencies(K, cfg))
    for f, s in zip(plain, scaled):  # (the published rule, one frequency at a time)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * f / 8 + smooth * f
        assert s == pytest.approx(want, rel=1e-5)


def test_lora_adapts_grouped_projections():
    cfg = with_kv(2)
    model = GPT(cfg, nnx.Rngs(0))
    adapters = Adapters(cfg, LoRAConfig(rank=2, targets=["attention"]), nnx.Rngs(1))
    for key in adapters.b:
        adapters.b[key][...] = jnp.ones_like(adapters.b[key][...])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    merged = adapted_params(params, adapters)
    attn, new = params["blocks"][0]["attn"], merged["blocks"][0]["attn"]
    assert new["w_kv"].shape == attn["w_kv"].shape == (48, 2, 2, 12)
    expected = np.asarray(attn["w_kv"][:, 0]) + np.asarray(adapters.delta("k0"))
    np.testing.assert_allclose(np.asarray(new["w_kv"][:, 0]), expected, rtol=1e-6)
