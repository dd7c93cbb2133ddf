"""Heads read the hidden states every model returns: the LM head gives the logits the model always
gave, and a scalar head reads the position it is told to (a reward read at the wrong token is the
classic failure of reward models)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.gpt import GPT
from plutao.model.heads import Output, ScalarHead, forward_logits

CFG = ModelConfig(vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=4)


def test_the_lm_head_reads_any_positions_of_the_hidden_states():
    model = GPT(CFG, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(11, 40, (2, 9)), jnp.int32)
    out = model(tokens)
    assert isinstance(out, Output) and out.hidden_BTD.shape == (2, 9, 32) and out.cache is None
    logits, _ = forward_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden_BTD[:, -1])), np.asarray(logits[:, -1]),
                               rtol=1e-5, atol=1e-6)


def test_a_scalar_head_reads_the_chosen_position_and_nothing_after_it():
    model = GPT(CFG, nnx.Rngs(0))
    head = ScalarHead(CFG.d_model, nnx.Rngs(1))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(11, 40, (3, 10)), jnp.int32)
    last_B = jnp.asarray([9, 5, 2])  # each row's final real token (the rest is padding)
    hidden = model(tokens).hidden_BTD
    score_B = head(hidden, last_B)
    per_position_BT = head(hidden)
    np.testing.assert_allclose(np.asarray(score_B), np.asarray(per_position_BT)[np.arange(3), np.asarray(last_B)],
                               rtol=1e-6)
    # Whatever follows the read position (padding, another answer) does not change the score...
    changed = tokens.at[1, 6:].set(12).at[2, 3:].set(13)
    np.testing.assert_allclose(np.asarray(head(model(changed).hidden_BTD, last_B)), np.asarray(score_B), rtol=1e-5)
    # ...while reading one position off gives another number.
    assert np.abs(np.asarray(head(hidden, last_B - 1)) - np.asarray(score_B)).min() > 1e-6
    assert np.abs(np.asarray(score_B)).max() < 1.0  # a fresh head starts near indifferent (w ~ N(0, 0.02²), b = 0)
