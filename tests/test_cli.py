"""The command line: outputs people read, and one-line errors with exit code 2 that leave runs untouched."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from plutao.experiments.cli import main
from plutao.train.data import corpora


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus):
    path = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "tiny", f"data.path={small_corpus}", "--workdir", str(path), "--quiet"]) == 0
    return path


def fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("plutao: error: ")
    for needle in needles:
        assert needle in err, err
    return err


def test_train_writes_the_run_directory(run_dir):
    for name in ("config.json", "metrics.jsonl", "loss.png", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["vocab_size"] > 0 and config["provenance"]["versions"]["jax"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert {"loss", "perplexity", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(train[-1])
    assert any(r.get("split") == "val" for r in records)
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())


def test_sample_eval_score_tokenize_params(run_dir, capsys):
    assert main(["sample", str(run_dir), "--prompt", "The ", "--max-new-tokens", "20", "--show-probs", "3"]) == 0
    out = capsys.readouterr().out
    assert "next-token candidates" in out and "The " in out
    assert main(["sample", str(run_dir), "--prompt", "a", "--max-new-tokens", "10", "--stream", "--no-stop"]) == 0
    assert capsys.readouterr().out.startswith("a")
    assert main(["eval", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert result["bits_per_char"] > 0
    assert main(["score", str(run_dir), "--text", "the cat", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["logprob"] == pytest.approx(sum(t["logprob"] for t in score["per_token"]))
    assert score["logprob"] < 0 and len(score["per_token"]) == 7
    assert main(["tokenize", "héllo", "--price-per-1k", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "tokens: 6" in out and "cost" in out  # byte-level: é is two bytes
    assert main(["tokenize", "--tokenizer", str(run_dir), "the"]) == 0
    assert "tokens: 3" in capsys.readouterr().out
    (run_dir / "loss.png").unlink()
    assert main(["plot", str(run_dir)]) == 0 and (run_dir / "loss.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["params", "gpt3-175b", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert abs(params["params"] / 175e9 - 1) < 0.01


def test_bad_config_errors(capsys, small_corpus, tmp_path):
    fails(capsys, ["train", "tiny", "optim.lrr=1e-3", "--workdir", str(tmp_path / "a")], "did you mean optim.lr")
    fails(capsys, ["train", "tiny", "model.n_layers=two", "--workdir", str(tmp_path / "a")], "model.n_layers",
          "integer")
    fails(capsys, ["train", "tiny", "model.norm=middle", "--workdir", str(tmp_path / "a")], "pre | post")
    fails(capsys, ["train", "tinny", "--workdir", str(tmp_path / "a")], "did you mean tiny")
    assert not (tmp_path / "a").exists()


def test_bad_data_errors(capsys, tmp_path):
    fails(capsys, ["train", "tiny", f"data.path={tmp_path / 'missing.txt'}", "--workdir", str(tmp_path / "r")],
          "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    fails(capsys, ["train", "tiny", f"data.path={empty}", "--workdir", str(tmp_path / "r")], "no text")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words of text here.")
    fails(capsys, ["train", "tiny", f"data.path={short}", "--workdir", str(tmp_path / "r")], "context")
    assert not (tmp_path / "r").exists()


def test_incompatible_resume_leaves_the_run_untouched(capsys, run_dir, small_corpus):
    before = tree_digest(run_dir)
    base = ["train", "tiny", f"data.path={small_corpus}", "--workdir", str(run_dir)]
    fails(capsys, base + ["model.d_model=64"], "model.d_model=32")
    fails(capsys, base + ["data.tokenizer=byte"], "data.tokenizer=char")
    fails(capsys, base + ["optim.name=sgd"], "different experiment", "optim.name 'adamw' → 'sgd'")
    # Allowed as a change of experiment, a different optimizer state still cannot be restored.
    fails(capsys, base + ["optim.name=sgd", "--allow-changed", "optim.name"], "does not fit", "opt_state")
    assert tree_digest(run_dir) == before


def test_sampling_errors(capsys, run_dir):
    fails(capsys, ["sample", str(run_dir), "--top-p", "1.5"], "--top-p")
    fails(capsys, ["sample", str(run_dir), "--temperature", "-1"], "--temperature")
    fails(capsys, ["sample", str(run_dir), "--prompt", "x" * 100], "context is 32")
    fails(capsys, ["score", str(run_dir), "--text", "x" * 100], "context is 32")
    fails(capsys, ["sample", str(run_dir / "nope")], "does not exist")
    fails(capsys, ["sample", str(run_dir / "checkpoints")], "not a run directory (no config.json)")
    fails(capsys, ["sample", str(run_dir), "--show-probs", "-1"], "--show-probs")


def test_more_config_errors(capsys, tmp_path, small_corpus):
    base = ["train", "tiny", f"data.path={small_corpus}"]
    fails(capsys, base + ["train.checkpoint_every=0", "--workdir", str(tmp_path / "a")], "train.checkpoint_every")
    fails(capsys, base + ["train.log_every=0", "--workdir", str(tmp_path / "a")], "train.log_every")
    (tmp_path / "file").write_text("x")
    fails(capsys, base + ["--workdir", str(tmp_path / "file")], "is a file")
    assert not (tmp_path / "a").exists()


def test_offline_download_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setitem(corpora.DOWNLOADS, "tinyshakespeare", ("http://127.0.0.1:9/input.txt", None))
    with pytest.raises(corpora.UserError, match="cannot download tinyshakespeare"):
        corpora.download("tinyshakespeare", tmp_path)
    assert not list((tmp_path / "corpora").glob("*"))
    cached = tmp_path / "corpora" / "tinyshakespeare.txt"
    cached.write_text("already here")
    assert corpora.download("tinyshakespeare", tmp_path) == cached


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "plutao.experiments", "train", "tiny", "model.d_modle=8",
                             "--workdir", str(tmp_path / "x")], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "plutao: error: unknown config key 'model.d_modle'; did you mean model.d_model?"


READ_ONLY = {"sample": [], "eval": [], "score": ["--text", "the"], "translate": ["a cat"], "fill-mask": ["a <mask>"],
             "attention": ["--text", "the"], "neighbors": ["e"], "analogy": ["a", "b", "c"]}


@pytest.mark.parametrize("command", sorted(READ_ONLY))
def test_a_missing_run_dir_and_a_folder_that_is_no_run_get_different_errors(capsys, tmp_path, command):
    missing = tmp_path / "nope"
    err = fails(capsys, [command, str(missing), *READ_ONLY[command]], f"{missing} does not exist",
                "--workdir of a `plutao train` run")
    assert "no config.json" not in err
    (tmp_path / "folder").mkdir()
    err = fails(capsys, [command, str(tmp_path / "folder"), *READ_ONLY[command]],
                f"{tmp_path / 'folder'} is not a run directory (no config.json)")
    assert "does not exist" not in err
    assert not missing.exists()


def test_eval_data_errors_name_the_data_flag(capsys, run_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    err = fails(capsys, ["eval", str(run_dir), "--data", str(empty)], f"--data {str(empty)!r} contains no text",
                "point --data at")
    assert "data.path" not in err
    err = fails(capsys, ["eval", str(run_dir), "--data", str(tmp_path / "missing.txt")], "--data", "does not exist")
    assert "data.path" not in err
    (tmp_path / "folder").mkdir()
    err = fails(capsys, ["eval", str(run_dir), "--data", str(tmp_path / "folder")], "--data folder")
    assert "data.path" not in err


def test_read_pairs_names_the_flag_it_is_given(tmp_path):
    from plutao.train.config.errors import UserError
    from plutao.train.data.pairs import read_pairs

    with pytest.raises(UserError, match=r"^--data '.*missing\.tsv' does not exist"):
        read_pairs(str(tmp_path / "missing.tsv"), flag="--data")
    with pytest.raises(UserError, match=r"^data\.path '.*missing\.tsv' does not exist"):
        read_pairs(str(tmp_path / "missing.tsv"))


def test_sample_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for default in ("default: 0.8", "default: 300", "default: 1.0", "default: latest"):
        assert default in out, out
    assert "default: None" not in out and "default: False" not in out


def test_gitignore_covers_the_readme_sweep_folders():
    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().splitlines()
    assert "/sweeps/" in ignored or "sweeps/" in ignored
