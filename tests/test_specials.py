"""Tests for tokenizer-declared special tokens: specials anywhere in the vocabulary (here at its end),
the ordinary-id mask, persistence of the declaration, and folders saved before declarations existed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from plutao.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    SpecialTokens,
    Tokenizer,
    TokenizerError,
    WordTokenizer,
    load_tokenizer,
)

K = len(SPECIAL_TOKENS)
HISTORICAL = {name: i for i, name in enumerate(SPECIAL_TOKENS)}

CORPUS = """\
the quick brown fox jumps over the lazy dog
the dog sleeps and the fox runs on
café naïve résumé: accented letters, digits 12345 and tabs\tare text too
she sells sea shells by the sea shore
literal special strings are text: <|endoftext|> <pad>
"""
TEXT = "the fox runs over the dog\nthe sea shore"
BPE_VOCAB = 330

# Fingerprints and ids of tokenizers as the code before declared specials computed and saved them. Run
# directories record fingerprints and refuse a mismatch, so these must never change.
OLD_CHAR_FINGERPRINT = "93749c30c8b2053d65f6d70d45a6fbd59192af3b746207302d8553124a2c43b8"  # chars a, b, c
OLD_WORD_FINGERPRINT = "310da62607a23dd8292cd12edd709596fbe6e27df875e0eee951a23b705de630"  # the, cat, sat
OLD_BYTE_FINGERPRINT = "ee0dab051ee60ddb9e76b2d09a744b87045e69b61ffb39bdd3d7bb523b4aab3d"


def one_line(exc: pytest.ExceptionInfo[TokenizerError]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and "\r" not in msg
    return msg


def at_end(vocab_size: int) -> dict[str, int]:
    """The usual specials, in their usual order, at ids vocab_size-K .. vocab_size-1."""
    return {name: vocab_size - K + i for i, name in enumerate(SPECIAL_TOKENS)}


def old_fingerprint(kind: str, vocab_size: int, definition: bytes) -> str:
    """The fingerprint formula of the code before declared specials (specials fixed at 0..10)."""
    header = json.dumps({"kind": kind, "vocab_size": vocab_size, "special_ids": HISTORICAL}, sort_keys=True)
    h = hashlib.sha256(header.encode("utf-8"))
    h.update(b"\0")
    h.update(definition)
    return h.hexdigest()


def bpe_with_specials_at_end(model: bytes) -> bytes:
    """The same sentencepiece model with its K special pieces moved to the end of the vocabulary, as an
    imported model might have them; every other piece keeps its order (and so moves down by K ids)."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    pieces = list(proto.pieces)
    assert [p.piece for p in pieces[:K]] == list(SPECIAL_TOKENS)
    del proto.pieces[:]
    proto.pieces.extend(pieces[K:] + pieces[:K])
    n = len(pieces)
    for role, name in (("pad", "<pad>"), ("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>")):
        setattr(proto.trainer_spec, f"{role}_id", n - K + HISTORICAL[name])
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def historical() -> dict[str, Tokenizer]:
    """One tokenizer of each kind in the historical layout (specials at 0..10)."""
    return {
        "char": CharTokenizer.train([CORPUS]),
        "byte": ByteTokenizer(),
        "word": WordTokenizer.train([CORPUS]),
        "bpe": BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB),
    }


@pytest.fixture(scope="module")
def at_the_end(historical: dict[str, Tokenizer]) -> dict[str, Tokenizer]:
    """The same vocabularies with the specials declared at the end instead."""
    old = historical
    char, word, bpe = old["char"], old["word"], old["bpe"]
    assert (
        isinstance(char, CharTokenizer) and isinstance(word, WordTokenizer) and isinstance(bpe, BPETokenizer)
    )
    return {
        "char": CharTokenizer.train([CORPUS], specials=at_end(char.vocab_size)),
        "byte": ByteTokenizer(specials=at_end(old["byte"].vocab_size)),
        "word": WordTokenizer.train([CORPUS], specials=at_end(word.vocab_size)),
        "bpe": BPETokenizer(bpe_with_specials_at_end(bpe.model_bytes), specials=at_end(bpe.vocab_size)),
    }


KINDS = ["char", "byte", "word", "bpe"]


# ---- the historical layout --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_historical_layout_is_the_default(historical: dict[str, Tokenizer], kind: str) -> None:
    tok = historical[kind]
    v = tok.vocab_size
    assert tok.specials == HISTORICAL == tok.special_ids
    assert tok.sorted_special_ids == tuple(range(K))
    assert tok.special_tokens == SpecialTokens.historical()
    assert tok.special_roles["eot"] == "<|endoftext|>" and tok.special_roles["assistant"] == "<|assistant|>"
    assert [tok.system_id, tok.user_id, tok.assistant_id, tok.end_id] == [7, 8, 9, 10]
    assert tok.special_id("user") == tok.special_id("<|user|>") == 8
    assert tok.ordinary_ids.tolist() == list(range(K, v))
    assert tok.ordinary_mask(v + 5).tolist() == [False] * K + [True] * (v - K) + [False] * 5


# ---- specials at the end of the vocabulary ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_specials_at_end_ids_and_mask(at_the_end: dict[str, Tokenizer], kind: str) -> None:
    tok = at_the_end[kind]
    v = tok.vocab_size
    assert tok.specials == at_end(v)
    assert tok.sorted_special_ids == tuple(range(v - K, v))
    named = [tok.pad_id, tok.eot_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id, tok.reward_id]
    assert named == [v - K + i for i in range(7)]
    assert tok.end_id == v - 1
    assert tok.ordinary_ids.tolist() == list(range(v - K))
    padded = tok.ordinary_mask(v + 3)
    assert padded.dtype == bool and padded.shape == (v + 3,)
    assert padded.tolist() == [True] * (v - K) + [False] * (K + 3)
    assert tok.ordinary_mask().tolist() == padded[:v].tolist()
    assert (
        tok.is_special(v - 1) and not tok.is_special(0) and not tok.is_special(v) and not tok.is_special(-1)
    )
    ids_2d = np.array([[0, v - K], [v - 1, v + 7]])
    assert tok.is_special(ids_2d).tolist() == [[False, True], [True, False]]
    with pytest.raises(TokenizerError) as e:
        tok.ordinary_mask(v - 1)
    one_line(e)


@pytest.mark.parametrize("kind", KINDS)
def test_specials_at_end_encode_decode(
    historical: dict[str, Tokenizer], at_the_end: dict[str, Tokenizer], kind: str
) -> None:
    old, tok = historical[kind], at_the_end[kind]
    v = tok.vocab_size
    ids = tok.encode(TEXT)
    # Same vocabulary in the same order: every ordinary id moves down by the K specials that left the front,
    # and a special (the word tokenizer's <eos> for the newline) moves to the end.
    assert ids == [i - K if i >= K else v - K + i for i in old.encode(TEXT)]
    assert tok.eos_id in ids if kind == "word" else max(ids) < v - K
    assert tok.encode_array(TEXT).tolist() == ids and tok.encode_array(TEXT).dtype == np.int32
    assert tok.decode(ids) == old.decode(old.encode(TEXT))
    # Literal special strings are ordinary text.
    literal = tok.encode("<|endoftext|> <pad>")
    assert not tok.is_special(np.asarray(literal)).any()
    assert tok.decode(literal) == ("<|endoftext|> <pad>")

    fox, dog = tok.encode("the fox"), tok.encode("the dog")
    seq = [tok.bos_id, *fox, tok.eot_id, *dog, tok.pad_id]
    if kind == "word":  # a word tokenizer joins words (and specials) with spaces
        assert tok.decode(seq) == "<bos> the fox <|endoftext|> the dog <pad>"
        assert tok.decode(seq, skip_special=True) == "the fox the dog"
        # <eos> and <unk> stand for text (a line end, an unknown word) and survive skip_special.
        assert tok.decode([*fox, tok.eos_id, tok.unk_id], skip_special=True) == "the fox\n<unk>"
        assert tok.encode("the zebra\n") == [tok.encode("the")[0], tok.unk_id, tok.eos_id]
    else:
        assert tok.decode(seq) == "<bos>the fox<|endoftext|>the dog<pad>"
        assert tok.decode(seq, skip_special=True) == "the foxthe dog"
    assert tok.token_strings([v - K, v - 1]) == ["<pad>", "<|end|>"]
    assert tok.token_strings(ids) == old.token_strings(old.encode(TEXT))
    if isinstance(tok, ByteTokenizer):
        assert tok.encode_bytes(b"\x00\xff") == [0, 255]
        assert tok.decode_bytes([tok.eot_id, 0, 255]) == b"<|endoftext|>\x00\xff"
        assert tok.decode_bytes([tok.eot_id, 0, 255], skip_special=True) == b"\x00\xff"
    if isinstance(tok, CharTokenizer):
        assert tok.encode_unseen("the 😀").tolist() == [*tok.encode("the "), tok.unk_id]


@pytest.mark.parametrize("kind", KINDS)
def test_specials_at_end_save_load(
    historical: dict[str, Tokenizer], at_the_end: dict[str, Tokenizer], kind: str, tmp_path: Path
) -> None:
    tok = at_the_end[kind]
    assert tok.fingerprint != historical[kind].fingerprint
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert config["special_ids"] == at_end(tok.vocab_size)
    assert config["special_roles"] == tok.special_roles
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok)
    assert loaded.specials == tok.specials and loaded.special_roles == tok.special_roles
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.ordinary_mask(tok.vocab_size + 2).tolist() == tok.ordinary_mask(tok.vocab_size + 2).tolist()


# ---- other token strings, shared roles --------------------------------------------------------------


def test_gpt2_style_single_special_with_shared_roles(tmp_path: Path) -> None:
    chars = sorted(set(CORPUS))
    v = len(chars) + 1
    declared = SpecialTokens({"<|endoftext|>": v - 1}, roles={"bos": "<|endoftext|>", "eos": "<|endoftext|>"})
    tok = CharTokenizer(chars, specials=declared)
    assert tok.vocab_size == v and tok.eot_id == tok.bos_id == tok.eos_id == v - 1
    assert tok.ordinary_mask().tolist() == [True] * (v - 1) + [False]
    assert tok.decode([*tok.encode("the dog"), tok.eos_id], skip_special=True) == "the dog"
    with pytest.raises(TokenizerError) as e:
        _ = tok.pad_id
    msg = one_line(e)
    assert "'pad'" in msg and "<|endoftext|>" in msg
    # Roles are part of what a tokenizer means, so they enter the fingerprint (unless they are defaults).
    plain = CharTokenizer(chars, specials={"<|endoftext|>": v - 1})
    assert plain.fingerprint != tok.fingerprint
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.special_roles == tok.special_roles and loaded.fingerprint == tok.fingerprint


def test_word_tokenizer_with_its_own_unk_and_eos_strings() -> None:
    words = ["the", "dog", "<unk>"]  # with another unk string, "<unk>" is an ordinary word
    declared = SpecialTokens({"[UNK]": 3, "</s>": 4}, roles={"unk": "[UNK]", "eos": "</s>"})
    tok = WordTokenizer(words, specials=declared)
    assert tok.encode("the zebra <unk>\ndog") == [0, 3, 2, 4, 1]
    assert tok.decode([0, 3, 4, 1]) == "the [UNK]\ndog"
    assert tok.ordinary_mask(6).tolist() == [True, True, True, False, False, False]
    with pytest.raises(TokenizerError) as e:
        WordTokenizer(words, specials={"[UNK]": 3})
    assert "eos" in one_line(e)


# ---- folders saved before declarations existed ------------------------------------------------------


def write_old_folder(path: Path, kind: str, vocab_size: int, fingerprint: str, **fields: object) -> None:
    """tokenizer.json exactly as the code before declared specials wrote it."""
    path.mkdir(parents=True)
    config = {
        "format_version": 1,
        "kind": kind,
        "vocab_size": vocab_size,
        "special_ids": HISTORICAL,
        "fingerprint": fingerprint,
        **fields,
    }
    (path / "tokenizer.json").write_text(json.dumps(config, indent=1) + "\n")


def test_old_folders_load_with_the_same_ids_and_fingerprints(tmp_path: Path) -> None:
    write_old_folder(tmp_path / "char", "char", K + 3, OLD_CHAR_FINGERPRINT, chars=["a", "b", "c"])
    write_old_folder(tmp_path / "word", "word", K + 3, OLD_WORD_FINGERPRINT, words=["the", "cat", "sat"])
    write_old_folder(tmp_path / "byte", "byte", K + 256, OLD_BYTE_FINGERPRINT)
    char, word, byte = (load_tokenizer(tmp_path / k) for k in ("char", "word", "byte"))
    assert char.fingerprint == OLD_CHAR_FINGERPRINT and char.encode("cab") == [13, 11, 12]
    assert word.fingerprint == OLD_WORD_FINGERPRINT and word.encode("the sat cat\n") == [11, 13, 12, 3]
    assert byte.fingerprint == OLD_BYTE_FINGERPRINT and byte.encode("A") == [K + 65]
    for tok in (char, word, byte):
        assert tok.specials == HISTORICAL and tok.special_tokens == SpecialTokens.historical()
    # Trained today with the default layout, the same vocabularies give the same fingerprints.
    assert CharTokenizer.train(["cab"]).fingerprint == OLD_CHAR_FINGERPRINT
    assert WordTokenizer(["the", "cat", "sat"]).fingerprint == OLD_WORD_FINGERPRINT
    assert ByteTokenizer().fingerprint == OLD_BYTE_FINGERPRINT


def test_old_bpe_folder_loads_with_the_same_fingerprint(
    historical: dict[str, Tokenizer], tmp_path: Path
) -> None:
    bpe = historical["bpe"]
    assert isinstance(bpe, BPETokenizer)
    fingerprint = old_fingerprint("bpe", bpe.vocab_size, bpe.model_bytes)
    assert bpe.fingerprint == fingerprint
    write_old_folder(tmp_path / "bpe", "bpe", bpe.vocab_size, fingerprint, model_file="bpe.model")
    (tmp_path / "bpe" / "bpe.model").write_bytes(bpe.model_bytes)
    loaded = load_tokenizer(tmp_path / "bpe")
    assert loaded.fingerprint == fingerprint and loaded.specials == HISTORICAL
    assert loaded.encode(TEXT) == bpe.encode(TEXT)


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_formula_unchanged_for_historical_layout(
    historical: dict[str, Tokenizer], kind: str
) -> None:
    tok = historical[kind]
    assert tok.fingerprint == old_fingerprint(kind, tok.vocab_size, tok._definition_bytes())


def test_folder_without_any_special_ids_gets_the_historical_layout(tmp_path: Path) -> None:
    path = tmp_path / "char"
    path.mkdir()
    config = {"format_version": 1, "kind": "char", "chars": ["a", "b", "c"]}
    (path / "tokenizer.json").write_text(json.dumps(config))
    tok = load_tokenizer(path)
    assert tok.specials == HISTORICAL and tok.fingerprint == OLD_CHAR_FINGERPRINT


# ---- errors -------------------------------------------------------------------------------------------


def test_unknown_special_names_are_one_line_errors(historical: dict[str, Tokenizer]) -> None:
    tok = historical["char"]
    for name in ("<|bogus|>", "bogus", ""):
        with pytest.raises(TokenizerError) as e:
            tok.special_id(name)
        msg = one_line(e)
        assert repr(name) in msg and "<|endoftext|>" in msg
        assert not tok.has_special(name)
    assert tok.has_special("user") and tok.has_special("<|user|>")
    no_mask = CharTokenizer(["a", "b"], specials={"<pad>": 2, "<unk>": 3})
    with pytest.raises(TokenizerError) as e:
        _ = no_mask.mask_id
    assert "'mask'" in one_line(e)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SpecialTokens({"<pad>": 0, "<eos>": 0}),  # two tokens, one id
        lambda: SpecialTokens({"<pad>": -1}),
        lambda: SpecialTokens({"<pad>": 1.5}),  # type: ignore[dict-item]
        lambda: SpecialTokens({"": 0}),
        lambda: SpecialTokens({"<pad>": 0}, roles={"eos": "</s>"}),  # a role for an undeclared token
        lambda: CharTokenizer(["a", "b"], specials={"<pad>": 5}),  # outside the vocabulary
        lambda: ByteTokenizer(specials={"<pad>": 0, "<eos>": 300}),
        lambda: WordTokenizer(["a"], specials={"<pad>": 1}),  # no eos / unk
        lambda: BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB, specials=at_end(BPE_VOCAB)),
        lambda: BPETokenizer.train([CORPUS], vocab_size=BPE_VOCAB, specials={"<pad>": 0}),  # no unk
    ],
)
def test_bad_declarations_are_one_line_errors(make) -> None:
    with pytest.raises(TokenizerError) as e:
        make()
    one_line(e)


def test_bpe_model_must_hold_the_declared_specials(historical: dict[str, Tokenizer]) -> None:
    bpe = historical["bpe"]
    assert isinstance(bpe, BPETokenizer)
    with pytest.raises(TokenizerError) as e:  # the pieces are at 0..10, not at the end
        BPETokenizer(bpe.model_bytes, specials=at_end(bpe.vocab_size))
    assert "reserve" in one_line(e)
    with pytest.raises(TokenizerError) as e:  # the newline piece is text, not a special
        BPETokenizer(bpe.model_bytes, specials={**HISTORICAL, "\n": K})
    assert "control" in one_line(e)


def test_malformed_declaration_in_folder_is_one_line_error(
    historical: dict[str, Tokenizer], tmp_path: Path
) -> None:
    historical["char"].save(tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.json"
    config = json.loads(path.read_text())
    for bad in ([1, 2], {"<pad>": "zero"}, {"<pad>": 0, "<eos>": 0}):
        config["special_ids"] = bad
        path.write_text(json.dumps(config))
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(tmp_path / "tok")
        one_line(e)
