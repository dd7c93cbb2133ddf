"""The arithmetic world: a pure function of its seed, a fallible demonstrator, a gold labeler."""

import numpy as np

from plutao.train.worlds import arith
from plutao.train.worlds.arith import Problem, World


def test_world_is_a_pure_function_of_its_seed():
    a, b, c = World(seed=3, documents=50, demonstrations=50), World(seed=3, documents=50, demonstrations=50), World(
        seed=4, documents=50, demonstrations=50)
    for kind in ("equations", "dialogue"):
        assert arith.pretraining_documents(a, kind) == arith.pretraining_documents(b, kind)
        assert arith.pretraining_documents(a, kind) != arith.pretraining_documents(c, kind)
    assert arith.demonstrations(a) == arith.demonstrations(b) != arith.demonstrations(c)
    assert [arith.comparison_prompt(a, i) for i in range(20)] == [arith.comparison_prompt(b, i) for i in range(20)]
    # Held-out streams are not the training streams.
    assert arith.demonstrations(a, 20, held_out=True) != arith.demonstrations(a, 20)


def test_demonstrator_is_fallible_and_never_shows_long_problems():
    world = World(seed=1)
    demos = arith.demonstrations(world, 3000)
    wrong = total = 0
    for d in demos:
        replies = [m["content"] for m in d["messages"] if m["role"] == "assistant"]
        for reply, p in zip(replies, d["problems"]):
            problem = Problem(**p)
            assert problem.digits <= 3
            total += 1
            wrong += not arith.correct(problem, reply)
    assert 0.06 < wrong / total < 0.10  # world.demo_error_rate = 0.08
    assert any(len(arith.numbers_in(m["content"])) == 1 and " " in m["content"]
               for d in demos for m in d["messages"] if m["role"] == "assistant")  # verbose, one number


def test_pretraining_mixture_has_wrong_answers_portuguese_and_long_problems():
    docs = arith.pretraining_documents(World(documents=300), "equations")
    text = "\n".join(docs)
    assert "Quanto é" in text or "mais" in text
    sums = [line for line in text.splitlines() if "+" in line and "=" in line and line.count("+") == 1
            and line.replace(" ", "").replace("+", "").replace("=", "").isdigit()]
    values = [tuple(map(int, s.replace(" ", "").replace("=", "+").split("+"))) for s in sums]
    share_wrong = np.mean([a + b != c for a, b, c in values])
    assert 0.03 < share_wrong < 0.2  # world.wrong_share = 0.1
    assert any(max(a, b) >= 10_000 for a, b, _ in values)


def test_gold_labeler_order():
    p = Problem(347, 589, "+")
    key = lambda reply, length=None, ended=True: arith.gold_key(p, reply, len(reply) if length is None else length,
                                                                  ended)
    correct_short, correct_verbose = key("936"), key("The answer is 936.")
    wrong = [key("926"), key("1"), key(""), key("936 no, 937"), key("9")]
    assert all(correct_short > w and correct_verbose > w for w in wrong)
    assert correct_short > correct_verbose
    assert key("936", ended=True) > key("936", ended=False)
    assert key("926") > key("111")  # partial credit: two digits right beat none
    ranks = arith.gold_ranks([key("926"), correct_verbose, correct_short, key("926")])
    assert ranks == [2, 1, 0, 2]


def test_labeler_noise_agrees_as_documented():
    rng = np.random.default_rng(0)
    noise = 0.5
    keys = [(True, 1.0, -1, True), (False, 0.5, -1, True)]
    agree = np.mean([arith.labeler_ranks(keys, noise, rng) == [0, 1] for _ in range(4000)])
    assert abs(agree - arith.pair_agreement(noise)) < 0.03
    assert arith.labeler_ranks(keys, 0.0, rng) == [0, 1]


def test_a_noisy_labeler_keeps_identical_replies_tied():
    rng = np.random.default_rng(1)
    same = (False, 0.5, -1, True)
    for _ in range(50):
        ranks = arith.labeler_ranks([same, same, (True, 1.0, -1, True), same], 1.0, rng)
        assert ranks[0] == ranks[1] == ranks[3] != ranks[2]
