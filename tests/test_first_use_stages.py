"""What a new user meets first, stage by stage: every preset family trains with milestone samples on;
`plutao eval` scores a fine-tuning run on what it held out and says plainly when it does not apply (an
RL run); reward-model and DPO runs end with their own figures, not a perplexity; DPO's milestone
samples ask distinct questions; `plutao sample` labels a chat prompt and never prints special tokens."""

import json
import re
import shutil

import pytest

from plutao.experiments.cli import main

TINY_MODEL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=0", "model.dropout=0.0"]
MILESTONES = ["train.steps=4", "train.sample_every=2", "train.eval_every=2", "train.eval_batches=1",
              "train.checkpoint_every=4", "train.batch_size=4", "train.sample_tokens=8", "train.peak_flops=1e11",
              "optim.warmup_steps=1"]
FR = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"]
EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plutao: error: "), err
    return lines[0]


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs_tsv(tmp_path_factory):
    """A few tiny French → English pairs (number words)."""
    lines = [f"{FR[a].capitalize()} {FR[b]}.\t{EN[a].capitalize()} {EN[b]}." for a in range(10) for b in range(4)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


# preset → the overrides that make it tiny (data, tokenizer, sizes); every one with milestones on.
FAMILIES = {
    "decoder": ["tiny", "model.context_length=16"],
    "encoder_decoder": ["translate-cpu", "data.tokenizer=char", "model.context_length=16", "model.d_ff=64",
                        "data.val_fraction=0.25"],
    "encoder": ["bert-cpu", "data.tokenizer=char", "model.context_length=16"],
    "lstm": ["lstm-small", "model.n_layers=1", "model.context_length=16"],
}


@pytest.mark.parametrize("family", [*FAMILIES, "ngram"])
def test_every_family_trains_with_milestone_samples(capsys, tmp_path, small_corpus, pairs_tsv, family):
    """The first milestone sample of each family is written (a translation run's crashed on the held-out
    pairs it reads); the n-gram table has no milestones but takes the same settings."""
    run = tmp_path / family
    if family == "ngram":
        code, out, err = run_cli(capsys, "train", "model.family=ngram", "model.ngram_order=2",
                                 f"data.path={small_corpus}", *MILESTONES, "--workdir", run, "--json")
        assert code == 0, err
        assert (run / "ngram.npz").is_file() and json.loads(out)["val_loss"] > 0
        code, out, err = run_cli(capsys, "sample", run, "--max-new-tokens", "8")
        assert code == 0, err
        return
    preset, *sizes = FAMILIES[family]
    data = pairs_tsv if family == "encoder_decoder" else small_corpus
    code, out, err = run_cli(capsys, "train", preset, f"data.path={data}", *TINY_MODEL, *sizes, *MILESTONES,
                             "--workdir", run, "--json", "--quiet")
    assert code == 0, err
    samples = [r for r in records(run) if "sample" in r]
    assert [r["step"] for r in samples] == [2, 4] and all(r["sample"] for r in samples)
    assert "--- sample at step 2 ---" in err
    if family == "encoder_decoder":
        assert "(reference: " in samples[0]["sample"]
    assert json.loads(out)["step"] == 4


# --- plutao eval on the assistant stages ------------------------------------------------------------

def test_eval_scores_an_sft_run_on_its_held_out_conversations(tiny_stages, capsys, tmp_path):
    sft = tiny_stages["sft"]
    code, out, err = run_cli(capsys, "eval", sft, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["examples"] == 500 and r["scored"] > 0 and 0 < r["loss"] < 10  # (builtin:arith's held-out demos)
    assert r["perplexity"] == pytest.approx(2.718281828 ** r["loss"], rel=1e-6)
    code, out, err = run_cli(capsys, "eval", sft)
    assert code == 0, err
    assert "nats per assistant token" in out and "500 held-out conversations" in out
    # --data: every conversation of a file, with the same objective.
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {a} plus {a}?", "response": str(2 * a)})
                              for a in range(6)) + "\n")
    code, out, err = run_cli(capsys, "eval", sft, "--data", data, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["data"] == str(data) and r["examples"] == 6 and r["scored"] > 6


@pytest.mark.parametrize("kind, label", [("ppo", "PPO"), ("grpo", "GRPO")])
def test_eval_says_plainly_it_does_not_apply_to_an_rl_run(tiny_stages, capsys, tmp_path, kind, label):
    run = tmp_path / kind  # (eval reads the run's config.json alone before refusing)
    run.mkdir()
    cfg = json.loads((tiny_stages["sft"] / "config.json").read_text())
    cfg["train"]["task"] = kind
    (run / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "eval", run)
    line = one_line_error(err)
    assert code == 2 and f"is a {label} run" in line and "does not apply" in line
    assert f"plutao report-card {run}" in line


def test_reward_training_ends_with_pairwise_accuracy_and_margin(tiny_stages, capsys, tmp_path):
    data = tmp_path / "rankings.jsonl"
    shutil.copy(tiny_stages["rm"] / "comparisons" / "train.jsonl", data)
    run = tmp_path / "rm"
    code, out, err = run_cli(capsys, "reward", tiny_stages["sft"], "--workdir", run, "--data", data, "train.steps=2",
                             "train.eval_every=1", "data.val_fraction=0.25", "--json", "--quiet")
    assert code == 0, err
    assert "perplexity" not in err
    steps = [line for line in err.splitlines() if line.startswith("step 1: ")]
    assert len(steps) == 1 and re.search(r"val pairwise accuracy [\d.]+, margin [-+][\d.]+ \(ranking loss", steps[0])
    done = [line for line in err.splitlines() if line.startswith("done: step 2, ")]
    assert len(done) == 1 and "val pairwise accuracy" in done[0] and "margin" in done[0], err
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("val_loss", "val_perplexity", "val_pairwise_accuracy", "val_margin", "val_brier"):
        assert key in summary, key
    last = [r for r in records(run) if r.get("split") == "val"][-1]
    assert last["margin"] == pytest.approx(summary["val_margin"])


@pytest.fixture(scope="module")
def dpo_run(tiny_stages, tmp_path_factory):
    """A DPO run of 2 steps with evaluations and milestone samples at each (its stderr kept)."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("dpo") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["dpo", str(tiny_stages["sft"]), "--data", str(tiny_stages["rm"]), "--workdir", str(run),
                     "train.steps=2", "train.eval_every=1", "train.sample_every=1", "train.batch_size=4", "--quiet"])
    assert code == 0, err.getvalue()
    return run, err.getvalue()


def test_dpo_ends_with_its_preference_figures_and_samples_distinct_questions(dpo_run):
    run, err = dpo_run
    assert "perplexity" not in err and "masked-token" not in err
    step = [line for line in err.splitlines() if line.startswith("step 1: ")]
    assert len(step) == 1 and re.search(r"val preference accuracy [\d.]+, margin [-+][\d.]+ \(DPO loss", step[0])
    done = [line for line in err.splitlines() if line.startswith("done: step 2, ")]
    assert len(done) == 1 and "val preference accuracy" in done[0], err
    for sample in (r["sample"] for r in records(run) if "sample" in r):
        questions = [line.split(" → ")[0] for line in sample.splitlines()]
        assert len(questions) > 1 and len(set(questions)) == len(questions), sample


def test_eval_scores_a_dpo_run_on_its_held_out_pairs(dpo_run, capsys):
    run, _ = dpo_run
    code, out, err = run_cli(capsys, "eval", run, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["data"].endswith("val.jsonl") and r["scored"] > 0 and 0 <= r["accuracy"] <= 1
    for key in ("loss", "margin", "chosen_reward", "rejected_reward"):
        assert key in r, key
    # The training loop's final held-out figures are the same numbers (both cover the held-out pairs once).
    last = [x for x in records(run) if x.get("split") == "val"][-1]
    assert r["accuracy"] == pytest.approx(last["accuracy"], abs=1e-6)
    assert r["loss"] == pytest.approx(last["loss"], abs=1e-5)
    code, out, _ = run_cli(capsys, "eval", run)
    assert code == 0 and "preference accuracy" in out and "perplexity" not in out


# --- plutao sample ----------------------------------------------------------------------------------

def test_show_probs_on_a_chat_run_names_the_chat_prompt(tiny_stages, capsys):
    code, out, err = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "What is 2 plus 2?", "--show-probs",
                             "3", "--max-new-tokens", "4")
    assert code == 0, err
    header = out.splitlines()[0]
    assert "candidates after ''" not in header
    assert "after the assistant turn's start" in header and "<|assistant|>" in header and "What is 2 plus 2?" in header


def test_sample_never_prints_special_tokens(tiny_stages, capsys):
    """At a temperature that makes the next token nearly uniform, 300 tokens would hold many specials."""
    code, out, err = run_cli(capsys, "sample", tiny_stages["base"], "--temperature", "100", "--max-new-tokens", "300",
                             "--no-stop", "--seed", "1")
    assert code == 0, err
    for special in ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<|reward|>", "<|system|>", "<|user|>",
                    "<|assistant|>"):
        assert special not in out, special
    code, out, err = run_cli(capsys, "sample", tiny_stages["sft"], "--prompt", "hi ☃", "--max-new-tokens", "4")
    assert code == 2 and "'☃'" in one_line_error(err)


def test_unsampled_ids_are_the_specials_that_are_not_text():
    from plutao.tokenizer import CharTokenizer, WordTokenizer

    char = CharTokenizer.train(["abc"])
    named = {char.special_id(r) for r in ("pad", "bos", "eos", "unk", "mask", "reward", "system", "user", "assistant")}
    assert set(char.unsampled_ids()) == named  # (<|endoftext|> and <|end|> end a text or a reply)
    stops = (char.user_id, char.assistant_id)
    assert set(char.unsampled_ids(stops)) == named - set(stops)
    assert char.unsampled_ids(vocab_size=char.vocab_size + 3)[-3:] == tuple(range(char.vocab_size, char.vocab_size + 3))
    word = WordTokenizer.train(["a b\nc"])  # a word tokenizer writes its <eos> (a newline) and <unk> as text
    assert {word.eos_id, word.unk_id}.isdisjoint(word.unsampled_ids()) and word.pad_id in word.unsampled_ids()
