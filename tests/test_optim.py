"""Optimizers: weight decay goes by what a parameter is for, never by its shape."""

import jax
import numpy as np
import optax
import pytest

from plutao.model.config import ModelConfig
from plutao.train.config.schema import OptimConfig
from plutao.train.optim import decay_mask, make_optimizer


def flat(tree) -> dict[str, bool]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def not_decayed(mask: dict[str, bool]) -> set[str]:
    return {name for name, decayed in mask.items() if not decayed}


@pytest.mark.parametrize("scan", [False, True])
def test_norms_and_biases_are_never_decayed_scanned_or_not(scan):
    cfg = ModelConfig(vocab_size=40, context_length=16, n_layers=3, d_model=32, n_heads=4, bias=True,
                      tie_embeddings=False, norm_type="layernorm", scan_layers=scan)
    mask = flat(decay_mask(OptimConfig(), cfg))
    leaves = {name.split("/")[-1] for name in not_decayed(mask)}
    assert leaves == {"scale", "bias", "b_qkv", "b_o", "b_in", "b_out"}, sorted(not_decayed(mask))
    decayed = {name.split("/")[-1] for name, d in mask.items() if d}
    assert decayed == {"token_embed", "pos_embed", "w_qkv", "w_o", "w_in", "w_out", "lm_head"}
    if scan:  # stacked over layers, a norm scale is 2-D, and still not decayed
        shapes = {"/".join(str(getattr(k, "key", k)) for k in p): leaf.shape for p, leaf in
                  jax.tree_util.tree_flatten_with_path(jax.eval_shape(lambda: _params(cfg)))[0]}
        assert any(len(shapes[n]) == 2 for n in not_decayed(mask) if n.endswith("scale"))


def _params(cfg):
    from flax import nnx

    from plutao.model.families import build_model

    return nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0)), nnx.Param))


def test_embeddings_are_decayed_only_when_asked():
    cfg = ModelConfig(vocab_size=40, context_length=16, n_layers=1, d_model=32, n_heads=4)
    on = flat(decay_mask(OptimConfig(decay_embeddings=True), cfg))
    off = flat(decay_mask(OptimConfig(decay_embeddings=False), cfg))
    assert on["token_embed"] and on["pos_embed"] and not off["token_embed"] and not off["pos_embed"]
    assert {k for k in on if on[k] != off[k]} == {"token_embed", "pos_embed"}


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn", "encoder_decoder", "encoder"])
def test_every_family_declares_roles(family):
    cfg = ModelConfig(family=family, vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=4, bias=True)
    mask = flat(decay_mask(OptimConfig(), cfg))
    for name in not_decayed(mask):
        assert name.split("/")[-1] in ("scale", "bias", "b", "b_hn", "b_q", "b_kv", "b_qkv", "b_o", "b_in", "b_out"), name
    assert any(mask.values())


def test_decay_shrinks_weights_and_leaves_a_scanned_norm_alone():
    """One AdamW step with zero gradients: only decay moves parameters."""
    cfg = ModelConfig(vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=4, scan_layers=True)
    params = _params(cfg)
    optim = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant", grad_clip=0.0)
    tx = make_optimizer(optim, 10, cfg)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["blocks"]["norm_attn"]["scale"], params["blocks"]["norm_attn"]["scale"])
    np.testing.assert_allclose(new["blocks"]["attn"]["w_o"], params["blocks"]["attn"]["w_o"] * (1 - 0.1 * 0.5), rtol=1e-6)
