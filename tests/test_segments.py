"""Packed rows: with segment ids (and positions restarting per document) each document of a row gets
exactly the logits it gets alone — causal (GPT) and bidirectional (BERT)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.bert import BERT
from plutao.model.config import ModelConfig
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits


def packed(doc_a, doc_b, pad=0, width=None):
    width = width or len(doc_a) + len(doc_b)
    tokens = np.full((1, width), pad, np.int32)
    tokens[0, :len(doc_a)] = doc_a
    tokens[0, len(doc_a):len(doc_a) + len(doc_b)] = doc_b
    segments = np.zeros((1, width), np.int32)
    segments[0, :len(doc_a)] = 1
    segments[0, len(doc_a):len(doc_a) + len(doc_b)] = 2
    positions = np.zeros((1, width), np.int32)
    positions[0, :len(doc_a)] = np.arange(len(doc_a))
    positions[0, len(doc_a):len(doc_a) + len(doc_b)] = np.arange(len(doc_b))
    return jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions)


def logits_of(model, *args, **kwargs):
    return forward_logits(model, *args, **kwargs)[0]


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_packed_gpt_row_gives_each_document_its_own_logits(positions):
    cfg = ModelConfig(vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=4, positions=positions)
    model = GPT(cfg, nnx.Rngs(0))
    a, b = [1, 7, 8, 9, 10], [1, 20, 21, 22]
    tokens, segments, pos = packed(a, b)
    both = np.asarray(logits_of(model, tokens, segment_ids_BT=segments, positions_BT=pos))
    alone_a = np.asarray(logits_of(model, jnp.asarray([a])))
    alone_b = np.asarray(logits_of(model, jnp.asarray([b])))
    np.testing.assert_allclose(both[0, :len(a)], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(both[0, len(a):], alone_b[0], atol=1e-5)
    # Without segment ids the second document sees the first: its logits differ.
    mixed = np.asarray(logits_of(model, tokens, positions_BT=pos))
    assert np.abs(mixed[0, len(a):] - alone_b[0]).max() > 1e-3


def test_a_packed_bert_row_gives_each_document_its_own_logits():
    cfg = ModelConfig(family="encoder", vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=4)
    model = BERT(cfg, nnx.Rngs(0))
    a, b = [2, 7, 8, 9, 10], [2, 20, 21]
    tokens, segments, pos = packed(a, b, width=10)  # two padding positions at the end
    valid = segments > 0
    both = np.asarray(logits_of(model, tokens, valid, segment_ids_BT=segments, positions_BT=pos))
    alone_a = np.asarray(logits_of(model, jnp.asarray([a])))
    alone_b = np.asarray(logits_of(model, jnp.asarray([b])))
    np.testing.assert_allclose(both[0, :len(a)], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(both[0, len(a):len(a) + len(b)], alone_b[0], atol=1e-5)
    assert np.isfinite(both).all()  # padding rows attend to themselves, not to nothing
    mixed = np.asarray(logits_of(model, tokens, valid, positions_BT=pos))
    assert np.abs(mixed[0, len(a):len(a) + len(b)] - alone_b[0]).max() > 1e-3


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_separate_documents_scores_each_document_of_a_row_as_if_alone(family):
    from plutao.train.config.schema import Config, apply_overrides
    from plutao.train.tasks import TokenIds, task_for

    base = {"model.family": family, "model.vocab_size": 40, "model.context_length": 16, "model.n_layers": 2,
            "model.d_model": 32, "model.n_heads": 4}
    ids = TokenIds(pad_id=0, mask_id=5, eot_id=1, vocab_limit=40, ordinary=tuple(range(11, 40)))
    separate = task_for(apply_overrides(Config(), base | {"data.separate_documents": True}), None)
    separate = type(separate)(separate.cfg, ids)
    plain = type(separate)(apply_overrides(Config(), base), ids)
    model = separate.build_model(nnx.Rngs(0))
    row = np.array([[15, 16, 17, 1, 18, 19, 20, 21, 22]], np.int32)  # the end of one document, then the next
    batch = separate.named(row)
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 2]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    import jax

    key = jax.random.key(0)
    if family == "decoder":
        both = separate.sums(model, batch, key, train=False)
        first = plain.sums(model, plain.named(row[:, :4]), key, train=False)
        second = plain.sums(model, plain.named(row[:, 3:]), key, train=False)
        np.testing.assert_allclose(float(both["loss"]), float(first["loss"]) + float(second["loss"]), rtol=1e-5)
        assert float(both["count"]) == float(first["count"]) + float(second["count"])
    else:  # bidirectional: each document's logits are its own
        logits, _ = forward_logits(model, jnp.asarray(batch["tokens"]), segment_ids_BT=jnp.asarray(batch["segment_ids"]),
                          positions_BT=jnp.asarray(batch["positions"]))
        alone, _ = forward_logits(model, jnp.asarray(row[:, 3:-1]))
        np.testing.assert_allclose(np.asarray(logits)[0, 3:], np.asarray(alone)[0], atol=1e-5)
