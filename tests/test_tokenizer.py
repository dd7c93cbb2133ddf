"""Tests for plutao.tokenizer: round trips (property-based), specials, persistence, errors, viewer."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from plutao.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    TokenizerError,
    format_tokens,
    load_tokenizer,
    train_tokenizer,
)
from plutao.tokenizer import bpe as bpe_module

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs on.
In the beginning there was text, and the text was tokenized into pieces.
Numbers like 12345 and 2024-06-01 appear, as do prices: $3.50, 42%, and 7 * 6 = 42.
Café, naïve, résumé, façade: accented letters are common in borrowed words.

def tokenize(text):
    pieces = []
    for word in text.split():
        pieces.append(word)
    return pieces

Paragraphs are separated by blank lines.	Tabs	appear	too.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
"""
BPE_VOCAB = 400

# Text pieces that stress exact round trips: whitespace runs, newlines, tabs, CR, emoji, sentencepiece's
# own space symbol, literal special-token strings, combining marks, NUL.
TRICKY = [
    " ",
    "  ",
    "    ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "\u2581",
    "\u2581\u2581",
    " \u2581 ",
    "😀",
    "👍🏽",
    "e\u0301",
    "\x00",
    "<|endoftext|>",
    "<pad>",
    "<unk>",
    "<|user|>",
    "the ",
    " the",
    "ﬁ",
    "Å",
    "Ω",
    "１２３",
    "\u3000",
]
tricky_text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(TRICKY)), max_size=25).map("".join)


def one_line(exc: pytest.ExceptionInfo[TokenizerError]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and "\r" not in msg
    return msg


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train([CORPUS, "".join(SPECIAL_TOKENS)])


@pytest.fixture(scope="module")
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    return BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB)


@pytest.fixture(params=["char", "byte", "bpe"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


# ---- specials ---------------------------------------------------------------------------------------


def test_specials_reserved_with_distinct_ids(tok: Tokenizer) -> None:
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
    assert all(0 <= i < tok.vocab_size for i in tok.special_ids.values())
    named = [tok.pad_id, tok.eot_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id, tok.reward_id]
    names = ["<pad>", "<|endoftext|>", "<bos>", "<eos>", "<unk>", "<mask>", "<|reward|>"]
    assert named == [tok.special_ids[n] for n in names]
    assert tok.token_strings(list(tok.special_ids.values())) == list(SPECIAL_TOKENS)


def test_decode_renders_or_skips_specials(tok: Tokenizer) -> None:
    ids = [tok.bos_id, *tok.encode("the fox"), tok.eot_id, *tok.encode("the dog"), tok.eos_id]
    assert tok.decode(ids) == "<bos>the fox<|endoftext|>the dog<eos>"
    assert tok.decode(ids, skip_special=True) == "the foxthe dog"
    assert tok.decode(list(tok.special_ids.values())) == "".join(SPECIAL_TOKENS)
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == tok.decode(ids)


def test_literal_special_strings_are_plain_text(tok: Tokenizer) -> None:
    text = "".join(SPECIAL_TOKENS)
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == text


# ---- round trips --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_char_round_trip(char_tok: CharTokenizer, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=st.sampled_from(char_tok.chars)))
    ids = char_tok.encode(text)
    assert char_tok.decode(ids) == text
    assert char_tok.encode_array(text).tolist() == ids
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)


@settings(max_examples=200, deadline=None)
@given(data=st.binary())
def test_byte_round_trip_bytes(byte_tok: ByteTokenizer, data: bytes) -> None:
    ids = byte_tok.encode_bytes(data)
    assert len(ids) == len(data)
    assert byte_tok.decode_bytes(ids) == data


@settings(max_examples=200, deadline=None)
@given(text=tricky_text)
def test_byte_round_trip_text(byte_tok: ByteTokenizer, text: str) -> None:
    ids = byte_tok.encode(text)
    assert byte_tok.decode(ids) == text
    assert byte_tok.encode_array(text).tolist() == ids
    assert not set(ids) & set(byte_tok.special_ids.values())


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), tricky_text))
def test_bpe_round_trip(bpe_tok: BPETokenizer, text: str) -> None:
    ids = bpe_tok.encode(text)
    assert bpe_tok.decode(ids) == text
    assert not set(ids) & set(bpe_tok.special_ids.values())
    # Tiny blocks and segments exercise every cut point; the result must not depend on them.
    with mock.patch.object(bpe_module, "_BLOCK_CHARS", 7), mock.patch.object(bpe_module, "_MAX_SEGMENT", 5):
        assert bpe_tok.encode_array(text).tolist() == ids
        assert bpe_tok.encode(text) == ids
    if "\u2581" not in text:
        # Our segmentation must agree with sentencepiece run on the whole string.
        raw = spm.SentencePieceProcessor(model_proto=bpe_tok.model_bytes)
        assert raw.encode(text) == ids


def test_bpe_literal_endoftext_is_not_special(bpe_tok: BPETokenizer) -> None:
    ids = bpe_tok.encode("a<|endoftext|>b")
    assert bpe_tok.eot_id not in ids
    assert bpe_tok.decode(ids) == "a<|endoftext|>b"


def test_bpe_keeps_whitespace(bpe_tok: BPETokenizer) -> None:
    text = "  two leading\n\n\ttab\r\nCRLF   trailing   \n\u2581 literal"
    assert bpe_tok.decode(bpe_tok.encode(text)) == text
    assert bpe_tok.encode("\n") == [bpe_tok.encode("a\n")[-1]]  # newline is one atomic piece


def test_byte_decode_invalid_utf8_replaces(byte_tok: ByteTokenizer) -> None:
    ids = byte_tok.encode_bytes(b"ok\xe2\x82 \xff")
    assert byte_tok.decode(ids) == "ok\ufffd \ufffd"


# ---- encode_array ----------------------------------------------------------------------------------


def test_encode_array_matches_encode(tok: Tokenizer) -> None:
    arr = tok.encode_array(CORPUS)
    assert arr.dtype == np.int32 and arr.ndim == 1
    assert arr.tolist() == tok.encode(CORPUS)
    assert tok.encode_array("").shape == (0,) and tok.encode("") == []


def test_bpe_encode_array_multi_paragraph(bpe_tok: BPETokenizer) -> None:
    paragraphs = [CORPUS, "no newline at all " * 40, "x" * 300, "\n\n\n", "   indented\n" * 5, "\u2581" * 3]
    text = "\n\n".join(paragraphs * 3)
    ids = bpe_tok.encode(text)
    for block, segment in [(64, 16), (1000, 50), (1 << 20, 1 << 14)]:
        with (
            mock.patch.object(bpe_module, "_BLOCK_CHARS", block),
            mock.patch.object(bpe_module, "_MAX_SEGMENT", segment),
        ):
            arr = bpe_tok.encode_array(text)
        assert arr.dtype == np.int32
        assert arr.tolist() == ids
    assert bpe_tok.decode(ids) == text


# ---- token strings and viewer ---------------------------------------------------------------------


def test_token_strings(char_tok: CharTokenizer, byte_tok: ByteTokenizer, bpe_tok: BPETokenizer) -> None:
    assert char_tok.token_strings(char_tok.encode("fox")) == ["f", "o", "x"]
    assert byte_tok.token_strings(byte_tok.encode("a€\n")) == ["a", "\\xe2", "\\x82", "\\xac", "\\x0a"]
    text = "the quick brown fox"
    pieces = bpe_tok.token_strings(bpe_tok.encode(text))
    assert "".join(pieces).replace("\u2581", " ") == text
    assert len(pieces) < len(text)
    assert bpe_tok.token_strings(bpe_tok.encode("€")) == ["\\xe2", "\\x82", "\\xac"]


def test_format_tokens(byte_tok: ByteTokenizer, bpe_tok: BPETokenizer) -> None:
    out = format_tokens(byte_tok, "hello", price_per_1k=0.002)
    lines = out.splitlines()
    assert lines[0].split() == ["index", "id", "token"]
    assert lines[1].split() == ["0", str(byte_tok.encode("h")[0]), "'h'"]
    assert "tokens: 5" in lines[-2] and "chars/token: 1.00" in lines[-2]
    assert lines[-1] == "cost: $0.000010 at $0.002 per 1k tokens"
    text = "a\nb\tc  \u2581"
    out = format_tokens(bpe_tok, text)
    n = len(bpe_tok.encode(text))
    assert len(out.splitlines()) == n + 2  # header + one row per token + count line, no cost line
    assert "cost" not in out
    assert format_tokens(bpe_tok, "").splitlines()[-1].startswith("tokens: 0")
    with pytest.raises(TokenizerError) as e:
        format_tokens(bpe_tok, "x", price_per_1k=-1)
    one_line(e)


# ---- persistence --------------------------------------------------------------------------------------


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert config["kind"] == tok.kind and config["vocab_size"] == tok.vocab_size
    assert config["special_ids"] == tok.special_ids
    if tok.kind == "bpe":
        assert (tmp_path / "tok" / "bpe.model").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok)
    assert loaded.fingerprint == tok.fingerprint and len(tok.fingerprint) == 64
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(CORPUS) == tok.encode(CORPUS)
    assert loaded.decode(tok.encode(CORPUS)) == CORPUS


def test_fingerprints_differ(char_tok: CharTokenizer, byte_tok: ByteTokenizer, bpe_tok: BPETokenizer) -> None:
    other_char = CharTokenizer.train(["abc"])
    other_bpe = BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB - 20)
    prints = {t.fingerprint for t in (char_tok, byte_tok, bpe_tok, other_char, other_bpe)}
    assert len(prints) == 5
    assert CharTokenizer.train(["cab"]).fingerprint == other_char.fingerprint
    assert ByteTokenizer().fingerprint == byte_tok.fingerprint
    assert (
        BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB).fingerprint == bpe_tok.fingerprint
    )  # deterministic


def test_train_tokenizer_dispatch() -> None:
    assert isinstance(train_tokenizer("char", [CORPUS]), CharTokenizer)
    assert isinstance(train_tokenizer("byte", []), ByteTokenizer)
    assert (
        train_tokenizer("char", CORPUS).chars == CharTokenizer.train([CORPUS]).chars
    )  # a lone str is one text
    bpe = train_tokenizer("bpe", CORPUS, vocab_size=350)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 350


# ---- errors ---------------------------------------------------------------------------------------------


def test_char_unknown_character_error(char_tok: CharTokenizer) -> None:
    for encode in (char_tok.encode, char_tok.encode_array):
        with pytest.raises(TokenizerError) as e:
            encode("fox 😀 and \x07")
        msg = one_line(e)
        assert "'😀'" in msg and "'\\x07'" in msg and "byte" in msg and "bpe" in msg


def test_bpe_vocab_size_errors() -> None:
    with pytest.raises(TokenizerError) as e:
        BPETokenizer.train(["tiny corpus, tiny corpus"], vocab_size=5000)
    msg = one_line(e)
    assert "<=" in msg and "data.vocab_size" in msg
    most = int(msg.split("<= ")[1].split()[0])
    assert BPETokenizer.train(["tiny corpus, tiny corpus"], vocab_size=most).vocab_size == most
    with pytest.raises(TokenizerError) as e:
        BPETokenizer.train([CORPUS], vocab_size=100)
    assert ">=" in one_line(e)
    with pytest.raises(TokenizerError) as e:
        BPETokenizer.train(["", "\n"], vocab_size=300)
    one_line(e)


def test_train_tokenizer_errors() -> None:
    with pytest.raises(TokenizerError) as e:
        train_tokenizer("wordpiece", [CORPUS])
    msg = one_line(e)
    assert "char" in msg and "byte" in msg and "bpe" in msg
    with pytest.raises(TokenizerError) as e:
        train_tokenizer("bpe", [CORPUS])
    assert "vocab_size" in one_line(e)
    with pytest.raises(TokenizerError) as e:
        train_tokenizer("char", [""])
    one_line(e)


def test_load_errors(bpe_tok: BPETokenizer, char_tok: CharTokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "missing")
    assert "tokenizer" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "empty")
    assert "tokenizer.json" in one_line(e)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(bad)
    one_line(e)

    bpe_tok.save(tmp_path / "bpe")
    (tmp_path / "bpe" / "bpe.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "bpe")
    one_line(e)
    (tmp_path / "bpe" / "bpe.model").unlink()
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "bpe")
    one_line(e)

    char_tok.save(tmp_path / "char")
    config = json.loads((tmp_path / "char" / "tokenizer.json").read_text())
    config["chars"] = config["chars"][:-1]  # vocabulary no longer matches the recorded fingerprint
    (tmp_path / "char" / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "char")
    one_line(e)


def test_decode_and_encode_input_errors(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError) as e:
        tok.decode([0, tok.vocab_size])
    assert str(tok.vocab_size) in one_line(e)
    with pytest.raises(TokenizerError) as e:
        tok.decode([-1])
    one_line(e)
    with pytest.raises(TokenizerError) as e:
        tok.decode(np.zeros((2, 2), dtype=np.int32))
    one_line(e)
    with pytest.raises(TokenizerError) as e:
        tok.encode(b"bytes")  # type: ignore[arg-type]
    one_line(e)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_unpaired_surrogate_error(kind: str, byte_tok: ByteTokenizer, bpe_tok: BPETokenizer) -> None:
    tok = byte_tok if kind == "byte" else bpe_tok
    for encode in (tok.encode, tok.encode_array):
        with pytest.raises(TokenizerError) as e:
            encode("ok \ud800 no")
        assert "surrogate" in one_line(e)


# ---- real data ----------------------------------------------------------------------------------------


def test_bpe_on_tinyshakespeare() -> None:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data not present: {SHAKESPEARE}")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    train, val = text[:split], text[split:]
    tok = train_tokenizer("bpe", [train], vocab_size=512)
    assert tok.vocab_size == 512
    ids = tok.encode_array(val)
    assert tok.decode(ids) == val
    assert ids.tolist() == tok.encode(val)
    # 268 of the 512 ids are specials, newline and byte-fallback pieces, and 64 are characters: only
    # ~180 merges remain, which give ~1.77 chars/token; a larger vocabulary passes 2.
    assert len(val) / len(ids) > 1.6
    bigger = train_tokenizer("bpe", [train], vocab_size=1024)
    assert len(val) / len(bigger.encode_array(val)) > 2.0
    char = train_tokenizer("char", [train])
    assert char.decode(char.encode_array(val)) == val
