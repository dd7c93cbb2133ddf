"""Byte-fallback BPE tokenizer on sentencepiece, configured so that any Unicode text round-trips exactly."""

from __future__ import annotations

import io
import itertools
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from .base import Tokenizer, as_text_iterable, byte_token_string, require_str, utf8, write_atomic
from .specials import SpecialTokens, TokenizerError

MODEL_FILE = "bpe.model"

# sentencepiece writes spaces as U+2581 and decodes U+2581 back to a space, so a literal U+2581 in the
# text would come back as " ". We never hand it to sentencepiece: it is encoded as its 3 UTF-8 bytes via
# the byte-fallback pieces, which decode to the literal character.
_SPACE = "\u2581"
_NEWLINE = "\n"

# encode_array works on blocks of about this many characters, so memory stays bounded on huge corpora.
_BLOCK_CHARS = 1 << 20
# Lines longer than this are encoded word by word (sentencepiece's BPE is superlinear per input string).
_MAX_SEGMENT = 1 << 14
# Training sentences stay under sentencepiece's max_sentence_length (in bytes; <= 4 bytes per char).
_TRAIN_CHUNK = 1000
_MAX_SENTENCE_BYTES = 8192

# Positions just before a space that follows a non-space. With split_by_whitespace and prefix spaces no
# learned piece contains a non-space followed by a space, so cutting there never changes the encoding.
_WORD_START = re.compile(r"(?<=[^ ])(?= )")

# The roles sentencepiece itself knows (its "meta" pieces, placed at any id we name); every other special
# is a control symbol, which the trainer puts at the lowest ids left free, in the order given.
_META_ROLES = ("pad", "bos", "eos", "unk")

_BASE_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,  # unseen characters become UTF-8 byte pieces, never <unk>
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",  # no NFKC: text must round-trip byte for byte
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_by_whitespace": True,
    "allow_whitespace_only_pieces": True,  # runs of spaces (indentation) become single pieces
    "treat_whitespace_as_suffix": False,
    "split_digits": True,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "max_sentencepiece_length": 16,
    "max_sentence_length": _MAX_SENTENCE_BYTES,
    "input_sentence_size": 1_000_000,  # sample at most this many lines: training stays seconds on big corpora
    "shuffle_input_sentence": True,
    "hard_vocab_limit": True,
    "num_threads": 2,
    # sentencepiece trains per line and drops "\n"; as a user-defined symbol it is always one atomic piece.
    "user_defined_symbols": [_NEWLINE],
    "minloglevel": 2,
}
_SEED = 0


def trainer_options(specials: SpecialTokens) -> dict[str, Any]:
    """Sentencepiece trainer options that reserve `specials`: the pad/bos/eos/unk roles as sentencepiece's
    own pieces at their declared ids (a role not declared is switched off; unk is required), every other
    special as a control symbol, in id order. The trainer fills the lowest free ids with control symbols,
    then the newline and the byte pieces, so a declaration whose other specials do not take exactly those
    ids cannot be trained and BPETokenizer reports it. In the historical layout the options are, key for
    key, those every saved BPE model was trained with."""
    if "unk" not in specials.roles:
        raise TokenizerError(
            "a bpe tokenizer needs an 'unk' special (sentencepiece requires one); declare it among its specials"
        )
    meta = {role: specials.roles[role] for role in _META_ROLES if role in specials.roles}
    if len(set(meta.values())) != len(meta):
        raise TokenizerError(
            f"sentencepiece needs distinct tokens for its pad/bos/eos/unk roles, got {meta}; "
            "give each role its own special token"
        )
    options = dict(_BASE_OPTIONS)
    options["control_symbols"] = [name for name in specials.ids if name not in meta.values()]
    for role in _META_ROLES:
        options[f"{role}_id"] = specials.ids[meta[role]] if role in meta else -1
        if role in meta:
            options[f"{role}_piece"] = meta[role]
    return options


TRAINER_OPTIONS: dict[str, Any] = trainer_options(SpecialTokens.historical())


def _num_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _split_keep(text: str, sep: str) -> list[str]:
    """`text` split around every `sep`, keeping each `sep` as its own element, without empty strings."""
    out: list[str] = []
    for i, part in enumerate(text.split(sep)):
        if i:
            out.append(sep)
        if part:
            out.append(part)
    return out


def _segments(text: str) -> tuple[list[str], list[int]]:
    """Cut `text` where cutting cannot change sentencepiece's result: after each newline (an atomic
    piece), around literal U+2581, and, for very long lines, before words. Returns the segments and the
    indices of the U+2581 segments."""
    lines = text.split(_NEWLINE)
    segs = [line + _NEWLINE for line in lines[:-1]]
    if lines[-1]:
        segs.append(lines[-1])
    if any(len(s) > _MAX_SEGMENT for s in segs):
        segs = [w for s in segs for w in (_WORD_START.split(s) if len(s) > _MAX_SEGMENT else (s,))]
    if _SPACE not in text:
        return segs, []
    segs = [p for s in segs for p in _split_keep(s, _SPACE)]
    return segs, [i for i, s in enumerate(segs) if s == _SPACE]


def _safe_cut(text: str, start: int, end: int) -> int:
    """A point in (start, end] where cutting cannot change the encoding (after a newline, or before a
    space that follows a non-space), or -1 if there is none."""
    nl = text.rfind(_NEWLINE, start, end)
    if nl >= 0:
        return nl + 1
    sp = text.rfind(" ", start + 1, end)
    if sp > start:
        run_start = start + len(text[start:sp].rstrip(" "))
        if run_start > start:
            return run_start
    return -1


def _blocks(text: str) -> Iterator[str]:
    """`text` in consecutive blocks of about _BLOCK_CHARS characters, each cut at a safe point."""
    start, n = 0, len(text)
    while start < n:
        end = start + _BLOCK_CHARS
        cut = -1
        while cut < 0 and end < n:
            cut = _safe_cut(text, start, end)
            end += _BLOCK_CHARS
        if cut < 0:
            cut = n
        yield text[start:cut]
        start = cut


def _training_sentences(texts: Iterable[str]) -> list[str]:
    """Lines of `texts`, cut like `_segments` cuts them, in chunks sentencepiece will not skip."""
    out: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"training texts must be str, got {type(text).__name__}; decode them first")
        for line in text.split(_NEWLINE):
            for part in line.split(_SPACE) if _SPACE in line else (line,):
                if len(part) <= _TRAIN_CHUNK:
                    if part:
                        out.append(part)
                    continue
                chunk = ""
                for word in _WORD_START.split(part):
                    if chunk and len(chunk) + len(word) > _TRAIN_CHUNK:
                        out.append(chunk)
                        chunk = ""
                    while len(word) > _TRAIN_CHUNK:  # a giant "word": hard cuts only affect statistics
                        out.append(word[:_TRAIN_CHUNK])
                        word = word[_TRAIN_CHUNK:]
                    chunk += word
                if chunk:
                    out.append(chunk)
    return out


def _training_error(err: Exception, vocab_size: int) -> TokenizerError:
    msg = str(err)
    too_big = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if too_big:
        most = int(too_big.group(2))
        return TokenizerError(
            f"vocab_size={vocab_size} is too large for this corpus: BPE can build at most {most} tokens "
            f"from it; set data.vocab_size <= {most} or train on more text"
        )
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_small:
        least = int(too_small.group(2))
        return TokenizerError(
            f"vocab_size={vocab_size} is too small for this corpus: BPE needs at least {least} ids "
            f"(the specials, newline, 256 byte pieces and every distinct character); "
            f"set data.vocab_size >= {least}"
        )
    first = msg.strip().splitlines()[-1] if msg.strip() else type(err).__name__
    return TokenizerError(f"sentencepiece BPE training failed: {first}; check the corpus and vocab_size")


def _misplaced_special(sp: spm.SentencePieceProcessor, specials: SpecialTokens) -> tuple[str, int] | None:
    """The first declared special whose id does not hold that piece in `sp`, or None."""
    for name, i in specials.ids.items():
        if i >= sp.get_piece_size() or sp.id_to_piece(i) != name:
            return name, i
    return None


class BPETokenizer(Tokenizer):
    """Sentencepiece BPE with byte fallback. The declared specials must be sentencepiece control (or unk)
    pieces with those strings at those ids, so they are never produced from text; in the historical layout
    they are ids 0..10."""

    kind = "bpe"

    def __init__(self, model: bytes, specials: SpecialTokens | Mapping[str, int] | None = None) -> None:
        self.model_bytes: bytes = bytes(model)
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self.model_bytes)
        except (RuntimeError, TypeError):
            raise TokenizerError(
                "the sentencepiece model is unreadable (corrupt or not a model file); retrain and save it"
            ) from None
        self._sp = sp
        declared = SpecialTokens.coerce(specials)
        misplaced = _misplaced_special(sp, declared)
        if misplaced is not None:
            raise TokenizerError(
                f"the sentencepiece model does not reserve {misplaced[0]!r} at id {misplaced[1]}; "
                "train it with BPETokenizer.train so the specials are in place"
            )
        for name, i in declared.ids.items():
            if not (sp.is_control(i) or sp.is_unknown(i)):
                raise TokenizerError(
                    f"the sentencepiece piece {name!r} at id {i} is ordinary text to sentencepiece (encoding "
                    "can produce it), so it cannot be a special token; make it a control symbol"
                )
        super().__init__(sp.get_piece_size(), declared)
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        newline_id = sp.piece_to_id(_NEWLINE)
        if not all(sp.is_byte(i) for i in byte_ids) or newline_id == sp.unk_id():
            raise TokenizerError(
                "the sentencepiece model lacks byte fallback or the newline piece, so it cannot round-trip "
                "text; train it with BPETokenizer.train"
            )
        self._space_ids: list[int] = [byte_ids[b] for b in _SPACE.encode("utf-8")]
        self._threads = _num_threads()
        self._pieces: list[str] | None = None
        probe = " a  b\t\n" + _SPACE
        if self.decode(self.encode(probe)) != probe:
            raise TokenizerError(
                "the sentencepiece model normalizes text (it must use the identity rule, no dummy prefix "
                "and no whitespace removal); train it with BPETokenizer.train"
            )

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        specials: SpecialTokens | Mapping[str, int] | None = None,
    ) -> BPETokenizer:
        """Train a BPE model with exactly `vocab_size` ids (specials, newline and 256 byte pieces included);
        `specials` None is the historical layout."""
        try:
            vocab_size = operator.index(vocab_size)
        except TypeError:
            raise TokenizerError(
                f"vocab_size must be an int, got {vocab_size!r}; set data.vocab_size"
            ) from None
        if isinstance(vocab_size, bool) or vocab_size <= 0:
            raise TokenizerError(
                f"vocab_size must be a positive int, got {vocab_size!r}; set data.vocab_size"
            )
        declared = SpecialTokens.coerce(specials)
        options = trainer_options(declared)
        sentences = _training_sentences(as_text_iterable(texts))
        if not sentences:
            raise TokenizerError("no training text for the bpe tokenizer; pass at least one non-empty text")
        model = io.BytesIO()
        spm.set_random_generator_seed(_SEED)  # sampled/shuffled input -> reproducible model
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                **options,
            )
        except RuntimeError as e:
            raise _training_error(e, vocab_size) from None
        trained = spm.SentencePieceProcessor(model_proto=model.getvalue())
        misplaced = _misplaced_special(trained, declared)
        if misplaced is not None:
            raise TokenizerError(
                f"sentencepiece cannot train special {misplaced[0]!r} at id {misplaced[1]}: it puts control "
                "symbols at the lowest ids that pad/bos/eos/unk leave free; declare the other specials "
                "there, or build the model elsewhere and pass it to BPETokenizer(model, specials)"
            )
        return cls(model.getvalue(), declared)

    # ---- encoding -------------------------------------------------------------------------------

    def _encode_segments(self, segs: list[str], space_at: list[int]) -> list[list[int]]:
        out = self._sp.encode(segs, out_type=int, num_threads=self._threads)
        for i in space_at:
            out[i] = self._space_ids
        return out

    def _encode_text(self, text: str) -> list[list[int]]:
        try:
            return self._encode_segments(*_segments(text))
        except (UnicodeEncodeError, TypeError):
            utf8(text)  # sentencepiece rejects unpaired surrogates; this raises the one-line error for them
            raise

    def encode(self, text: str) -> list[int]:
        require_str(text)
        return list(itertools.chain.from_iterable(self._encode_text(text)))

    def encode_array(self, text: str) -> np.ndarray:
        require_str(text)
        arrays = []
        for block in _blocks(text):
            ids = self._encode_text(block)
            count = sum(map(len, ids))
            arrays.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=count))
        if not arrays:
            return np.zeros(0, dtype=np.int32)
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    # ---- decoding -------------------------------------------------------------------------------

    def _decode_run(self, ids: np.ndarray) -> str:
        return self._sp.decode(ids.tolist())

    def _token_string(self, token_id: int) -> str:
        if self._pieces is None:
            sp = self._sp
            self._pieces = [
                byte_token_string(int(sp.id_to_piece(i)[3:5], 16)) if sp.is_byte(i) else sp.id_to_piece(i)
                for i in range(self.vocab_size)
            ]
        return self._pieces[token_id]

    # ---- persistence ----------------------------------------------------------------------------

    def _definition_bytes(self) -> bytes:
        return self.model_bytes

    def _config(self) -> dict[str, Any]:
        return {"model_file": MODEL_FILE}

    def _save_files(self, directory: Path) -> None:
        write_atomic(directory / MODEL_FILE, self.model_bytes)

    def _grow_files(self, directory: Path, names: list[str]) -> None:
        """Append `names` to the saved sentencepiece model as control pieces (never produced from text)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_bytes)
        for name in names:
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = name, 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
        write_atomic(directory / MODEL_FILE, proto.SerializeToString())

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: Path) -> BPETokenizer:
        name = config.get("model_file", MODEL_FILE)
        path = directory / str(name)
        try:
            model = path.read_bytes()
        except OSError as e:
            raise TokenizerError(
                f"cannot read the BPE model {str(path)!r}: {e.strerror or e}; "
                "save the tokenizer again (it writes tokenizer.json and bpe.model together)"
            ) from None
        return cls(model, SpecialTokens.from_config(config, directory))
