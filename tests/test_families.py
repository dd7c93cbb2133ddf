"""Every model family through the same CLI: train, eval, and the family's own commands."""

import json
import math
from pathlib import Path

import numpy as np
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


# 500 steps: the model learns the number words (at 150 it still ignored the source, ~BLEU 3; at 400 BLEU ~89).
TINY_SEQ2SEQ = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128", "model.dropout=0.0",
                "model.context_length=16", "data.tokenizer=word", "data.val_fraction=0.1", "train.batch_size=32", "train.steps=500",
                "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=500", "optim.lr=3e-3",
                "optim.warmup_steps=20", "optim.label_smoothing=0.0", "train.peak_flops=1e11"]


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
        # The number words are a word-for-word dictionary: after 500 steps both decoders translate
        # nearly all of them (measured: BLEU 99.1, chrF 99.6; a model that ignores its source scores ~3 / ~20).
        assert r[decoder]["bleu"] > 80.0, r[decoder]["bleu_detail"]
        assert r[decoder]["chrf"] > 85.0, r[decoder]
    # Teacher-forced loss: far below a uniform guess over the 87 word ids (ln 87 = 4.47); measured 0.09.
    assert r["loss"] < 0.5, r["loss"]
    right = sum(e["hypothesis"] == e["reference"] for e in r["greedy"]["examples"])
    assert right >= 4, r["greedy"]["examples"]


def test_beam_search_with_one_beam_is_greedy(translation_run, pairs_tsv):
    from flax import nnx

    from plutao.model.seq2seq import beam_search, greedy_decode, strip
    from plutao.train.run.lineage import load_run

    run = load_run(translation_run)
    tok, L = run.tokenizer, run.cfg.model.context_length
    # One beam keeps one alive prefix: greedy's, while greedy runs. Each time <eos> is among the two best
    # continuations, that greedy prefix + <eos> joins the pool of finished hypotheses, and the pool's
    # best wins: so beam 1 is a prefix of greedy's output ended by <eos>, at least as likely as greedy's.
    sources = [line.split("\t")[0] for line in pairs_tsv.read_text().splitlines()]
    src = np.full((len(sources), L), tok.pad_id, np.int32)
    for row, text in enumerate(sources):
        ids = (tok.encode(text) + [tok.eos_id])[:L]
        src[row, :len(ids)] = ids
    valid = src != tok.pad_id
    graphdef, params = nnx.split(run.model)
    greedy, greedy_logp = greedy_decode(graphdef, params, src, valid, tok.bos_id, tok.eos_id, max_len=L)
    beams, _, beam_logp = beam_search(graphdef, params, src, valid, tok.bos_id, tok.eos_id, tok.pad_id, max_len=L,
                                      beam_size=1, alpha=0.0)
    greedy, beams = np.asarray(greedy), np.asarray(beams)
    assert beams.shape[:2] == (len(sources), 1)
    same = 0
    for row in range(len(sources)):
        b, g = strip(beams[row, 0], tok.eos_id, tok.pad_id), strip(greedy[row], tok.eos_id, tok.pad_id)
        assert g[:len(b)] == b, row
        same += b == g
    assert np.all(np.asarray(beam_logp)[:, 0] >= np.asarray(greedy_logp) - 1e-5)
    assert same >= 0.95 * len(sources)  # a trained model that is sure of its words rarely prefers to stop early


def test_a_source_longer_than_the_context_is_cut_keeping_its_end_and_said(capsys, translation_run):
    long = " ".join(["Deux trois."] * 20)  # far past the 16-token context
    assert main(["translate", str(translation_run), long, "Un.", "--json"]) == 0
    captured = capsys.readouterr()
    out, err = json.loads(captured.out), captured.err
    assert [o["source"] for o in out] == [long, "Un."]
    (note,) = [line for line in err.splitlines() if "longer than the model's context" in line]
    assert "1 source(s)" in note and "keeping <eos>" in note


def test_translation_evaluation_scores_each_pair_once(capsys, translation_run, pairs_tsv, tmp_path):
    lines = pairs_tsv.read_text().splitlines()[:20]
    doubled = tmp_path / "doubled.tsv"
    doubled.write_text("\n".join(lines + lines[:7]) + "\n")
    r = run_json(capsys, ["eval", str(translation_run), "--data", str(doubled), "--beam", "2", "--json"])
    assert r["pairs"] == 20 and r["duplicate_pairs_dropped"] == 7
    once = run_json(capsys, ["eval", str(translation_run), "--data", str(doubled), "--beam", "2", "--limit", "20",
                             "--json"])
    assert once["greedy"]["bleu"] == r["greedy"]["bleu"] and once["loss"] == r["loss"]


def test_translate_command_prints_ranked_hypotheses(capsys, translation_run):
    out = run_json(capsys, ["translate", str(translation_run), "Deux trois.", "Un.", "--beam", "3", "--n-best", "3",
                            "--json"])
    assert [o["source"] for o in out] == ["Deux trois.", "Un."]
    for o in out:
        scores = [t["score"] for t in o["translations"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_attention_maps_for_all_three_kinds(capsys, translation_run, tmp_path, monkeypatch):
    import matplotlib.image

    from plutao.experiments import attention_plot
    from plutao.experiments import inspect as inspect_module

    drawn = {}
    real = inspect_module.plot_attention_sets

    def capture(sets, out_dir, stem):  # keep the weights behind the PNGs
        drawn.update(sets)
        return real(sets, out_dir, stem)

    monkeypatch.setattr(inspect_module, "plot_attention_sets", capture)  # where `attention` looks it up
    assert main(["attention", str(translation_run), "--text", "Deux trois.", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["attention-cross.png", "attention-decoder-self.png", "attention-encoder-self.png"]
    assert sorted(drawn) == ["cross", "decoder-self", "encoder-self"]
    src, tgt = drawn["encoder-self"][1], drawn["decoder-self"][1]
    assert src[-1] == "<eos>" and tgt[0] == "<bos>" and drawn["cross"][1:] == (tgt, src)
    for kind, (weights, queries, keys) in drawn.items():
        assert len(weights) == 2  # one (H, Tq, Tk) array per layer
        for w in weights:
            w = np.asarray(w, np.float64)
            assert w.shape == (4, len(queries), len(keys)), (kind, w.shape)
            assert w.min() >= 0.0 and np.allclose(w.sum(-1), 1.0, atol=1e-5), kind  # rows are distributions
            rows, cols = np.triu_indices(len(queries), 1, len(keys))
            if kind == "decoder-self":  # causal: nothing above the diagonal, the first row all on itself
                assert np.all(w[:, rows, cols] == 0.0)
                assert np.allclose(w[:, 0, 0], 1.0)
            else:  # not causal: queries look at later keys too
                assert w[:, rows, cols].sum() > 0.1, kind
    for kind, (weights, queries, keys) in drawn.items():
        image = matplotlib.image.imread(tmp_path / f"attention-{kind}.png")
        height, width = image.shape[:2]
        assert width > height > 300, (kind, image.shape)  # a grid of 2 layers x 4 heads: wider than tall
        assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50, kind
        # The picture is these weights: drawn again it is the same, and with other (uniform) weights
        # on the same tokens a good part of it changes.
        again, flat = tmp_path / "again" / f"{kind}.png", tmp_path / "flat" / f"{kind}.png"
        attention_plot.plot_attention_grid(weights, queries, keys, again, title=f"attention · {kind}")
        uniform = [np.full_like(np.asarray(w), 1.0 / len(keys)) for w in weights]
        attention_plot.plot_attention_grid(uniform, queries, keys, flat, title=f"attention · {kind}")
        np.testing.assert_array_equal(matplotlib.image.imread(again), image)
        changed = np.any(matplotlib.image.imread(flat) != image, axis=-1).mean()
        assert changed > 0.1, (kind, changed)  # (measured 0.34)


def test_family_specific_commands_refuse_other_families(capsys, translation_run):
    fails(capsys, ["fill-mask", str(translation_run), "a <mask> b"], "fill-mask needs a masked LM")
    fails(capsys, ["sample", str(translation_run)], "plutao translate")


def test_a_malformed_tsv_line_is_a_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("Bonjour.\tHello.\nno tab here\n")
    fails(capsys, ["train", "translate-cpu", f"data.path={bad}", "--workdir", str(tmp_path / "r"), *TINY_SEQ2SEQ],
          "bad.tsv:2", "source<TAB>target")
    assert not (tmp_path / "r").exists()


# (slow: tests/test_bert.py covers the masked-LM objective and fill-mask at library level)
@pytest.mark.slow
def test_masked_lm_trains_and_fills_masks(capsys, tmp_path):
    import collections
    import random

    from plutao.tokenizer import SPECIAL_TOKENS, load_tokenizer

    # English number words: inside a word the context decides a hidden letter, so a masked LM that
    # uses its context beats always guessing the most frequent character (the space) by far.
    rnd = random.Random(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(" ".join(EN[rnd.randrange(10)] for _ in range(12)) for _ in range(400)) + "\n")
    run = tmp_path / "bert"
    assert main(["train", "bert-cpu", f"data.path={corpus}", "data.tokenizer=char", "model.n_layers=2",
                 "model.d_model=64", "model.context_length=64", "model.positions=rotary", "model.dropout=0.0",
                 "optim.lr=3e-3", "optim.warmup_steps=10", "train.steps=150", "train.batch_size=16",
                 "train.eval_every=75", "train.sample_every=75", "train.checkpoint_every=150", "train.peak_flops=1e11",
                 "--workdir", str(run), "--quiet"]) == 0
    tok = load_tokenizer(run / "tokenizer")
    ids = tok.encode(corpus.read_text())
    held_out = [i for i in ids[int(0.9 * len(ids)):] if i >= len(SPECIAL_TOKENS)]  # the last 10%, ordinary tokens
    (top, n_top), = collections.Counter(held_out).most_common(1)
    baseline = n_top / len(held_out)
    assert tok.token_strings([top]) == [" "] and 0.1 < baseline < 0.3, baseline  # measured 0.183
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["step"] for v in val] == [75, 150]
    assert val[-1]["accuracy"] > baseline + 0.2, (val, baseline)  # measured 0.67 at step 150
    r = run_json(capsys, ["eval", str(run), "--json"])
    assert r["masked_tokens"] > 200 and r["masked_accuracy"] > baseline + 0.2, (r, baseline)
    # Only "eight" has "eig_t" and only "six" "s_x": the fills know the words (measured 0.72 and 0.60),
    # and the answers are neither the space nor the commonest letter.
    r = run_json(capsys, ["fill-mask", str(run), "one eig<mask>t s<mask>x two", "--top-k", "4", "--json"])
    assert len(r["masks"]) == 2
    for mask, answer in zip(r["masks"], ("h", "i")):
        fills = mask["fills"]
        probs = [f["prob"] for f in fills]
        assert len(fills) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
        assert fills[0]["token"] == answer and probs[0] > 0.3, fills
    r = run_json(capsys, ["neighbors", str(run), "e", "-k", "3", "--json"])
    assert len(r["neighbors"]) == 3 and all(n["token"] != "e" for n in r["neighbors"])
    r = run_json(capsys, ["analogy", str(run), "o", "n", "e", "-k", "2", "--json"])
    assert len(r["answers"]) == 2 and not {"o", "n", "e"} & {a["token"] for a in r["answers"]}
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
                                "model.context_length=32", "train.batch_size=8", "train.steps=150", "optim.lr=1e-2",
                                "optim.warmup_steps=5", "train.eval_every=75", "train.sample_every=150",
                                "train.sample_tokens=20", "train.checkpoint_every=150", "train.peak_flops=1e11",
                                f"data.path={small_corpus}", f"data.val_path={held_out}",
                                "--workdir", str(run), "--json", "--quiet"])
    assert summary["step"] == 150
    # Baselines from the data: uniform over the vocabulary (≈ 4.65 nats, where training starts) and
    # the training text's character frequencies (add-one) scored on the held-out text (≈ 3.47).
    from collections import Counter

    from plutao.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "tokenizer")
    train_ids, held_ids = tok.encode(small_corpus.read_text()), tok.encode(held_out.read_text())
    counts = Counter(train_ids)
    unigram = -sum(math.log((counts[i] + 1) / (len(train_ids) + tok.vocab_size)) for i in held_ids) / len(held_ids)
    uniform = math.log(tok.vocab_size)
    assert unigram < uniform - 1.0
    # Measured 3.13: past the unigram level, so the recurrence is used, not only the character frequencies.
    assert summary["val_loss"] < unigram - 0.2, (summary["val_loss"], unigram)
    r = run_json(capsys, ["eval", str(run), "--json"])
    assert r["data"] == str(held_out) and r["tokens"] == len(held_out.read_text())  # char level: one per char
    assert r["loss"] < unigram - 0.2, (r["loss"], unigram)
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
    assert first["interrupted"]
    from plutao.train.run.checkpoint import Checkpoints  # the time spent is recorded inside the checkpoint

    assert Checkpoints(run / "checkpoints", read_only=True).metadata(5)["train_seconds"] > 0
    # The first invocation already spent more than this budget: the run ends where it is.
    again = run_json(capsys, ["train", "tiny", f"data.path={small_corpus}", "train.steps=1000",
                              "train.max_seconds=0.01", "--workdir", str(run), "--json", "--quiet"])
    assert again["step"] == 5 and again["budget_spent"]
