"""The reward model: read at <|reward|>, InstructGPT's K-wise loss, the demonstration shift."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.tokenizer import CharTokenizer
from plutao.tokenizer.chat import reward_ids
from plutao.train.config.schema import Config, TrainConfig
from plutao.train.data.chat_batches import encode_ranking
from plutao.train.losses import ranking_loss_sums
from plutao.train.tasks import TokenIds
from plutao.train.tasks.reward import RewardModel, reward_scores


@pytest.fixture(scope="module")
def rm():
    tok = CharTokenizer.train(["What is 2 plus 3? 5 6 The answer is 0123456789"])
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=4),
                 train=TrainConfig(task="reward"))
    task = RewardModel(cfg, TokenIds.of(tok))
    model = task.build_model(nnx.Rngs(0))
    model.reward_head.w[...] = jax.random.normal(jax.random.key(1), model.reward_head.w.shape)  # (not ~0)
    return tok, task, model


def conv(reply):
    return [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": reply}]


def scores(model, seqs, width=48, pad=0):
    tokens = np.full((len(seqs), width), pad, np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    return np.asarray(reward_scores(model, jnp.asarray(tokens), jnp.asarray([len(s) - 1 for s in seqs])))


def test_reward_is_read_at_the_reward_token(rm):
    tok, _task, model = rm
    seq = reward_ids(conv("5"), tok)
    base = scores(model, [seq])[0]
    # Tokens after <|reward|> never change it (padding or anything else).
    after = scores(model, [seq + tok.encode("666")], pad=tok.pad_id)
    tokens = np.full((1, 48), tok.pad_id, np.int32)
    tokens[0, :len(seq)] = seq
    tokens[0, len(seq):len(seq) + 5] = tok.encode("12345")
    trailing = np.asarray(reward_scores(model, jnp.asarray(tokens), jnp.asarray([len(seq) - 1])))[0]
    np.testing.assert_allclose([trailing], [base], rtol=1e-5)
    # Reading it elsewhere, or without <|reward|>, gives another number.
    without = scores(model, [seq[:-1]])[0]
    moved = np.asarray(reward_scores(model, jnp.asarray(tokens), jnp.asarray([len(seq) - 2])))[0]
    assert abs(without - base) > 1e-4 and abs(moved - base) > 1e-4
    assert after.shape == (1,)


def test_k_wise_loss_equals_the_mean_over_explicit_pairs():
    rng = np.random.default_rng(0)
    r_BK = rng.normal(size=(3, 6)).astype(np.float32)
    rank_BK = np.array([[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, -1, -1], [2, 0, 1, 3, 5, 4]], np.int32)
    sums = {k: float(v) for k, v in ranking_loss_sums(jnp.asarray(r_BK), jnp.asarray(rank_BK)).items()}
    total, prompts, pairs = 0.0, 0, 0
    for r, rank in zip(r_BK, rank_BK):
        terms = [-np.log(1 / (1 + np.exp(-(r[i] - r[j])))) for i in range(6) for j in range(6)
                 if rank[i] >= 0 and rank[j] >= 0 and rank[i] < rank[j]]
        total += np.mean(terms)
        prompts += 1
        pairs += len(terms)
    np.testing.assert_allclose(sums["loss"], total, rtol=1e-5)
    assert sums["count"] == prompts and sums["pairs"] == pairs
    assert pairs == 15 + 5 + 15  # K=6 ranked: C(6,2); a tie and two absent replies remove the rest


@pytest.mark.parametrize("K", [2, 4, 9])
def test_a_ranking_of_k_gives_k_choose_2_pairs(K):
    sums = ranking_loss_sums(jnp.zeros((1, K)), jnp.arange(K, dtype=jnp.int32)[None])
    assert int(sums["pairs"]) == len(list(itertools.combinations(range(K), 2)))
    np.testing.assert_allclose(float(sums["loss"]), np.log(2.0), rtol=1e-6)  # equal rewards: log 2 per pair


def test_one_batch_element_encodes_each_response_once(rm):
    tok, task, model = rm
    seqs = [reward_ids(conv(x), tok) for x in ("5", "6", "The answer is 5.")]
    enc = encode_ranking(seqs, [0, 1, 2], 48, tok.pad_id)
    rows = np.zeros((1, 4, 50), np.int32)
    rows[0, :, :48] = tok.pad_id
    rows[0, :, -1] = -1
    rows[0, :3, :48], rows[0, :3, 48], rows[0, :3, 49] = enc.tokens, enc.reward_index, enc.ranks
    batch = {k: jnp.asarray(v) for k, v in task.named(rows).items()}
    sums = task.sums(model, batch, None, train=False)
    r = scores(model, seqs, pad=tok.pad_id)
    expected = ranking_loss_sums(jnp.asarray(np.pad(r, (0, 1))[None]), jnp.asarray([[0, 1, 2, -1]]))
    np.testing.assert_allclose(float(sums["loss"]), float(expected["loss"]), rtol=1e-5)
    assert int(sums["pairs"]) == 3


def test_reward_shift_makes_the_demonstrations_average_zero(tiny_stages):
    from plutao.train.config.schema import Config as C
    from plutao.train.rl.rewards import RewardScorer
    from plutao.train.run.rundir import existing_run_config
    from plutao.train.tasks.sft import chat_data

    scorer = RewardScorer.load(tiny_stages["rm"])
    _, demos, _ = chat_data(C.from_dict(existing_run_config(tiny_stages["sft"])))
    assert scorer.offset != 0.0
    assert abs(float(np.mean(scorer.score(demos)))) < 1e-4
