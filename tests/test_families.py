"""Every model family through the same CLI: train, eval, and the family's own commands."""

import json
import math
from pathlib import Path

import pytest

from plutao.experiments.cli import main

FR = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"]
EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def pairs_tsv(tmp_path_factory) -> Path:
    """Number words, French → English: a translation task small enough to learn in seconds."""
    import random

    rnd = random.Random(0)
    lines = set()
    while len(lines) < 600:
        digits = [rnd.randrange(10) for _ in range(rnd.randint(1, 4))]
        lines.add(" ".join(FR[d] for d in digits).capitalize() + ".\t" + " ".join(EN[d] for d in digits).capitalize()
                  + ".")
    path = tmp_path_factory.mktemp("pairs") / "numbers.tsv"
    path.write_text("\n".join(sorted(lines)) + "\n")
    return path


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("plutao: error: "), err
    for needle in needles:
        assert needle in err, err


TINY_SEQ2SEQ = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128", "model.dropout=0.0",
                "model.context_length=16", "data.tokenizer=word", "data.val_fraction=0.1", "train.batch_size=32", "train.steps=150",
                "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=150", "optim.lr=3e-3",
                "optim.warmup_steps=20", "optim.label_smoothing=0.0"]


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory, pairs_tsv):
    path = tmp_path_factory.mktemp("translate") / "run"
    assert main(["train", "translate-cpu", f"data.path={pairs_tsv}", "--workdir", str(path), "--quiet",
                 *TINY_SEQ2SEQ]) == 0
    return path


def test_translation_trains_and_eval_reports_sacrebleu_scores(capsys, translation_run, pairs_tsv):
    r = run_json(capsys, ["eval", str(translation_run), "--data", str(pairs_tsv), "--limit", "64", "--json"])
    for decoder in ("greedy", "beam4"):
        assert "tok:13a" in r[decoder]["bleu_signature"]  # sacrebleu's own signature
        assert 0.0 <= r[decoder]["bleu"] <= 100.0 and r[decoder]["chrf"] > 0.0
    # 150 steps: far from perfect, but well past a uniform guess over the 87 word ids (ln 87 = 4.47).
    assert r["loss"] < 0.6 * math.log(87), r["loss"]
    assert r["greedy"]["chrf"] > 10.0, r["greedy"]


def test_translate_command_prints_ranked_hypotheses(capsys, translation_run):
    out = run_json(capsys, ["translate", str(translation_run), "Deux trois.", "Un.", "--beam", "3", "--n-best", "3",
                            "--json"])
    assert [o["source"] for o in out] == ["Deux trois.", "Un."]
    for o in out:
        scores = [t["score"] for t in o["translations"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_attention_maps_for_all_three_kinds(capsys, translation_run, tmp_path):
    assert main(["attention", str(translation_run), "--text", "Deux trois.", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["attention-cross.png", "attention-decoder-self.png", "attention-encoder-self.png"]


def test_family_specific_commands_refuse_other_families(capsys, translation_run):
    fails(capsys, ["fill-mask", str(translation_run), "a <mask> b"], "fill-mask needs a masked LM")
    fails(capsys, ["sample", str(translation_run)], "plutao translate")


def test_a_malformed_tsv_line_is_a_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("Bonjour.\tHello.\nno tab here\n")
    fails(capsys, ["train", "translate-cpu", f"data.path={bad}", "--workdir", str(tmp_path / "r"), *TINY_SEQ2SEQ],
          "bad.tsv:2", "source<TAB>target")
    assert not (tmp_path / "r").exists()


def test_masked_lm_trains_and_fills_masks(capsys, tmp_path, small_corpus):
    run = tmp_path / "bert"
    assert main(["train", "bert-cpu", f"data.path={small_corpus}", "data.tokenizer=char", "model.n_layers=2",
                 "model.d_model=64", "model.context_length=64", "train.steps=60", "train.batch_size=16",
                 "train.eval_every=30", "train.sample_every=30", "train.checkpoint_every=60", "--workdir", str(run),
                 "--quiet"]) == 0
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val and all(0.0 <= v["accuracy"] <= 1.0 for v in val)
    r = run_json(capsys, ["eval", str(run), "--json"])
    assert 0.0 < r["masked_accuracy"] <= 1.0 and r["masked_tokens"] > 0
    r = run_json(capsys, ["fill-mask", str(run), "Return the <mask>alue.", "--top-k", "4", "--json"])
    (fills,) = [m["fills"] for m in r["masks"]]
    probs = [f["prob"] for f in fills]
    assert len(fills) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    r = run_json(capsys, ["neighbors", str(run), "e", "-k", "3", "--json"])
    assert len(r["neighbors"]) == 3 and all(n["token"] != "e" for n in r["neighbors"])
    r = run_json(capsys, ["analogy", str(run), "a", "b", "c", "-k", "2", "--json"])
    assert len(r["answers"]) == 2 and not {"a", "b", "c"} & {a["token"] for a in r["answers"]}
    fails(capsys, ["fill-mask", str(run), "no mask here"], "<mask>")


def test_ngram_runs_like_any_other_family(capsys, tmp_path, small_corpus):
    run = tmp_path / "ngram"
    summary = run_json(capsys, ["train", "model.family=ngram", "model.ngram_order=3", f"data.path={small_corpus}",
                                "--workdir", str(run), "--json"])
    assert (run / "ngram.npz").is_file() and (run / "config.json").is_file()
    r = run_json(capsys, ["eval", str(run), "--json"])
    assert r["perplexity"] == pytest.approx(summary["val_perplexity"], rel=1e-9)
    assert main(["sample", str(run), "--prompt", "Return", "--max-new-tokens", "20", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["sample", str(run), "--prompt", "Return", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and first.startswith("Return")
    # Re-running reports the fitted table without rewriting it.
    before = (run / "ngram.npz").stat().st_mtime_ns
    again = run_json(capsys, ["train", "model.family=ngram", "model.ngram_order=3", f"data.path={small_corpus}",
                              "--workdir", str(run), "--json"])
    assert (run / "ngram.npz").stat().st_mtime_ns == before and again["val_loss"] == summary["val_loss"]
    fails(capsys, ["neighbors", str(run), "e"], "is an n-gram run")


def test_lstm_trains_evaluates_and_samples_through_the_same_loop(capsys, tmp_path, small_corpus):
    run = tmp_path / "lstm"
    held_out = tmp_path / "valid.txt"
    held_out.write_text(small_corpus.read_text()[:3000])
    summary = run_json(capsys, ["train", "model.family=lstm", "model.n_layers=2", "model.d_model=64",
                                "model.context_length=32", "train.batch_size=8", "train.steps=30",
                                "train.eval_every=15", "train.sample_every=30", "train.sample_tokens=20",
                                "train.checkpoint_every=30", f"data.path={small_corpus}", f"data.val_path={held_out}",
                                "--workdir", str(run), "--json", "--quiet"])
    assert summary["step"] == 30 and summary["val_loss"] < math.log(summary["params"])
    r = run_json(capsys, ["eval", str(run), "--json"])
    assert r["data"] == str(held_out) and r["tokens"] == len(held_out.read_text())  # char level: one per char
    assert main(["sample", str(run), "--prompt", "The", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("The")
    fails(capsys, ["attention", str(run), "--text", "abc"], "has no attention")


def test_a_time_budget_ends_the_run_with_a_final_evaluation(capsys, tmp_path, small_corpus):
    run = tmp_path / "budget"
    summary = run_json(capsys, ["train", "tiny", f"data.path={small_corpus}", "train.steps=100000",
                                "train.max_seconds=3", "--workdir", str(run), "--json", "--quiet"])
    assert summary["budget_spent"] and 0 < summary["step"] < 100000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "val" and r["step"] == summary["step"] for r in records)
    assert (run / "checkpoints" / str(summary["step"])).is_dir()


def test_a_time_budget_counts_the_time_of_earlier_invocations(capsys, tmp_path, small_corpus):
    run = tmp_path / "resumed"
    first = run_json(capsys, ["train", "tiny", f"data.path={small_corpus}", "train.steps=1000", "train.stop_at_step=5",
                              "--workdir", str(run), "--json", "--quiet"])
    assert first["interrupted"] and (run / "train_seconds.json").is_file()
    # The first invocation already spent more than this budget: the run ends where it is.
    again = run_json(capsys, ["train", "tiny", f"data.path={small_corpus}", "train.steps=1000",
                              "train.max_seconds=0.01", "--workdir", str(run), "--json", "--quiet"])
    assert again["step"] == 5 and again["budget_spent"]
