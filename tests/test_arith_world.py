"""The arithmetic world (version 2): a pure function of its seed, worked answers that are right, a
fallible demonstrator whose errors are one visible step, a held-out slice no stream shows, a gold
labeler without a length term."""

import dataclasses
import re

import numpy as np
import pytest

from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, validate
from plutao.train.worlds import arith, arith_prompts
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


def test_worked_answers_are_right_column_by_column():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        p = arith.problem(rng, int(rng.integers(1, 6)), shorter=0.5)
        steps, answer = arith.worked(p)
        assert answer == p.answer and len(steps) == p.digits
        assert arith.reply_form(arith.worked_text(p)) == "worked" and arith.correct(p, arith.worked_text(p))
        assert arith.step_credit(p, arith.worked_text(p)) == 1.0
    assert arith.worked_text(Problem(347, 589, "+")) == "347+589: 7+9=16, 4+8+1=13, 3+5+1=9, so 936"
    assert arith.worked_text(Problem(912, 589, "-")) == "912-589: 12-9=3, 11-8-1=2, 9-5-1=3, so 323"
    assert arith.worked_text(Problem(100, 99, "-")) == "100-99: 10-9=1, 10-9-1=0, 1-0-1=0, so 1"
    assert arith.worked_text(Problem(5, 347, "+")) == "5+347: 5+7=12, 0+4+1=5, 0+3=3, so 352"


def test_a_slip_is_one_wrong_step_carried_through_consistently():
    rng = np.random.default_rng(1)
    for _ in range(500):
        p = arith.problem(rng, int(rng.integers(1, 4)))
        slip = arith.slip_for(p, rng)
        wrong_steps, wrong = arith.worked(p, slip)
        assert wrong != p.answer
        right_steps, _ = arith.worked(p)
        assert wrong_steps[:slip.column] == right_steps[:slip.column] and wrong_steps[slip.column] != right_steps[
            slip.column]  # visible where it happens
        # ... and the answer is what the written steps spell out (the carries follow the written results).
        digits = [int(s.split("=")[1]) for s in wrong_steps]
        if p.op == "+":
            value = 0
            for i, d in enumerate(digits):
                value += (d % 10) * 10 ** i
            value += (digits[-1] // 10) * 10 ** len(digits)
            assert value == wrong
        else:
            assert wrong == int("".join(str(d) for d in reversed(digits)))


def test_demonstrator_is_fallible_follows_the_system_prompt_and_stays_in_range():
    world = World(seed=1)
    demos = arith.demonstrations(world, 3000)
    wrong = total = 0
    forms = {arith.STEP_BY_STEP: set(), arith.NUMBER_ONLY: set(), None: set()}
    for d in demos:
        system = d["messages"][0]["content"] if d["messages"][0]["role"] == "system" else None
        replies = [m["content"] for m in d["messages"] if m["role"] == "assistant"]
        for reply, p in zip(replies, d["problems"]):
            problem = Problem(**p)
            assert problem.digits <= world.max_digits and not arith.held_out(world, problem)
            total += 1
            wrong += not arith.correct(problem, reply)
            assert arith.reply_form(reply) is not None, reply
            forms.setdefault(system, set()).add(arith.reply_form(reply))
    assert 0.06 < wrong / total < 0.10  # world.demo_error_rate = 0.08
    assert forms[arith.STEP_BY_STEP] == {"worked"} and forms[arith.NUMBER_ONLY] == {"direct"}
    assert forms[None] == {"worked", "direct"}
    assert max(len(m["content"]) for d in demos for m in d["messages"] if m["role"] == "assistant") <= (
        arith.longest_reply(world))


def test_the_held_out_slice_is_in_no_training_stream():
    world = World(seed=2, documents=400, demonstrations=400)
    slice_ = [arith.held_out_problem(world, i)[1] for i in range(60)]
    assert all(arith.held_out(world, p) and min(p.a, p.b) >= 10 for p in slice_)
    # A sum and its swapped twin are one problem: both held out or neither.
    assert all(arith.held_out(world, Problem(p.b, p.a, "+")) for p in slice_ if p.op == "+")
    assert len({(p.a, p.op, p.b) for p in slice_}) > 40
    text = "\n".join(arith.pretraining_documents(world, "equations") + arith.pretraining_documents(world, "dialogue"))
    shown = {(int(a), op, int(b)) for a, op, b in re.findall(r"(?<![\d])(\d+) ?([+-]) ?(\d+)(?![\d])", text)}
    shown |= {(b, "+", a) for a, op, b in shown if op == "+"}  # (a sum shown either way round is shown)
    shown |= {(int(a), {"plus": "+", "minus": "-", "mais": "+", "menos": "-"}[w], int(b))
              for a, w, b in re.findall(r"(\d+) (plus|minus|mais|menos) (\d+)", text)}
    assert len(shown) > 2000
    assert not shown & {(p.a, p.op, p.b) for p in slice_}
    for i in range(300):
        for d in (arith.demonstration(world, i), arith.demonstration(world, i, held_out_stream=True)):
            assert not any(arith.held_out(world, Problem(**p)) for p in d["problems"])
        assert not arith.held_out(world, arith.comparison_prompt(world, i)[1])
        assert not arith.held_out(world, arith.rl_prompt(world, i)[1])
    # The slice is a function of the problem alone: the same in every seed.
    assert all(arith.held_out(dataclasses.replace(world, seed=9), p) for p in slice_)


def test_pretraining_mixture_has_worked_lines_wrong_answers_and_portuguese():
    world = World(documents=400)
    text = "\n".join(arith.pretraining_documents(world, "equations"))
    assert "mais" in text or "menos" in text
    sums = [line for line in text.splitlines() if "+" in line and "=" in line and line.count("+") == 1
            and line.replace(" ", "").replace("+", "").replace("=", "").isdigit()]
    values = [tuple(map(int, s.replace(" ", "").replace("=", "+").split("+"))) for s in sums]
    share_wrong = np.mean([a + b != c for a, b, c in values])
    assert 0.005 < share_wrong < 0.08  # world.wrong_share = 0.03
    worked = [line for line in text.splitlines() if arith.WORKED.match(line.removeprefix("A: "))]
    assert 0.2 < len(worked) / len(text.splitlines()) < 0.6  # world.worked_share = 0.4 (Q/A forms take 2 lines)
    assert max(max(a, b) for a, b, _ in values) < 10 ** world.max_digits


def test_gold_labeler_order_has_no_length_term():
    p = Problem(347, 589, "+")

    def key(reply, ended=True):
        return arith.gold_key(p, reply, ended)

    right_direct, right_worked = key("936"), key(arith.worked_text(p))
    assert right_direct == right_worked  # a worked reply is not punished for its length
    assert key("The answer is 936.") == right_direct
    wrong = [key("926"), key("1"), key(""), key("936 no, 937"), key(arith.worked_text(p, arith.Slip(1, -1)))]
    assert all(right_direct > w for w in wrong)
    assert key("936", ended=True) > key("936", ended=False) > key("926")  # correct ≻ ended
    assert key("926", ended=True) > key("936 no, 926", ended=False)
    assert key("926") > key("111")  # digit credit: two digits right beat none
    # A worked reply with one wrong step beats one with two (more correct steps).
    assert key(arith.worked_text(p, arith.Slip(0, 1))) > key("347+589: 7+9=17, 4+8+1=12, 3+5+1=9, so 927")
    # Right steps with a wrong answer are not full credit: below right steps with the right answer's
    # digits mostly kept, and a direct equation is credited by its answer, as a bare number is.
    hacked = key("347+589: 7+9=16, 4+8+1=13, 3+5+1=9, so 10")
    assert hacked[2] < 1.0 and hacked < key(arith.worked_text(p, arith.Slip(2, -1)))
    assert key("347+589=937")[2] == key("937")[2] > 0
    ranks = arith.gold_ranks([key("926"), right_worked, right_direct, key("926")])
    assert ranks == [1, 0, 0, 1]


def test_one_reply_budget_fits_a_worked_reply_to_the_longest_problem():
    world = World()
    p = Problem(99999, 99999, "+")
    assert arith.reply_budget(world) >= len(arith.worked_text(p)) + 1  # (+ the stop token)
    from plutao.model.config import ModelConfig

    wide = Config(model=ModelConfig(vocab_size=0, context_length=192))  # (the arith-base preset's context)
    assert wide.reply_tokens == arith.reply_budget(world) < 192 // 2
    assert Config(model=ModelConfig(vocab_size=0, context_length=64)).reply_tokens == 31  # at most half the context


def test_labeler_noise_agrees_as_documented():
    rng = np.random.default_rng(0)
    noise = 0.5
    keys = [(True, True, 1.0), (False, True, 0.5)]
    agree = np.mean([arith.labeler_ranks(keys, noise, rng) == [0, 1] for _ in range(4000)])
    assert abs(agree - arith.pair_agreement(noise)) < 0.03
    assert arith.labeler_ranks(keys, 0.0, rng) == [0, 1]


def test_a_noisy_labeler_keeps_identical_replies_tied():
    rng = np.random.default_rng(1)
    same = (False, True, 0.5)
    for _ in range(50):
        ranks = arith.labeler_ranks([same, same, (True, True, 1.0), same], 1.0, rng)
        assert ranks[0] == ranks[1] == ranks[3] != ranks[2]


def test_world_settings_are_checked_and_old_worlds_refused():
    with pytest.raises(UserError, match="world.digit_weights needs one non-negative weight per digit count"):
        validate(Config(world=World(max_digits=4)))
    with pytest.raises(UserError, match="world.max_digits must be in 1..5"):
        validate(Config(world=World(max_digits=0, digit_weights=[], prompt_digit_weights=[])))
    old = Config().to_dict()
    del old["world"]["version"]  # (a config.json recorded before world v2)
    validate(Config.from_dict(old))  # a run that reads no builtin:arith data is not concerned
    old["data"]["path"] = "builtin:arith"
    with pytest.raises(UserError, match="world.version=1: .* version 2 only; train the stages on builtin:arith again"):
        validate(Config.from_dict(old))
    assert Config.from_dict(Config().to_dict()).world == World()
    with pytest.raises(ValueError, match="no held-out slice"):  # (a one-digit world has none: never a hang)
        arith.held_out_problem(World(max_digits=1, digit_weights=[1.0], prompt_digit_weights=[1.0]), 0)


def test_unseen_phrasings_are_phrasings_no_stream_writes():
    world = World(documents=300, demonstrations=300)
    problems = arith_prompts.unseen_phrasing_problems(world, 100)
    assert len(problems) == 100 and len({m[0]["content"] for m, _ in problems}) > 90
    for messages, answer in problems:
        a, b = map(int, arith.NUMBER.findall(messages[0]["content"]))
        assert answer in (a + b, abs(a - b))
    patterns = [re.compile(re.escape(form).replace(re.escape("{a}"), r"\d+").replace(re.escape("{b}"), r"\d+"))
                for forms in arith_prompts.UNSEEN.values() for form in forms]
    assert sum(bool(p.search(m[0]["content"])) for m, _ in problems for p in patterns) == 100  # each matches one
    text = "\n".join(arith.pretraining_documents(world, "equations") + arith.pretraining_documents(world, "dialogue")
                     + [m["content"] for d in arith.demonstrations(world) for m in d["messages"]])
    assert not [p.pattern for p in patterns if p.search(text)]  # ... and no stream writes any of them


def test_world_keys_define_a_run_only_when_it_reads_the_world():
    from plutao.train.config.schema import DataConfig
    from plutao.train.run.resume import experiment_changes

    saved = Config().to_dict()
    saved["world"]["documents"], saved["world"]["wrong_share"] = 12000, 0.1  # (world v1's defaults)
    assert experiment_changes(saved, Config()) == {}  # a run on a corpus: the world is not its experiment
    arith_run = Config(data=DataConfig(path="builtin:arith"))
    saved["data"]["path"] = "builtin:arith"
    assert set(experiment_changes(saved, arith_run)) == {"world.documents", "world.wrong_share"}
