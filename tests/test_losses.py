import jax
import numpy as np

from plutao.train.losses import cross_entropy_sum


def test_label_smoothing_matches_closed_form():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    eps = 0.1
    s, c = cross_entropy_sum(logits, targets, label_smoothing=eps)
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    q = np.full_like(logp, eps / 11)
    np.put_along_axis(q, targets[..., None], 1 - eps + eps / 11, axis=-1)
    expected = -(q * logp).sum(-1)
    assert float(c) == 10
    np.testing.assert_allclose(float(s) / float(c), expected.mean(), rtol=1e-5)


def test_all_masked_batch_gives_zero_not_nan():
    s, c = cross_entropy_sum(np.zeros((1, 3, 4), np.float32), np.zeros((1, 3), int), np.zeros((1, 3)))
    assert float(s) / max(float(c), 1.0) == 0.0


def test_label_smoothing_spreads_only_over_real_targets():
    """The smoothing mass goes to ordinary ids below the tokenizer's vocabulary and to the specials a
    model predicts (<|endoftext|>, <eos>, <unk>); never to <pad>, <mask>, chat roles or padded rows."""
    from plutao.train.tasks import TokenIds

    V, limit, eps = 24, 20, 0.1  # ids 20..23: rows of a vocabulary rounded up past the tokenizer's 20
    ids = TokenIds(vocab_limit=limit, ordinary=tuple(range(11, limit)), target_specials=(1, 3, 4))
    support = np.asarray(ids.smoothing_support(V))
    assert support.tolist() == [i in (1, 3, 4) or 11 <= i < limit for i in range(V)]
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, V)).astype(np.float32) * 3
    targets = rng.integers(11, limit, (2, 5))
    s, c = cross_entropy_sum(logits, targets, label_smoothing=eps, support_V=support)
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    q = np.where(support, eps / support.sum(), 0.0) * np.ones_like(logp)
    np.put_along_axis(q, targets[..., None], np.take_along_axis(q, targets[..., None], -1) + 1 - eps, axis=-1)
    np.testing.assert_allclose(float(s) / float(c), -(q * logp).sum(-1).mean(), rtol=1e-5)


def test_training_logs_the_unsmoothed_loss_beside_the_smoothed_one():
    from plutao.model.config import ModelConfig
    from plutao.train.config.schema import MeshConfig, OptimConfig
    from plutao.train.optim import lr_schedule, make_optimizer
    from plutao.train.parallel.sharding import make_mesh
    from plutao.train.step import Trainer
    from plutao.train.tasks import TokenIds, task_for_model

    cfg = ModelConfig(vocab_size=32, context_length=8, n_layers=1, d_model=16, n_heads=2).resolved()
    optim = OptimConfig(label_smoothing=0.2)
    batch = np.random.default_rng(0).integers(11, 32, (2, 9)).astype(np.int32)
    metrics = {}
    for smoothing in (0.0, 0.2):
        objective = task_for_model(cfg, TokenIds(vocab_limit=32, ordinary=tuple(range(11, 32)), target_specials=(1, 3, 4)),
                                   label_smoothing=smoothing)
        trainer = Trainer(cfg, make_optimizer(optim, 10, cfg), lr_schedule(optim, 10), make_mesh(MeshConfig()), 0,
                          task=objective)
        metrics[smoothing] = {k: float(v) for k, v in trainer.train_step(trainer.init_state(), batch)[1].items()}
    assert "loss_unsmoothed" not in metrics[0.0]
    assert metrics[0.2]["loss_unsmoothed"] == np.float32(metrics[0.0]["loss"])  # the same parameters, plain CE
    assert metrics[0.2]["loss"] > metrics[0.2]["loss_unsmoothed"]


def test_the_loss_plot_compares_like_with_like():
    from plutao.train.run.metrics import loss_curves

    rows = [{"step": 10, "split": "train", "loss": 2.5, "loss_unsmoothed": 2.1}, {"step": 10, "split": "val", "loss": 2.2},
            {"step": 20, "split": "train", "loss": 2.0}, {"step": 20, "sample": "text"}]
    assert loss_curves(rows) == ([(10, 2.1), (20, 2.0)], [(10, 2.2)])
