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
