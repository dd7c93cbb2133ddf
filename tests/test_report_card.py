"""`plutao report-card`: the pure metrics on hand-made replies, the argument errors (one line, exit 2,
nothing written), and one whole card over a tiny base → SFT → reward-model pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from plutao.experiments import report_card as rc
from plutao.experiments import report_card_stats as stats
from plutao.experiments.cli import main
from plutao.experiments.report_card_files import markdown
from plutao.train.worlds import arith, arith_prompts

END, USER = 10, 8  # stand-ins for <|end|> and <|user|>


# --- the pure parts -----------------------------------------------------------------------------------

def test_a_tie_counts_half_and_the_pair_rates_sum_to_one():
    assert stats.outcomes([3, 1, 2], [1, 1, 5]).tolist() == [1.0, 0.5, 0.0]
    gold = stats.win_rates({"a": [(True, 1.0), (False, 0.5), (False, 0.0)], "b": [(False, 0.0), (False, 0.5), (True, 1.0)]})
    assert set(gold) == {"a vs b", "b vs a"}
    assert gold["a vs b"]["rate"] == pytest.approx(0.5) and gold["b vs a"]["rate"] == pytest.approx(0.5)
    same = stats.win_rates({"a": [1, 2, 3], "b": [1, 2, 3]})
    assert same["a vs b"] == {"rate": 0.5, "low": 0.5, "high": 0.5}


def test_the_bootstrap_interval_holds_the_rate_and_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 400):
        keys = {"a": rng.integers(0, 3, n).tolist(), "b": rng.integers(0, 3, n).tolist(), "c": [1] * n}
        rates = stats.win_rates(keys, seed=1)
        assert len(rates) == 6
        for name, w in rates.items():
            assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1, name
            a, b = name.split(" vs ")
            assert w["rate"] + rates[f"{b} vs {a}"]["rate"] == pytest.approx(1.0)
        widths.append(rates["a vs b"]["high"] - rates["a vs b"]["low"])
        assert stats.win_rates(keys, seed=1) == rates  # seeded: the same card twice
    assert widths[1] < widths[0]
    assert stats.bootstrap_counts(7, 5, 0).sum(axis=1).tolist() == [7.0] * 5


def test_format_ok_wants_one_number_and_a_proper_end():
    ok = stats.Reply("579", 3, END)
    assert stats.format_ok(ok, end_id=END, user_id=USER)
    assert stats.format_ok(stats.Reply("The answer is 579.", 18, END), end_id=END, user_id=USER)
    assert not stats.format_ok(stats.Reply("579", 3, USER), end_id=END, user_id=USER)  # ran on into a user turn
    assert not stats.format_ok(stats.Reply("579 579 579 579 579 579", 24, None), end_id=END, user_id=USER)  # budget
    assert not stats.format_ok(stats.Reply("579 or 580", 10, END), end_id=END, user_id=USER)
    assert not stats.format_ok(stats.Reply("I do not know", 13, END), end_id=END, user_id=USER)
    worked = "347+589: 7+9=16, 4+8+1=13, 3+5+1=9, so 936"
    assert stats.format_ok(stats.Reply(worked, len(worked), END), end_id=END, user_id=USER)  # a worked reply is fine
    assert not stats.format_ok(stats.Reply(worked[:-10], 30, END), end_id=END, user_id=USER)  # ... a cut one is not
    assert not stats.format_ok(stats.Reply(worked, len(worked), None), end_id=END, user_id=USER)


def test_correctness_win_rates_by_digits_equal_hand_counts():
    # Six problems, two per digit bucket; a is right on 1, 2, 3; b on 1 and 4; right vs right is a tie.
    right_a, right_b = [1, 0, 1, 0, 1, 0], [1, 0, 0, 1, 0, 0]
    digits = [1, 1, 2, 2, 3, 3]
    w = stats.win_rates_by_digits({"a": stats.correctness_keys(right_a), "b": stats.correctness_keys(right_b)},
                                  digits)
    assert w["a vs b"]["all"]["rate"] == pytest.approx((0.5 + 0.5 + 1 + 0 + 1 + 0.5) / 6)
    assert {d: v["rate"] for d, v in w["a vs b"]["by_digits"].items()} == {"1": 0.5, "2": 0.5, "3": 0.75}
    assert w["b vs a"]["by_digits"]["3"]["rate"] == 0.25


def test_pass_at_k_is_the_unbiased_estimator():
    assert stats.pass_at_k([[False] * 8], 8) == 0.0 and stats.pass_at_k([[True] + [False] * 7], 8) == 1.0
    assert stats.pass_at_k([[True] + [False] * 7], 1) == pytest.approx(1 / 8)
    assert stats.pass_at_k([[True, True] + [False] * 6], 2) == pytest.approx(1 - (6 * 5) / (8 * 7))
    with pytest.raises(ValueError, match="at least 8 samples"):
        stats.pass_at_k([[True] * 4], 8)


def test_bradley_terry_recovers_known_strengths_and_the_leaderboard_orders_by_them():
    # Expected wins from strengths 2 : 1 : ½ — the maximum-likelihood fit gives them back.
    strength = np.array([2.0, 1.0, 0.5])
    games = 1000.0
    wins = games * strength[:, None] / (strength[:, None] + strength[None, :]) * (1 - np.eye(3))
    theta = stats.bradley_terry(wins, prior=0.0)
    np.testing.assert_allclose(theta, np.log(strength) - np.log(strength).mean(), atol=1e-6)
    keys = {"weak": [0, 0, 1, 0] * 25, "strong": [1, 1, 1, 0] * 25, "middle": [1, 0, 1, 0] * 25}
    board = stats.leaderboard(keys, samples=100)
    assert [row["name"] for row in board] == ["strong", "middle", "weak"]
    assert np.mean([row["rating"] for row in board]) == pytest.approx(stats.ELO_MEAN)
    assert all(row["low"] <= row["rating"] <= row["high"] for row in board)
    # A column that never loses stays finite.
    assert all(np.isfinite(row["rating"]) for row in stats.leaderboard({"a": [1] * 10, "b": [0] * 10}, samples=10))


def test_few_shot_answers_stop_at_the_first_newline():
    p = arith.Problem(76, 81, "+")
    assert stats.few_shot_answer(" 157\nQ: What is 3 plus 4?\nA: 7") == "157"
    assert arith.correct(p, stats.few_shot_answer(" 157\nQ: What is 3 plus 4?\nA: 7"))
    assert not arith.correct(p, stats.few_shot_answer(" 15\nQ: 157"))  # the right number, but after the answer
    assert stats.few_shot_answer("") == ""
    prompt = arith_prompts.few_shot_prompt(arith.World(), p)
    assert prompt.endswith("Q: What is 76 plus 81?\nA:") and prompt.count("\nA: ") == 4


def test_exact_and_last_number_matching():
    assert stats.matches("I think 12, no: 799", "799")
    assert stats.matches("799.", " 799 ")
    assert stats.matches("0799", "799")  # the same integer
    assert not stats.matches("799 or 800", "799")
    assert not stats.matches("no idea", "799")
    assert stats.matches(" 799 ", "799", "exact")
    assert not stats.matches("799.", "799", "exact")
    assert not stats.matches("The answer is 799", "799", "exact")
    assert stats.matches("Lisboa", "Lisboa", "exact") and not stats.matches("Lisboa", "Lisboa")


def test_distinct_accuracy_and_bits_per_byte_helpers():
    assert stats.distinct_answers([["5", "5", "It is 5."], ["1", "2", "none"]]) == pytest.approx((1 + 3) / 2)
    assert stats.accuracy_by_digits([True, False, True, True], [1, 1, 2, 3]) == {"1": 0.5, "2": 1.0, "3": 1.0}
    metrics = [{"loss": 1.0, "tokens": 100, "bytes": 100}, {"loss": 2.0, "tokens": 100, "bytes": 300}]
    assert stats.combined_bits_per_byte(metrics) == pytest.approx(300 / 400 / math.log(2))
    tokens = np.arange(1000)
    assert len(stats.window_cap(tokens, 8, cap=300, rows=4)) == 36 * 8 + 1  # 37 windows → a multiple of 4
    assert len(stats.window_cap(tokens[:5], 8)) == 5


def test_the_pretraining_ancestor_follows_the_lineage(tmp_path):
    def run(name, task, parent=None):
        (tmp_path / name).mkdir()
        saved = {"train": {"task": task, "init_from": str(tmp_path / parent) if parent else ""}}
        if parent:
            saved["lineage"] = {"parent": str(tmp_path / parent), "step": 10}
        (tmp_path / name / "config.json").write_text(json.dumps(saved))

    run("base", "")
    run("sft", "sft", "base")
    run("rl", "sft", "sft")
    run("orphan", "sft", "gone")
    assert rc.pretraining_ancestor(tmp_path / "rl") == tmp_path / "base"
    assert rc.pretraining_ancestor(tmp_path / "base") == tmp_path / "base"
    assert rc.pretraining_ancestor(tmp_path / "orphan") is None


# --- a tiny pipeline and its card ---------------------------------------------------------------------

def _quiet(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_stages):
    """The session's tiny base → SFT → reward-model chain (tests/conftest.py), and a problems file."""
    root = tmp_path_factory.mktemp("pipeline")
    base, sft, rm = tiny_stages["base"], tiny_stages["sft"], tiny_stages["rm"]
    problems = root / "problems.jsonl"
    problems.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 400 plus 399?"}],
                                    "answer": "799"}) + "\n"
                        + json.dumps({"messages": [{"role": "system", "content": "Answer with the number only."},
                                                   {"role": "user", "content": "2+3?"}], "answer": 5}) + "\n")
    return {"root": root, "base": base, "sft": sft, "rm": rm, "problems": problems}


@pytest.fixture(scope="module")
def card(pipeline):
    out = pipeline["root"] / "card"
    code, stdout, err = _quiet(["report-card", str(pipeline["base"]), str(pipeline["sft"]), "--reward",
                                str(pipeline["rm"]), "--best-of", "2", "--problems", "3", "--problems-file",
                                str(pipeline["problems"]), "--out", str(out), "--json"])
    assert code == 0, err
    assert len(stdout.strip().splitlines()) == 1  # exactly one JSON object on stdout
    return json.loads(stdout), out


COLUMNS = ("base", "sft", "sft+best-of-2")


def test_the_card_writes_its_files(card):
    report, out = card
    for name in ("report.md", "report.json", "accuracy_by_digits.png", "win_rates.png", "rm_win_rates.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert sorted(report["files"]) == sorted(str(out / p) for p in os.listdir(out))
    saved = json.loads((out / "report.json").read_text())
    assert saved["runs"] == report["runs"] and saved["win_rates"] == report["win_rates"]
    md = (out / "report.md").read_text()
    assert all(f"`{c}`" in md for c in COLUMNS) and "Gold labeler win rate" in md and "Reward-model win rate" in md
    assert "Correctness win rate" in md and "Leaderboard" in md


def test_every_column_has_every_row_in_range(card):
    report, _ = card
    runs = report["runs"]
    assert list(runs) == list(COLUMNS)
    digits = {"1", "2", "3", "4", "5"}
    for name, r in runs.items():
        for key in ("accuracy_by_digits", "accuracy_by_digits_t1"):
            assert set(r[key]) == digits and all(0 <= x <= 1 for x in r[key].values()), (name, key)
        for key in ("format_ok", "ran_on", "accuracy", "accuracy_t1", "problems_file_accuracy"):
            assert 0 <= r[key] <= 1, (name, key)
        assert 0 <= r["mean_length"] <= report["settings"]["reply_tokens"] == arith.reply_budget(arith.World())
        assert 1 <= r["distinct"] <= rc.DISTINCT_SAMPLES and 0 <= r["pass_at_8"] <= 1
        assert 0 <= r["worked_share"] <= 1
        assert 0 <= r["held_out_accuracy"] <= 1 if r["kind"] != "best-of" else "held_out_accuracy" not in r
        assert r["bits_per_byte"] is not None and 0 < r["bits_per_byte"] < 16
        assert math.isfinite(r["mean_reward"])
    assert set(runs["base"]["accuracy_by_digits_few_shot"]) == digits  # base runs are also asked GPT-3's way
    assert set(runs["base"]["accuracy_by_digits_few_shot_worked"]) == digits  # ... with worked examples too
    assert 0 <= runs["base"]["few_shots_worked"] <= runs["base"]["few_shots"] <= 4
    assert "accuracy_by_digits_few_shot" not in runs["sft"]
    for row in ("step_by_step_accuracy_by_digits", "direct_accuracy_by_digits"):  # "ask for precision"
        assert set(runs["sft"][row]) == digits and row not in runs["base"]
    assert [runs[c]["kind"] for c in COLUMNS] == ["base", "chat", "best-of"]
    assert runs["sft+best-of-2"]["bits_per_byte"] == runs["sft"]["bits_per_byte"]
    assert runs["base"]["bits_per_byte"] != runs["sft"]["bits_per_byte"]  # (fine-tuning moved the weights)
    assert report["settings"]["problems_per_digit_count"] == 3 and report["settings"]["problems_file"] == 2


def test_win_rates_cover_every_ordered_pair(card):
    report, _ = card
    for key in ("win_rates", "rm_win_rates"):
        rates = report[key]
        assert set(rates) == {f"{a} vs {b}" for a in COLUMNS for b in COLUMNS if a != b}, key
        for name, w in rates.items():
            assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1, (key, name)
            a, b = name.split(" vs ")
            assert w["rate"] + rates[f"{b} vs {a}"]["rate"] == pytest.approx(1.0)


def test_correctness_win_rates_and_the_leaderboard_cover_every_column(card):
    report, _ = card
    rates = report["correctness_win_rates"]
    assert set(rates) == {f"{a} vs {b}" for a in COLUMNS for b in COLUMNS if a != b}
    for name, w in rates.items():
        a, b = name.split(" vs ")
        assert set(w["by_digits"]) == {"1", "2", "3", "4", "5"}
        for d, v in w["by_digits"].items():
            assert v["rate"] + rates[f"{b} vs {a}"]["by_digits"][d]["rate"] == pytest.approx(1.0)
    board = report["leaderboard"]
    assert sorted(row["name"] for row in board) == sorted(COLUMNS)
    assert [row["rating"] for row in board] == sorted((row["rating"] for row in board), reverse=True)


def test_gold_answer_logprobs_equal_a_plain_forward_pass(card, pipeline):
    """log p(gold answer | prompt): the chat run's direct reply + <|end|> after the chat template, the
    base run's " ANSWER\n" after the direct few-shot prompt (the prompt's last tokens that fit the
    context), each computed here unpadded, one at a time."""
    import jax.numpy as jnp

    from plutao.model.heads import forward_logits
    from plutao.tokenizer.chat import prompt_ids
    from plutao.train.losses import token_logprobs
    from plutao.train.run.lineage import load_run

    report, _ = card
    world, n = arith.World(), report["settings"]["problems_per_digit_count"]
    assert "gold_logprob" not in report["runs"]["sft+best-of-2"]  # (the SFT model's own row)
    for name in ("base", "sft"):
        run = load_run(pipeline[name])
        tok, budget = run.tokenizer, arith.reply_budget(world, run.cfg.model.context_length)
        for d in (1, 3):
            want = []
            for i in range(n):
                messages, p = arith.evaluation_problem(world, d, i)
                if name == "sft":
                    head = prompt_ids(messages, tok)
                    answer = tok.encode_unseen(str(p.answer)).tolist() + [tok.end_id]
                else:
                    limit = max(run.cfg.model.context_length - budget, run.cfg.model.context_length // 2)
                    head = rc.few_shot_ids(tok, world, p, limit, False)[0]
                    answer = tok.encode_unseen(f" {p.answer}\n").tolist()
                ctx = run.cfg.model.context_length  # (the prompt's last tokens that fit, as the sampled rows')
                head = rc.fit(head, ctx, budget)
                head = head[max(len(head) + len(answer) - ctx, 0):]
                seq = jnp.asarray([list(head) + answer], jnp.int32)
                logits, _ = forward_logits(run.model, seq[:, :-1])
                logp = np.asarray(token_logprobs(logits, seq[:, 1:]))[0, len(head) - 1:]
                want.append(float(logp.sum()))
            got = report["runs"][name]["gold_logprob_by_digits"][str(d)]
            np.testing.assert_allclose(got, np.mean(want), rtol=1e-4)
            assert got < 0


def test_the_markdown_table_has_a_column_per_run(card):
    report, _ = card
    header = markdown(report).splitlines()[2]
    assert header == "| | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |"


# --- mistakes: one line, exit 2, nothing written -------------------------------------------------------

def _refused(argv, out):
    code, stdout, err = _quiet(argv + ["--out", str(out)])
    assert code == 2, err
    assert err.startswith("plutao: error: ") and len(err.strip().splitlines()) == 1, err
    assert not stdout and not out.exists()
    return err


def test_best_of_needs_a_reward_model_and_is_checked_before_loading(tmp_path):
    err = _refused(["report-card", str(tmp_path / "missing"), "--best-of", "2"], tmp_path / "out")
    assert "--reward" in err
    assert "≥ 0" in _refused(["report-card", str(tmp_path / "missing"), "--best-of", "-1", "--reward", "x"],
                             tmp_path / "out")
    assert "--problems" in _refused(["report-card", str(tmp_path / "missing"), "--problems", "0"], tmp_path / "out")
    assert "does not exist" in _refused(["report-card", str(tmp_path / "missing")], tmp_path / "out")


def test_a_reward_run_is_not_a_column(pipeline, tmp_path):
    err = _refused(["report-card", str(pipeline["sft"]), str(pipeline["rm"])], tmp_path / "out")
    assert "reward-model run" in err and "--reward" in err
    assert "not a reward-model run" in _refused(["report-card", str(pipeline["sft"]), "--reward",
                                                 str(pipeline["base"])], tmp_path / "out")


def test_columns_need_distinct_names_and_best_of_needs_an_sft_run(pipeline, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sft").symlink_to(pipeline["sft"])
    assert "named 'sft'" in _refused(["report-card", str(pipeline["sft"]), str(tmp_path / "other" / "sft")],
                                     tmp_path / "out")
    assert "SFT run" in _refused(["report-card", str(pipeline["base"]), "--reward", str(pipeline["rm"]), "--best-of",
                               "2"], tmp_path / "out")


def test_a_broken_problems_file_is_refused_before_sampling(pipeline, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "2+2?"}]}\n')
    assert "bad.jsonl:1" in _refused(["report-card", str(pipeline["sft"]), "--problems-file", str(bad)],
                                     tmp_path / "out")


def test_the_summary_of_made_up_replies_equals_hand_counts():
    """summarize() on two columns whose replies are written by hand: every new row is the count it should be."""
    from plutao.experiments.report_card_summary import summarize

    world = arith.World()
    problems = rc.evaluation_problems(world, 2)  # 2 problems per digit count, 1..5
    n = len(problems.problems)
    right = [str(p.answer) for p in problems.problems]
    wrong = [str(p.answer + 1) for p in problems.problems]
    reply = lambda text: stats.Reply(text, len(text), END)
    # a: right on the first problem of every bucket; b: right on 1- and 2-digit problems only.
    a_texts = [right[i] if i % 2 == 0 else wrong[i] for i in range(n)]
    b_texts = [right[i] if problems.problems[i].digits <= 2 else wrong[i] for i in range(n)]
    worked = [reply(arith.worked_text(p)) for p in problems.problems]  # step by step: all right
    held = [reply(str(p.answer)) for _, p in problems.held_out]
    groups = [[right[i]] + [wrong[i]] * 7 for i in problems.distinct]  # pass@8 = 1, distinct answers 2
    columns = []
    for name, texts in (("a", a_texts), ("b", b_texts)):
        c = rc.Column(name, rc.Path(name), 1, "chat", [reply(t) for t in texts], [reply(t) for t in texts], groups)
        c.extra = {"step_by_step": worked, "direct": [reply(t) for t in texts], "held_out": held}
        columns.append(c)
    plan = rc.Plan([rc.Path("a"), rc.Path("b")], ["a", "b"], [True, True], None, 0, 2, None, "last-number", 0)
    report = summarize(columns, problems, plan, {}, [], end_id=END, user_id=USER)
    a, b = report["runs"]["a"], report["runs"]["b"]
    assert a["accuracy_by_digits"] == {str(d): 0.5 for d in range(1, 6)}
    assert b["accuracy_by_digits"] == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0, "5": 0.0}
    assert a["step_by_step_accuracy_by_digits"] == {str(d): 1.0 for d in range(1, 6)}
    assert a["step_by_step_worked_share"] == 1.0 and a["direct_worked_share"] == 0.0
    assert a["held_out_accuracy"] == 1.0 and a["pass_at_8"] == 1.0 and a["distinct"] == 2.0
    assert a["format_ok"] == 1.0
    w = report["correctness_win_rates"]["a vs b"]["by_digits"]
    # 1–2 digits: a right on one of two, b on both → a loses one, ties one: ¼; 3–5: a wins one, ties one: ¾.
    assert [w[str(d)]["rate"] for d in range(1, 6)] == [0.25, 0.25, 0.75, 0.75, 0.75]
    assert report["correctness_win_rates"]["a vs b"]["all"]["rate"] == pytest.approx((0.25 * 4 + 0.75 * 6) / 10)
    assert [row["name"] for row in report["leaderboard"]] == ["a", "b"]  # (a is right on 5, b on 4)


def test_the_tool_rows_of_made_up_replies_equal_hand_counts():
    """With --tools: accuracy of the final answers, the share of replies that called, errors per call
    and the tokens a reply took with its tool turns — from replies written by hand."""
    from plutao.experiments.report_card_summary import summarize
    from plutao.model.agent import final_answer

    assert final_answer([5, 6, 7, 8, 9], (2, 3)) == [9] and final_answer([5, 6], ()) == [5, 6]
    world = arith.World()
    problems = rc.evaluation_problems(world, 2)
    probs = problems.problems
    greedy = [stats.Reply(str(p.answer + 1), 3, END) for p in probs]  # wrong without the tool
    # With it: right on 4- and 5-digit problems (which called it once, and one of those calls erred).
    tools = [stats.Reply(str(p.answer if p.digits >= 4 else p.answer + 1), 20 if p.digits >= 4 else 3, END)
             for p in probs]
    calls = [int(p.digits >= 4) for p in probs]
    errors = [0] * len(probs)
    errors[calls.index(1)] = 1
    c = rc.Column("t", rc.Path("t"), 1, "chat", greedy, greedy, [[r.text] * 8 for r in greedy[:len(problems.distinct)]])
    c.extra, c.counts = {"tools": tools}, {"tool_calls": calls, "tool_errors": errors}
    plan = rc.Plan([rc.Path("t")], ["t"], [True], None, 0, 2, None, "last-number", 0, tools=("calculator",))
    row = summarize([c], problems, plan, {}, [], end_id=END, user_id=USER)["runs"]["t"]
    assert row["accuracy_by_digits"] == {str(d): 0.0 for d in range(1, 6)}
    assert row["tool_accuracy_by_digits"] == row["tool_call_rate_by_digits"] == {
        "1": 0.0, "2": 0.0, "3": 0.0, "4": 1.0, "5": 1.0}
    assert row["tool_call_rate"] == 0.4 and row["tool_calls_malformed"] == 0.25  # (1 error in 4 calls)
    assert row["tool_tokens_per_reply"] == pytest.approx((4 * 20 + 6 * 3) / 10)


def test_an_unknown_tool_is_refused_before_loading(pipeline, tmp_path):
    err = _refused(["report-card", str(pipeline["sft"]), "--tools", "calculator,abacus"], tmp_path / "card")
    assert "--tools: unknown tool 'abacus'; the tools are calculator" in err
