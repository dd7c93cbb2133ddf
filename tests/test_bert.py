"""The encoder-only Transformer and the masked-LM objective."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.bert import BERT
from plutao.model.config import ModelConfig
from plutao.model.heads import forward_logits
from plutao.train.losses import cross_entropy_sum
from plutao.train.tasks import TokenIds, task_for_model
from plutao.train.tasks.masked_lm import mask_tokens

CFG = ModelConfig(family="encoder", vocab_size=50, context_length=16, n_layers=2, d_model=32, n_heads=4)
MASK, FIRST = 5, 11


def ordinary(limit):
    return jnp.arange(limit) >= FIRST


def test_mask_tokens_selects_15_percent_and_splits_80_10_10():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(FIRST, 1000, (200, 500)), jnp.int32)
    tokens = tokens.at[:, ::50].set(1)  # some special tokens (<|endoftext|>), never to be selected
    inputs, selected = mask_tokens(tokens, jax.random.key(0), rate=0.15, mask_id=MASK, ordinary_V=ordinary(1000))
    inputs, selected, tokens = map(np.asarray, (inputs, selected, tokens))
    regular = tokens >= FIRST
    n_regular, n_sel = regular.sum(), selected.sum()
    assert not selected[~regular].any()
    # Binomial standard errors: ~0.0007 for the rate over 98k tokens, ~0.003 for the split over 15k.
    assert abs(n_sel / n_regular - 0.15) < 0.004
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    replaced = selected & ~masked & ~unchanged
    assert abs(masked.sum() / n_sel - 0.8) < 0.012
    assert abs(replaced.sum() / n_sel - 0.1) < 0.01
    assert abs(unchanged.sum() / n_sel - 0.1) < 0.01
    assert np.all(inputs[~selected] == tokens[~selected])  # nothing else is touched
    assert inputs[replaced].min() >= FIRST and inputs[replaced].max() < 1000


def test_masked_lm_loss_counts_only_selected_positions():
    model = BERT(CFG, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batch = jnp.asarray(rng.integers(FIRST, 50, (4, 17)), jnp.int32)
    objective = task_for_model(CFG, TokenIds(pad_id=0, mask_id=MASK, vocab_limit=50, ordinary=tuple(range(FIRST, 50))))
    key = jax.random.key(3)
    sums = objective.sums(model, objective.named(batch), key, train=False)
    # The same masks, recomputed: the loss is the cross-entropy at the selected positions only.
    mask_key, _ = jax.random.split(key)
    inputs, selected = mask_tokens(batch[:, :-1], mask_key, rate=0.15, mask_id=MASK, ordinary_V=ordinary(50))
    logits, _ = forward_logits(model, inputs)
    logp = jax.nn.log_softmax(logits)
    expected = -sum(float(logp[b, t, batch[b, t]]) for b, t in zip(*np.nonzero(np.asarray(selected))))
    assert float(sums["count"]) == float(np.asarray(selected).sum()) > 0
    np.testing.assert_allclose(float(sums["loss"]), expected, rtol=1e-5)
    # Logits at unselected positions do not enter the loss at all.
    noisy = logits + jnp.where(selected[..., None], 0.0, 100.0 * jax.random.normal(jax.random.key(9), logits.shape))
    s, _c = cross_entropy_sum(noisy, batch[:, :-1], selected)
    np.testing.assert_allclose(float(s), expected, rtol=1e-5)


def test_encoder_attention_is_bidirectional_and_ignores_padding():
    model = BERT(CFG, nnx.Rngs(0))
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param) and v[...].ndim >= 2:
            v[...] = v[...] * 8.0
    tokens = jnp.asarray(np.random.default_rng(2).integers(FIRST, 50, (2, 10)), jnp.int32)
    base, _ = forward_logits(model, tokens)
    later_changed, _ = forward_logits(model, tokens.at[:, 8].set(12))
    assert not np.allclose(base[:, 0], later_changed[:, 0], atol=1e-4)  # position 0 sees position 8
    padded = jnp.concatenate([tokens, jnp.full((2, 4), 17, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.ones((2, 10), bool), jnp.zeros((2, 4), bool)], axis=1)
    out, _ = forward_logits(model, padded, valid)
    np.testing.assert_allclose(out[:, :10], base, atol=1e-5)


def test_each_evaluation_batch_draws_its_own_fixed_masks():
    from plutao.train.config.schema import MeshConfig, OptimConfig
    from plutao.train.optim import lr_schedule, make_optimizer
    from plutao.train.parallel.sharding import make_mesh
    from plutao.train.step import Trainer

    cfg = ModelConfig(family="encoder", vocab_size=40, context_length=32, n_layers=1, d_model=16, n_heads=2).resolved()
    optim = OptimConfig()
    trainer = Trainer(cfg, make_optimizer(optim, 10, cfg), lr_schedule(optim, 10), make_mesh(MeshConfig()), 0,
                      task=task_for_model(cfg, TokenIds(vocab_limit=40, ordinary=tuple(range(11, 40)))))
    params = trainer.init_state()["params"]
    batch = np.random.default_rng(0).integers(11, 40, (8, 33)).astype(np.int32)
    sums = [{k: float(v) for k, v in trainer.eval_step(params, batch, np.int32(i)).items()} for i in (0, 1, 0)]
    assert sums[0] == sums[2]  # batch 0 masks the same positions at every evaluation (comparable checkpoints)
    assert sums[0] != sums[1]  # and batch 1 other ones: an evaluation does not score the same positions twice
