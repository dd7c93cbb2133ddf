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


def test_reward_scale_spreads_the_held_out_replies_by_one(tiny_stages):
    from plutao.train.data.conversations import read_rankings, single_path, with_held_out
    from plutao.train.rl.rewards import RewardScorer

    scorer = RewardScorer.load(tiny_stages["rm"])
    data = scorer.run.cfg.data
    _, held, _ = with_held_out(read_rankings(single_path(data)), read_rankings, single_path(data), data, "rankings")
    replies = [r.prompt + [{"role": "assistant", "content": x}] for r in held for x in r.responses]
    ended = [e for r in held for e in r.meta.get("ended", [True] * len(r.responses))]
    assert scorer.scale > 0 and scorer.scale != 1.0
    np.testing.assert_allclose(np.std(scorer.score(replies, ended=ended)), 1.0, rtol=1e-3)


class FixedScorer:
    """Scores replies by a table: what evaluate_rankings reads, without a model."""

    def __init__(self, table):
        self.table = table

    def score(self, conversations, ended=None):
        return np.array([self.table[c[-1]["content"]] for c in conversations], np.float32)


def test_reward_model_metrics_equal_hand_counts():
    from plutao.train.data.conversations import Ranking
    from plutao.train.eval.reward_model import evaluate_rankings

    prompt = [{"role": "user", "content": "q"}]
    table = {"right": 2.0, "near": 1.0, "far": 0.0, "right2": -1.0}
    rankings = [  # (best first) gold: right > near > far; the scores agree on all three pairs
        Ranking(prompt, ["right", "near", "far"], [0, 1, 2], {"correct": [True, False, False], "digits": 2}),
        # right2 scores below near: one of its two right-vs-wrong pairs is wrong
        Ranking(prompt, ["right2", "near", "far"], [0, 1, 2], {"correct": [True, False, False], "digits": 3}),
    ]
    result = evaluate_rankings(FixedScorer(table), rankings)
    assert result["pairs"] == 6 and result["pairwise_accuracy"] == pytest.approx(4 / 6)
    assert result["right_vs_wrong_pairs"] == 4 and result["right_vs_wrong_accuracy"] == pytest.approx(2 / 4)
    assert result["both_wrong_pairs"] == 2 and result["both_wrong_accuracy"] == 1.0
    assert result["by_digits"] == {"2": {"accuracy": 1.0, "pairs": 3}, "3": {"accuracy": pytest.approx(1 / 3),
                                                                                      "pairs": 3}}


def test_a_reward_model_learns_a_ranking_from_chance(tiny_stages, tmp_path, capsys):
    """On a toy preference (replies of even digits over replies of odd digits) the reward stage's held-out
    pairwise accuracy starts near chance and ends above 0.9."""
    import json

    from plutao.experiments.cli import main

    rng = np.random.default_rng(0)

    def reply(digits):
        return "".join(str(d) for d in rng.choice(digits, size=int(rng.integers(1, 4))))

    def line():
        prompt = [{"role": "user", "content": f"say {int(rng.integers(100))}"}]
        return json.dumps({"prompt": prompt, "chosen": reply([0, 2, 4, 6, 8]), "rejected": reply([1, 3, 5, 7, 9])})

    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text("\n".join(line() for _ in range(400)) + "\n")
    val.write_text("\n".join(line() for _ in range(100)) + "\n")
    def train(name, *overrides):
        assert main(["reward", str(tiny_stages["sft"]), "--workdir", str(tmp_path / name), "--data", str(data),
                     f"data.val_path={val}", "train.eval_every=40", "optim.warmup_steps=0", "--quiet",
                     *overrides]) == 0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / name), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    start = train("start", "train.steps=1", "optim.lr=1e-9")  # (one step that moves nothing: the start)
    learned = train("learned", "train.steps=40", "optim.lr=2e-3")
    # (the untrained head is a random projection of the SFT model's features: near chance, measured 0.67)
    assert start["pairwise_accuracy"] < 0.75, start
    assert learned["pairwise_accuracy"] > 0.9, learned
