"""The fused attention path gets structure (causality, key lengths), not a dense mask, and computes
what the explicit softmax(QKᵀ/√d)V path computes; MFU is measured against a peak that fits the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.attention import init_cache
from plutao.model.bert import BERT
from plutao.model.config import ModelConfig
from plutao.model.encoder_decoder import EncoderDecoder
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits


@pytest.fixture()
def calls(monkeypatch):
    """Every call of jax.nn.dot_product_attention, with the structure it was given."""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, **kw):
        lengths = kw.get("key_value_seq_lengths")
        seen.append({"T": q.shape[1], "S": k.shape[1], "dense_mask": mask is not None, "causal": kw.get("is_causal"),
                     "kv_lengths": None if lengths is None else np.asarray(lengths).tolist()})
        return real(q, k, v, bias, mask, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return seen


def pair(cfg: ModelConfig, build, seed=0):
    """The same weights with the explicit and the fused ("xla") attention."""
    naive = build(cfg, nnx.Rngs(seed))
    fused = build(ModelConfig(**{**cfg.__dict__, "attention": "xla"}), nnx.Rngs(seed))
    for (_, a), (_, b) in zip(nnx.iter_graph(naive), nnx.iter_graph(fused)):  # visibly input-dependent weights
        if isinstance(a, nnx.Param) and a[...].ndim >= 2:
            a[...] = a[...] * 6.0
            b[...] = a[...]
    return naive, fused


def test_gpt_training_is_causal_and_decoding_uses_key_lengths(calls):
    cfg = ModelConfig(vocab_size=61, context_length=24, n_layers=2, d_model=48, n_heads=4).resolved()
    naive, fused = pair(cfg, GPT)
    tokens = np.random.default_rng(5).integers(11, 61, (2, 24)).astype(np.int32)
    a, _ = forward_logits(naive, tokens)
    assert calls == []  # the explicit path never calls the fused kernel
    b, _ = forward_logits(fused, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    assert calls == [{"T": 24, "S": 24, "dense_mask": False, "causal": True, "kv_lengths": None}] * 2
    calls.clear()
    cache = init_cache(2, 24, cfg)
    cache = fused(tokens[:, :10], cache=cache, cache_index=0).cache  # prefill into a longer cache: dense
    d, _ = forward_logits(fused, tokens[:, 10:11], cache=cache, cache_index=10)
    np.testing.assert_allclose(np.asarray(d[:, 0]), np.asarray(a[:, 10]), atol=2e-5)
    assert [c["dense_mask"] for c in calls[:2]] == [True, True]
    assert calls[2:] == [{"T": 1, "S": 24, "dense_mask": False, "causal": False, "kv_lengths": [11, 11]}] * 2


def test_left_padded_decoding_keeps_the_dense_mask(calls):
    cfg = ModelConfig(vocab_size=61, context_length=16, n_layers=1, d_model=32, n_heads=4).resolved()
    naive, fused = pair(cfg, GPT)
    tokens = np.random.default_rng(1).integers(11, 61, (2, 6)).astype(np.int32)
    first = jnp.array([0, 3])
    a, _ = forward_logits(naive, tokens, cache=init_cache(2, 16, cfg), first_valid_B=first)
    b, _ = forward_logits(fused, tokens, cache=init_cache(2, 16, cfg), first_valid_B=first)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    assert calls and all(c["dense_mask"] for c in calls)


def test_masked_lm_padding_becomes_key_lengths(calls):
    cfg = ModelConfig(family="encoder", vocab_size=50, context_length=16, n_layers=2, d_model=32, n_heads=4)
    naive, fused = pair(cfg.resolved(), BERT)
    tokens = jnp.asarray(np.random.default_rng(2).integers(11, 50, (3, 14)), jnp.int32)
    valid = jnp.arange(14)[None, :] < jnp.array([[14], [9], [0]])  # full, right-padded, all padding
    a, _ = forward_logits(naive, tokens, valid)
    b, _ = forward_logits(fused, tokens, valid)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    assert calls == [{"T": 14, "S": 14, "dense_mask": False, "causal": False, "kv_lengths": [14, 9, 1]}] * 2


def test_translation_encoder_cross_and_decoder_attention_are_structured(calls):
    cfg = ModelConfig(family="encoder_decoder", vocab_size=40, context_length=16, n_layers=2, d_model=32,
                      n_heads=4).resolved()
    naive, fused = pair(cfg, EncoderDecoder)
    src = jnp.asarray(np.random.default_rng(3).integers(11, 40, (2, 7)), jnp.int32)
    valid = jnp.arange(7)[None, :] < jnp.array([[7], [4]])
    tgt = jnp.asarray(np.random.default_rng(4).integers(11, 40, (2, 5)), jnp.int32)
    a, _ = forward_logits(naive, src, valid, tgt)
    b, _ = forward_logits(fused, src, valid, tgt)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    encoder = {"T": 7, "S": 7, "dense_mask": False, "causal": False, "kv_lengths": [7, 4]}
    decoder = {"T": 5, "S": 5, "dense_mask": False, "causal": True, "kv_lengths": None}
    cross = {"T": 5, "S": 7, "dense_mask": False, "causal": False, "kv_lengths": [7, 4]}
    assert calls == [encoder, encoder, decoder, cross, decoder, cross]


def test_a_setting_the_fused_kernels_lack_is_told_in_one_line():
    from plutao.train.prepare import attention_note

    note = attention_note(ModelConfig(attention="cudnn", dropout=0.1))
    assert note and "\n" not in note and "model.dropout=0.1" in note and "explicit" in note
    assert attention_note(ModelConfig(attention="cudnn")) is None
    assert attention_note(ModelConfig(attention="naive", dropout=0.1)) is None


def test_mfu_peaks_are_published_figures_or_a_matmul_the_device_is_busy_with(monkeypatch):
    from plutao.train.run import metrics

    assert metrics.published_peak("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989e12
    assert metrics.published_peak("NVIDIA H100 PCIe", jnp.bfloat16) == 756e12
    assert metrics.published_peak("TPU v5 lite", jnp.bfloat16) == 197e12
    assert metrics.published_peak("NVIDIA H100 80GB HBM3", jnp.float32) is None
    assert metrics.published_peak("cpu", jnp.bfloat16) is None
    sizes = []
    real_ones = jnp.ones  # (record the size asked for; multiply something small)
    monkeypatch.setattr(metrics.jnp, "ones", lambda shape, dtype: sizes.append(shape) or real_ones((4, 4), dtype))
    peak, source = metrics.device_peak_flops(jnp.float32)
    assert sizes == [(1024, 1024)] and peak > 0 and "measured" in source  # (on a CPU)
    monkeypatch.setattr(metrics.jax, "default_backend", lambda: "gpu")
    sizes.clear()
    metrics.measure_matmul_peak(jnp.float32, repeats=1)
    assert sizes == [(8192, 8192)]  # an accelerator gets a matmul large enough not to measure dispatch
