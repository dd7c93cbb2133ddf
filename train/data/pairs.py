"""Sentence pairs for translation: read TSV, tokenize, hold out a split, and draw step-indexed batches.

A batch row packs one pair: the source (`L` ids: tokens, <eos>, padding) then the target (`L + 1`
ids: <bos>, tokens, <eos>, padding), so batches stay one int array that shards like any other.
Batch k is a pure function of (seed, k): epoch e = k // batches_per_epoch is a seeded permutation
of the pairs, cut into chunks of similar length (so little of a batch is padding); the padded
length L of a batch is its longest pair rounded up to a multiple of `LENGTH_QUANTUM`, which keeps
the number of distinct shapes (compilations) small.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from plutao.tokenizer import Tokenizer, TokenizerError
from plutao.train.config.errors import UserError

LENGTH_QUANTUM = 8
SORT_CHUNK = 64  # batches per length-sorted chunk
TRAIN, VAL = 0, 1


def read_pairs(path: str, *, flag: str = "data.path") -> list[tuple[str, str]]:
    """`source<TAB>target` lines of a TSV file (extra columns, e.g. attributions, are ignored); `flag` is what
    the user typed to name the file (`data.path`, `--data`), for the errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag} {path!r} does not exist; give a TSV file of source<TAB>target lines")
    pairs = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            raise UserError(f"{path}:{n} is not 'source<TAB>target'; translation data is one tab-separated "
                            "pair per line")
        pairs.append((cols[0].strip(), cols[1].strip()))
    if not pairs:
        raise UserError(f"{path} has no sentence pairs; give a TSV file of source<TAB>target lines")
    return pairs


def held_out(pair: tuple[str, str], fraction: float) -> bool:
    """A pair's split depends on its target text alone (a hash), so it never changes with file order or
    runs, and every translation into the same target sentence lands on the same side (the held-out
    references are never training targets)."""
    h = int.from_bytes(hashlib.sha256(pair[1].encode()).digest()[:8], "little")
    return h / 2**64 < fraction


@dataclasses.dataclass
class EncodedPairs:
    src: list[np.ndarray]  # source ids + <eos>
    tgt: list[np.ndarray]  # <bos> + target ids + <eos>

    def __len__(self):
        return len(self.src)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(s), len(t) - 1) for s, t in zip(self.src, self.tgt)], np.int64)


def encode_source(tokenizer: Tokenizer, text: str) -> np.ndarray:
    try:
        return np.array(tokenizer.encode(text) + [tokenizer.eos_id], np.int32)
    except TokenizerError as e:
        raise UserError(str(e)) from None


def encode_pairs(pairs: list[tuple[str, str]], tokenizer: Tokenizer, *, unseen: bool = False) -> EncodedPairs:
    """Sources + <eos> and <bos> + targets + <eos>. `unseen`: held-out pairs, which may hold characters
    a char tokenizer trained on the training pairs has no id for (they become <unk>)."""
    def ids(text):
        if unseen:
            return tokenizer.encode_unseen(text).tolist()
        try:
            return tokenizer.encode(text)
        except TokenizerError as e:
            raise UserError(str(e)) from None

    return EncodedPairs([np.array(ids(s) + [tokenizer.eos_id], np.int32) for s, _ in pairs],
                        [np.array([tokenizer.bos_id] + ids(t) + [tokenizer.eos_id], np.int32) for _, t in pairs])


def pack(src: list[np.ndarray], tgt: list[np.ndarray], length: int, pad_id: int) -> np.ndarray:
    """Rows of [source padded to L | target padded to L + 1]."""
    out = np.full((len(src), 2 * length + 1), pad_id, np.int32)
    for i, (s, t) in enumerate(zip(src, tgt)):
        out[i, :len(s)] = s
        out[i, length:length + len(t)] = t
    return out


def padded_length(longest: int, limit: int) -> int:
    return min(limit, -(-longest // LENGTH_QUANTUM) * LENGTH_QUANTUM)


class PairBatches:
    """Step-indexed batches of packed pairs; the same interface as data.Batches."""

    def __init__(self, train: EncodedPairs, val: EncodedPairs, max_len: int, global_batch: int, seed: int,
                 pad_id: int, name: str):
        def fits(pairs):
            keep = [i for i in range(len(pairs)) if len(pairs.src[i]) <= max_len and len(pairs.tgt[i]) <= max_len + 1]
            return EncodedPairs([pairs.src[i] for i in keep], [pairs.tgt[i] for i in keep])

        self.train, self.val = fits(train), fits(val)
        self.dropped = len(train) - len(self.train)
        if len(self.train) < global_batch:
            raise UserError(f"the training part of {name!r} has {len(self.train)} pairs that fit model.context_length="
                            f"{max_len}, fewer than train.batch_size={global_batch}; use more data, a longer "
                            "context or a smaller batch")
        if not len(self.val):
            raise UserError(f"no held-out pair of {name!r} fits model.context_length={max_len}; raise "
                            "data.val_fraction or give data.val_path")
        self.name, self.max_len, self.global_batch, self.seed, self.pad_id = name, max_len, global_batch, seed, pad_id
        self.batches_per_epoch = len(self.train) // global_batch
        self._train_lengths = self.train.lengths()
        self._epoch_cache: dict[int, np.ndarray] = {}
        # Held-out batches in one fixed random order: the first k batches are a fair sample of all
        # lengths (training-time evaluation reads only train.eval_batches of them).
        self._val_order = np.random.default_rng([seed, VAL]).permutation(len(self.val))

    def _epoch(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, B) pair indices: a seeded permutation, sorted by length within chunks,
        with the batches of each chunk in seeded order."""
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, TRAIN, epoch])
            B = self.global_batch
            order = rng.permutation(len(self.train))[: self.batches_per_epoch * B]
            chunk = SORT_CHUNK * B
            for lo in range(0, len(order), chunk):
                part = order[lo:lo + chunk]
                order[lo:lo + chunk] = part[np.argsort(self._train_lengths[part], kind="stable")]
            batches = order.reshape(self.batches_per_epoch, B)
            for lo in range(0, len(batches), SORT_CHUNK):
                batches[lo:lo + SORT_CHUNK] = batches[lo:lo + SORT_CHUNK][rng.permutation(len(batches[lo:lo + SORT_CHUNK]))]
            self._epoch_cache = {epoch: batches}  # one epoch at a time is all a run needs
        return self._epoch_cache[epoch]

    def _train_ids(self, step: int) -> np.ndarray:
        return self._epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    def _val_ids(self, index: int) -> np.ndarray:
        """Batch `index` of one pass over the held-out pairs in their fixed order; the last batch is
        filled up with -1 (rows of padding, which carry no loss), so no pair is counted twice."""
        ids = np.full(self.global_batch, -1, np.int64)
        part = self._val_order[index * self.global_batch:(index + 1) * self.global_batch]
        ids[:len(part)] = part
        return ids

    def _shape(self, pairs: EncodedPairs, ids: np.ndarray) -> tuple[int, int]:
        longest = max((max(len(pairs.src[i]), len(pairs.tgt[i]) - 1) for i in ids if i >= 0), default=1)
        return self.global_batch, 2 * padded_length(longest, self.max_len) + 1

    def train_shape(self, step: int) -> tuple[int, int]:
        return self._shape(self.train, self._train_ids(step))

    def val_shape(self, index: int) -> tuple[int, int]:
        return self._shape(self.val, self._val_ids(index))

    def _rows(self, pairs, ids, rows: slice, width: int) -> np.ndarray:
        empty = np.zeros(0, np.int32)
        ids = ids[rows]
        return pack([pairs.src[i] if i >= 0 else empty for i in ids], [pairs.tgt[i] if i >= 0 else empty for i in ids],
                    (width - 1) // 2, self.pad_id)

    def train_rows(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        return self._rows(self.train, self._train_ids(step), rows, self.train_shape(step)[1])

    def val_rows(self, index: int, rows: slice = slice(None)) -> np.ndarray:
        return self._rows(self.val, self._val_ids(index), rows, self.val_shape(index)[1])

    def val_batches(self) -> int:
        """Batches that cover every held-out pair once."""
        return -(-len(self.val) // self.global_batch)

    def epochs_consumed(self, steps: int) -> dict[str, float]:
        return {self.name: steps / max(self.batches_per_epoch, 1)}

    def tokens_per_step(self, step: int) -> int:
        """Real (not padding) source and target tokens in the step's batch."""
        ids = self._train_ids(step)
        return int(sum(len(self.train.src[i]) + len(self.train.tgt[i]) - 1 for i in ids))
