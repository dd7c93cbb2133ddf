"""Tests for the word tokenizer: vocabulary order and cap, <unk> and <eos>, round trips, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plutao.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    TokenizerError,
    WordTokenizer,
    load_tokenizer,
    train_tokenizer,
)

NS = len(SPECIAL_TOKENS)

# Penn-Treebank-like: one sentence per line, single spaces, a leading space, "<unk>" already in the text.
CORPUS = """\
 the cat sat on the mat
 the dog sat on the log
 a <unk> saw the cat and the dog
 the end
"""
# the:7, cat/dog/on/sat:2, a/and/end/log/mat/saw:1 (ties alphabetical); "<unk>" is not a word.
EXPECTED_WORDS = ("the", "cat", "dog", "on", "sat", "a", "and", "end", "log", "mat", "saw")


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer.train([CORPUS])


def test_vocabulary_is_specials_then_words_by_frequency(tok):
    assert tok.kind == "word"
    assert tok.words == EXPECTED_WORDS
    assert tok.vocab_size == NS + len(EXPECTED_WORDS)
    assert tok.token_strings(range(tok.vocab_size)) == [*SPECIAL_TOKENS, *EXPECTED_WORDS]
    assert tok.encode("the cat") == [NS + 0, NS + 1]


def test_vocab_cap_keeps_most_frequent():
    capped = WordTokenizer.train(CORPUS, vocab_size=NS + 3)
    assert capped.words == ("the", "cat", "dog")
    assert capped.vocab_size == NS + 3
    # Dropped words are now unknown.
    assert capped.encode("the mat") == [NS, capped.unk_id]
    # A cap above the number of words keeps them all.
    assert WordTokenizer.train(CORPUS, vocab_size=10_000).words == EXPECTED_WORDS


def test_unk_mapping(tok):
    ids = tok.encode("the zebra <unk> cat")
    assert ids == [NS, tok.unk_id, tok.unk_id, NS + 1]
    assert tok.decode(ids) == "the <unk> <unk> cat"
    assert tok.token_strings(ids) == ["the", "<unk>", "<unk>", "cat"]


def test_newline_is_eos(tok):
    ids = tok.encode("the cat\n\nthe dog\n")
    eos = tok.eos_id
    assert ids == [NS, NS + 1, eos, eos, NS, NS + 2, eos]
    assert tok.decode(ids) == "the cat\n\nthe dog\n"
    assert tok.decode([eos]) == "\n"
    # Other whitespace only separates words; spaces around a newline vanish.
    assert tok.encode(" the\tcat \n  dog ") == [NS, NS + 1, eos, NS + 2]
    assert tok.decode(tok.encode(" the\tcat \n  dog ")) == "the cat\ndog"


def test_round_trip_on_normalized_text(tok):
    text = "the cat sat on the mat\na <unk> saw the dog\n\nthe end\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(tok.decode(ids)) == ids
    arr = tok.encode_array(text)
    assert arr.dtype == np.int32 and arr.tolist() == ids
    # The training text round-trips once its leading spaces are normalized away.
    assert tok.decode(tok.encode(CORPUS)) == "\n".join(line.strip() for line in CORPUS.split("\n"))


def test_skip_special_keeps_text_specials(tok):
    ids = [tok.bos_id, NS, tok.unk_id, tok.eos_id, tok.pad_id, NS + 1]
    assert tok.decode(ids) == "<bos> the <unk>\n<pad> cat"
    assert tok.decode(ids, skip_special=True) == "the <unk>\ncat"


def test_empty_and_bad_input(tok):
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.encode_array("").shape == (0,)
    with pytest.raises(TokenizerError):
        tok.encode(b"the cat")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize(
    "make",
    [
        lambda: WordTokenizer.train([" \n\t "]),
        lambda: WordTokenizer.train(["<unk> <unk>"]),
        lambda: WordTokenizer.train([CORPUS], vocab_size=NS),
        lambda: WordTokenizer.train([CORPUS], vocab_size=2.5),
        lambda: WordTokenizer(["a", "a"]),
        lambda: WordTokenizer(["a b"]),
        lambda: WordTokenizer(["<unk>"]),
        lambda: WordTokenizer([]),
    ],
)
def test_errors_are_one_line(make):
    with pytest.raises(TokenizerError) as e:
        make()
    assert "\n" not in str(e.value)


def test_factory_trains_and_registers_word():
    assert TOKENIZER_KINDS["word"] is WordTokenizer
    assert train_tokenizer("word", CORPUS).words == EXPECTED_WORDS
    assert train_tokenizer("word", [CORPUS], vocab_size=NS + 2).words == ("the", "cat")


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert config["kind"] == "word" and config["fingerprint"] == tok.fingerprint
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, WordTokenizer)
    assert back.words == tok.words and back.fingerprint == tok.fingerprint
    text = "the dog saw a cat\nthe end\n"
    assert back.encode(text) == tok.encode(text)
    # The fingerprint tracks the vocabulary, including its order.
    assert WordTokenizer(list(reversed(tok.words))).fingerprint != tok.fingerprint


def test_load_rejects_tampered_vocabulary(tok, tmp_path):
    tok.save(tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.json"
    config = json.loads(path.read_text())
    config["words"] = config["words"][::-1]
    path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="fingerprint"):
        load_tokenizer(tmp_path / "tok")
    del config["words"]
    path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="'words'"):
        load_tokenizer(tmp_path / "tok")


LINES = st.lists(st.lists(st.sampled_from(EXPECTED_WORDS + ("<unk>",)), max_size=8), max_size=6)


@settings(max_examples=200, deadline=None)
@given(LINES, st.booleans())
def test_property_round_trip_of_in_vocabulary_words(tok, lines, trailing_newline):
    text = "\n".join(" ".join(words) for words in lines) + ("\n" if trailing_newline and lines else "")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.eos_id) == text.count("\n")
    assert len(ids) == len(text.split()) + text.count("\n")
