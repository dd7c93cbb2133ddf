"""Supervised fine-tuning: the loss covers assistant tokens only, empty batches are harmless, packed
conversations never see each other."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits
from plutao.tokenizer import CharTokenizer
from plutao.tokenizer.chat import render
from plutao.train.config.schema import Config, MeshConfig, OptimConfig, TrainConfig
from plutao.train.data.chat_batches import PackedChats
from plutao.train.optim import make_optimizer
from plutao.train.parallel import sharding
from plutao.train.step import Trainer
from plutao.train.tasks import TokenIds
from plutao.train.tasks.sft import SFT

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "4+4?"}, {"role": "assistant", "content": "8"}],
    [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "9-3?"}, {"role": "assistant", "content": "The answer is 6."}],
]


@pytest.fixture(scope="module")
def setup():
    tok = CharTokenizer.train(["Be brief. What is plus? The answer is. 0123456789+-"])
    model_cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=64, n_layers=2, d_model=32, n_heads=4)
    cfg = Config(model=model_cfg, train=TrainConfig(batch_size=2, task="sft"), optim=OptimConfig(lr=1e-2),
                 mesh=MeshConfig(data=1))
    task = SFT(cfg, TokenIds.of(tok))
    rendered = [render(c, tok) for c in CHATS]
    rows = PackedChats(rendered, rendered, model_cfg.context_length, 2, 0, tok.pad_id)
    return tok, cfg, task, rows, rendered


def loss_of(task, model, batch):
    s = task.sums(model, {k: jnp.asarray(v) for k, v in batch.items()}, None, train=False)
    return float(s["loss"] / s["count"])


def test_loss_is_cross_entropy_over_assistant_tokens_only(setup):
    tok, cfg, task, rows, _rendered = setup
    model = GPT(cfg.model, nnx.Rngs(0))
    batch = task.named(rows.train_rows(0))
    # Reference: each conversation alone, cross-entropy at the positions whose target is an assistant token.
    # (each conversation right-padded to one width, so one program serves them all: the model is
    # causal, so the padding after a conversation changes none of its logits)
    nll, count = 0.0, 0
    width = batch["tokens"].shape[1]
    for row in range(2):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            at = np.flatnonzero(seg == s)
            tokens = np.zeros(width, np.int32)
            tokens[:len(at)] = batch["tokens"][row, at]
            logits = np.asarray(forward_logits(model, jnp.asarray(tokens[None]))[0][0])[:len(at)]
            logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
            w = batch["loss_weights"][row, at]
            t = batch["targets"][row, at]
            nll -= float(np.sum(w * logp[np.arange(len(at)), t]))
            count += int(w.sum())
    assert count == int(batch["loss_weights"].sum()) > 0
    np.testing.assert_allclose(loss_of(task, model, batch), nll / count, rtol=1e-5)

    weights = batch["loss_weights"]
    prompt_at = tuple(np.argwhere((weights == 0) & (batch["segment_ids"] > 0))[3])
    reply_at = tuple(np.argwhere(weights == 1)[0])
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][prompt_at] = (changed["targets"][prompt_at] + 1) % tok.vocab_size
    assert loss_of(task, model, changed) == loss_of(task, model, batch)  # a user/system target: no effect
    changed["targets"][reply_at] = (changed["targets"][reply_at] + 1) % tok.vocab_size
    assert loss_of(task, model, changed) != loss_of(task, model, batch)  # an assistant target: it counts


def test_every_assistant_turn_trains(setup):
    tok, _, _, _, rendered = setup
    first = rendered[0]
    trained = tok.decode(first.ids[first.weights == 1].tolist())
    assert trained == "5<|end|>8<|end|>" or trained.replace("<|end|>", "|") == "5|8|"


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_an_all_prompt_batch_gives_zero_loss_and_zero_gradient(setup, decay):
    _tok, cfg, task, rows, _ = setup
    optim = dataclasses.replace(cfg.optim, weight_decay=decay, warmup_steps=0)  # (lr > 0 at the first step)
    mesh = sharding.make_mesh(cfg.mesh)
    tx = make_optimizer(optim, 10, cfg.model)
    trainer = Trainer(cfg.model, tx, lambda s: 1e-2, mesh, 0, task=task)
    state = trainer.init_state()
    before = jax.device_get(state["params"])
    batch = task.named(rows.train_rows(0))
    batch["loss_weights"] = np.zeros_like(batch["loss_weights"])
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    after = jax.device_get(state["params"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    if decay == 0:
        assert not any(moved)  # nothing to learn, nothing moves
    else:
        assert any(moved)  # (AdamW with zero gradients still decays the weights: the check above can fail)


def test_packed_conversations_do_not_attend_across(setup):
    _tok, cfg, task, rows, _rendered = setup
    model = GPT(cfg.model, nnx.Rngs(1))
    batch = task.named(rows.train_rows(0))
    row = int(np.argmax([len(np.unique(s[s > 0])) for s in batch["segment_ids"]]))
    seg = batch["segment_ids"][row]
    assert len(np.unique(seg[seg > 0])) >= 2, "the fixture should pack two conversations into one row"
    packed = np.asarray(forward_logits(model, jnp.asarray(batch["tokens"][row:row + 1]),
                                       segment_ids_BT=jnp.asarray(batch["segment_ids"][row:row + 1]),
                                       positions_BT=jnp.asarray(batch["positions"][row:row + 1]))[0][0])
    for s in np.unique(seg[seg > 0]):
        at = np.flatnonzero(seg == s)
        alone = np.asarray(forward_logits(model, jnp.asarray(batch["tokens"][row, at][None]))[0][0])
        np.testing.assert_allclose(packed[at], alone, atol=1e-5)


def test_batches_are_a_pure_function_of_seed_and_step(setup):
    tok, _cfg, _task, _, rendered = setup
    many = rendered * 20
    a = PackedChats(many, rendered, 64, 4, 3, tok.pad_id)
    b = PackedChats(many, rendered, 64, 4, 3, tok.pad_id)
    for step in (0, 5, 17):  # (17 is past the first epoch)
        np.testing.assert_array_equal(a.train_rows(step), b.train_rows(step))
        np.testing.assert_array_equal(a.train_rows(step)[1:3], b.train_rows(step, slice(1, 3)))
    assert not np.array_equal(a.train_rows(0), PackedChats(many, rendered, 64, 4, 4, tok.pad_id).train_rows(0))
    assert a.tokens_per_step(2) == int((a.train_rows(2)[:, 2] > 0).sum())
    # Held-out batches cover the held-out conversations once: rows past the end are empty.
    assert a.val_batches() == 1 and int(a.val_rows(0)[:, 1].sum()) == sum(int(r.weights.sum()) for r in rendered)


def test_sft_needs_a_decoder():
    cfg = dataclasses.replace(Config(), model=ModelConfig(family="encoder"), train=TrainConfig(task="sft"))
    assert any("fine-tunes a decoder" in p for p in SFT.problems(cfg))
