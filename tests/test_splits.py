"""The held-out split is made on text, before a tokenizer exists: the tokenizer never sees held-out text."""

import json

from plutao.experiments.cli import main
from plutao.tokenizer import load_tokenizer
from plutao.train.data.sources import split_documents


def test_split_documents_cuts_the_characters_where_val_fraction_says():
    docs = ["aaaa", "bbbbbb", "cc"]  # 12 characters: 9 train, 3 held out, the cut inside the second document
    train, val = split_documents(docs, 0.25)
    assert train == ["aaaa", "bbbbb"] and val == ["b", "cc"]
    assert split_documents(docs, 0.5) == (["aaaa", "bb"], ["bbbb", "cc"])
    assert split_documents(["abcd"], 0.5) == (["ab"], ["cd"])
    assert split_documents(["ab", "cd"], 0.5) == (["ab"], ["cd"])  # a cut between documents splits none


def test_a_character_only_in_the_held_out_text_is_not_in_the_vocabulary(tmp_path, capsys, small_corpus):
    text = small_corpus.read_text()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text + "\n" + "§" * 40)  # only in the last 10%
    run = tmp_path / "run"
    argv = ["train", "tiny", f"data.path={corpus}", "--workdir", str(run), "--quiet", "train.steps=10",
            "train.eval_every=5", "train.checkpoint_every=10", "train.peak_flops=1e11"]
    assert main(argv) == 0
    tokenizer = load_tokenizer(run / "tokenizer")
    assert "§" not in "".join(tokenizer.token_strings(list(range(tokenizer.vocab_size))))
    assert "x" in "".join(tokenizer.token_strings(list(range(tokenizer.vocab_size))))
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # the held-out '§' are <unk>: scored, not an error
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 40
