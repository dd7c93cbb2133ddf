"""Sampling rules: temperature, greedy, top-k, top-p, seeds, KV-cache generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.decode import generate, stream
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig, SamplingError, filter_logits, next_token

LOGITS = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])


def test_temperature_to_zero_equals_greedy():
    logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3
    greedy = next_token(logits, jax.random.key(1), 0.0, 0, 1.0)
    for seed in range(5):
        cold = next_token(logits, jax.random.key(seed), 1e-4, 0, 1.0)
        np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), -1))


def test_top_k_keeps_exactly_k():
    kept = np.isfinite(np.asarray(filter_logits(LOGITS, 1.0, 3, 1.0)))[0]
    assert kept.tolist() == [True, True, False, False, False, True]
    draws = {int(next_token(LOGITS, jax.random.key(s), 1.0, 2, 1.0)[0]) for s in range(200)}
    assert draws == {0, 5}


def test_top_p_keeps_smallest_prefix_with_mass_at_least_p():
    probs = np.asarray(jax.nn.softmax(LOGITS))[0]
    order = np.argsort(-probs)
    for p in (0.05, 0.3, 0.6, 0.8, 0.95, 0.999):
        kept = np.isfinite(np.asarray(filter_logits(LOGITS, 1.0, 0, p)))[0]
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        assert set(np.flatnonzero(kept)) == set(order[:n].tolist())
        assert probs[kept].sum() >= p - 1e-6
        assert probs[order[: n - 1]].sum() < p  # one token fewer would not reach p


def test_sampling_follows_the_distribution():
    draws = np.array([int(next_token(LOGITS, jax.random.key(s), 1.0, 0, 1.0)[0]) for s in range(3000)])
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(LOGITS))[0], atol=0.03)


@pytest.fixture(scope="module")
def model():
    return GPT(ModelConfig(vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=2), nnx.Rngs(0))


def test_seed_reproduces_and_stream_equals_generate(model):
    cfg = SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=40, seed=7, stop_at_eot=False)
    a = generate(model, [[3, 4, 5]], cfg, eot_id=1, pad_id=0)
    b = generate(model, [[3, 4, 5]], cfg, eot_id=1, pad_id=0)
    other = generate(model, [[3, 4, 5]], SamplingConfig(**{**cfg.__dict__, "seed": 8}), eot_id=1, pad_id=0)
    assert a == b and a != other
    assert len(a[0]) == 40  # longer than the context: windows are re-prefilled
    assert list(stream(model, [3, 4, 5], cfg, eot_id=1, pad_id=0)) == a[0]


def test_batched_prompts_of_different_lengths(model):
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6, stop_at_eot=False)
    both = generate(model, [[3, 4, 5], [9, 8, 7, 6, 5, 4]], cfg, eot_id=1, pad_id=0)
    assert both[0] == generate(model, [[3, 4, 5]], cfg, eot_id=1, pad_id=0)[0]
    assert both[1] == generate(model, [[9, 8, 7, 6, 5, 4]], cfg, eot_id=1, pad_id=0)[0]


def test_greedy_generation_matches_argmax_of_full_forward(model):
    prompt = [3, 4, 5]
    out = generate(model, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=8, stop_at_eot=False),
                   eot_id=1, pad_id=0)[0]
    seq = list(prompt)
    for _ in range(8):
        logits, _ = forward_logits(model, np.array([seq], np.int32))
        seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert out == seq[3:]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"max_new_tokens": 0}])
def test_invalid_sampling_arguments(kwargs):
    with pytest.raises(SamplingError):
        SamplingConfig(**kwargs)


def test_prompt_longer_than_context(model):
    with pytest.raises(SamplingError, match="context is 16"):
        generate(model, [list(range(2, 20))], SamplingConfig(), eot_id=1, pad_id=0)
