"""Step-indexed batches for the assistant stages, pure functions of (seed, step) like train/data/sources.py.

`PackedChats` (SFT): rendered conversations packed into rows of T+1 tokens in a seeded order per
epoch, each conversation whole in one row (a longer one keeps its first T+1 tokens), rows padded
with <pad>. A row carries three channels: ids, loss weights and segment ids (1, 2, … per
conversation, 0 for padding), so attention never crosses from one conversation into another.
Packing instead of one conversation per row: the built-in chats are ~30 tokens, and padding each
to the context would spend most of every step on <pad> (README has the measured fill rates).

`RankedBatches` (reward model): one prompt per batch element with up to K responses, each encoded
once as prompt + response + <|end|> + <|reward|>, right-padded to T; a row is (K, T + 2): the
tokens, then the position of <|reward|> and the response's rank (−1: no response in that slot).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from plutao.tokenizer.chat import Rendered
from plutao.train.config.errors import UserError

TRAIN, VAL = 0, 1


def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class Packing:
    """One epoch's rows: rows[r] = the conversation indices packed into row r, in order."""

    rows: tuple[tuple[int, ...], ...]
    real_tokens: np.ndarray  # (n_rows,) tokens that are not padding


def pack(lengths: np.ndarray, order: np.ndarray, width: int) -> Packing:
    rows, current, used, real = [], [], 0, []
    for i in order:
        n = min(int(lengths[i]), width)
        if current and used + n > width:
            rows.append(tuple(current))
            real.append(used)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(tuple(current))
        real.append(used)
    return Packing(tuple(rows), np.asarray(real, np.int64))


class PackedChats:
    def __init__(self, train: list[Rendered], val: list[Rendered], context: int, global_batch: int, seed: int,
                 pad_id: int, name: str = "chats"):
        if not train or not val:
            raise UserError("SFT needs at least one training and one held-out conversation")
        self.train_chats, self.val_chats = train, val
        self.width, self.global_batch, self.seed, self.pad_id, self.name = context + 1, global_batch, seed, pad_id, name
        self.lengths = np.array([len(c) for c in train])
        self.truncated = int((self.lengths > self.width).sum())
        self.val_packing = pack(np.array([len(c) for c in val]), np.arange(len(val)), self.width)
        self._epochs: dict[int, Packing] = {}

    def epoch(self, e: int) -> Packing:
        if e not in self._epochs:
            self._epochs[e] = pack(self.lengths, _order(self.seed, e, len(self.train_chats)), self.width)
        return self._epochs[e]

    def _locate(self, row: int) -> tuple[Packing, int]:
        """The epoch packing and row index of global training row `row`."""
        e = 0
        while row >= len(self.epoch(e).rows):
            row -= len(self.epoch(e).rows)
            e += 1
        return self.epoch(e), row

    def _row(self, chats: list[Rendered], members: tuple[int, ...]) -> np.ndarray:
        out = np.zeros((3, self.width), np.int32)
        out[0] = self.pad_id
        at = 0
        for seg, i in enumerate(members, 1):
            c = chats[i]
            n = min(len(c), self.width - at)
            out[0, at:at + n], out[1, at:at + n], out[2, at:at + n] = c.ids[:n], c.weights[:n], seg
            at += n
        return out

    def _rows(self, first: int, rows: slice, val: bool) -> np.ndarray:
        picked = range(*rows.indices(self.global_batch))
        out = np.empty((len(picked), 3, self.width), np.int32)
        for j, r in enumerate(picked):
            if val:  # (past the end of the held-out rows: an empty row, so nothing counts twice)
                packing = self.val_packing
                members = packing.rows[first + r] if first + r < len(packing.rows) else ()
                out[j] = self._row(self.val_chats, members)
            else:
                packing, at = self._locate(first + r)
                out[j] = self._row(self.train_chats, packing.rows[at])
        return out

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.global_batch, 3, self.width

    def train_shape(self, step: int):
        return self.shape

    def val_shape(self, index: int):
        return self.shape

    def train_rows(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        return self._rows(step * self.global_batch, rows, val=False)

    def val_rows(self, index: int, rows: slice = slice(None)) -> np.ndarray:
        return self._rows(index * self.global_batch, rows, val=True)

    def val_batches(self, wanted: int = 1 << 30) -> int:
        """Enough batches to cover the held-out rows once (at most `wanted`)."""
        return max(1, min(wanted, -(-len(self.val_packing.rows) // self.global_batch)))

    def tokens_per_step(self, step: int) -> int:
        """The real (non-padding) tokens of the step's rows."""
        first, total = step * self.global_batch, 0
        for r in range(first, first + self.global_batch):
            packing, at = self._locate(r)
            total += int(packing.real_tokens[at])
        return total

    def fill_rate(self, epoch: int = 0) -> float:
        p = self.epoch(epoch)
        return float(p.real_tokens.sum() / (len(p.rows) * self.width))

    def epochs_consumed(self, steps: int) -> dict[str, float]:
        rows, e, done = steps * self.global_batch, 0, 0.0
        while rows >= len(self.epoch(e).rows):
            rows -= len(self.epoch(e).rows)
            e += 1
            done += 1
        return {self.name: done + rows / len(self.epoch(e).rows)}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One ranked prompt, encoded: (K, T) tokens, the <|reward|> position and rank of each response."""

    tokens: np.ndarray
    reward_index: np.ndarray
    ranks: np.ndarray


def encode_ranking(sequences: list[list[int]], ranks: list[int], context: int, pad_id: int) -> Encoded:
    """Each response's ids (prompt + response + <|end|> + <|reward|>), right-padded to `context`;
    a sequence longer than the context loses its oldest prompt tokens (the reply and the <|reward|>
    token are kept)."""
    K = len(sequences)
    tokens = np.full((K, context), pad_id, np.int32)
    index = np.zeros(K, np.int32)
    for k, seq in enumerate(sequences):
        seq = seq[-context:]
        tokens[k, :len(seq)] = seq
        index[k] = len(seq) - 1
    return Encoded(tokens, index, np.asarray(ranks, np.int32))


class RankedBatches:
    def __init__(self, train: list[Encoded], val: list[Encoded], context: int, global_batch: int, k_max: int,
                 seed: int, pad_id: int, name: str = "rankings"):
        if not train or not val:
            raise UserError("the reward model needs at least one training and one held-out ranking")
        self.train_items, self.val_items = train, val
        self.context, self.global_batch, self.k_max, self.seed, self.pad_id, self.name = (
            context, global_batch, k_max, seed, pad_id, name)
        self._orders: dict[int, np.ndarray] = {}

    def _row(self, item: Encoded) -> np.ndarray:
        out = np.zeros((self.k_max, self.context + 2), np.int32)
        out[:, :self.context] = self.pad_id
        out[:, -1] = -1
        K = len(item.ranks)
        out[:K, :self.context], out[:K, -2], out[:K, -1] = item.tokens, item.reward_index, item.ranks
        return out

    def _item(self, position: int) -> Encoded:
        n = len(self.train_items)
        epoch = position // n
        if epoch not in self._orders:  # (one permutation per epoch, not one per row)
            self._orders = {epoch: _order(self.seed, epoch, n)}
        return self.train_items[self._orders[epoch][position % n]]

    @property
    def shape(self):
        return self.global_batch, self.k_max, self.context + 2

    def train_shape(self, step):
        return self.shape

    def val_shape(self, index):
        return self.shape

    def train_rows(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        picked = range(*rows.indices(self.global_batch))
        return np.stack([self._row(self._item(step * self.global_batch + r)) for r in picked])

    def val_rows(self, index: int, rows: slice = slice(None)) -> np.ndarray:
        picked = range(*rows.indices(self.global_batch))
        out = np.stack([self._row(self.val_items[(index * self.global_batch + r) % len(self.val_items)])
                        for r in picked])
        # Past the end of the held-out set, rows repeat: mark them empty so nothing is counted twice.
        for j, r in enumerate(picked):
            if index * self.global_batch + r >= len(self.val_items):
                self._mark_empty(out[j])
        return out

    def _mark_empty(self, row: np.ndarray) -> None:
        row[:, -1] = -1  # (rank −1: no response, no pair)

    def val_batches(self, wanted: int = 1 << 30) -> int:
        """Batches covering the held-out rankings once (at most `wanted`)."""
        return max(1, min(wanted, -(-len(self.val_items) // self.global_batch)))

    def tokens_per_step(self, step: int) -> int:
        return int(sum((self._item(step * self.global_batch + r).reward_index + 1).sum()
                       for r in range(self.global_batch)))

    def epochs_consumed(self, steps: int) -> dict[str, float]:
        return {self.name: steps * self.global_batch / len(self.train_items)}


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A preference pair as two right-padded sequences (chosen first) of width T + 1, where each reply
    starts and ends (its predicted positions are [start, stop)), and the reference log-probs."""

    tokens: np.ndarray  # (2, T + 1) int32
    start: np.ndarray  # (2,) int32
    stop: np.ndarray  # (2,) int32
    reference: np.ndarray  # (2,) float32: Σ log π_ref over the reply (0 until computed)


def encode_pair(prompt_ids: list[int], replies: list[list[int]], width: int, pad_id: int,
                reference=(0.0, 0.0)) -> EncodedPair:
    """Prompt + each reply, right-padded to `width` + 1 tokens; a pair longer than that loses its oldest
    prompt tokens (both replies are kept whole)."""
    tokens = np.full((2, width + 1), pad_id, np.int32)
    start, stop = np.zeros(2, np.int32), np.zeros(2, np.int32)
    for k, reply in enumerate(replies):
        keep = max(width + 1 - len(reply), 1)
        seq = (list(prompt_ids)[-keep:] + list(reply))[:width + 1]
        tokens[k, :len(seq)] = seq
        start[k], stop[k] = len(seq) - len(reply) - 1, len(seq) - 1
    return EncodedPair(tokens, start, stop, np.asarray(reference, np.float32))


def pair_rows(items: list[EncodedPair], width: int) -> np.ndarray:
    """(N, 2, width + 4) rows: each pair's tokens, start, stop and reference log-prob (float32 bits)."""
    W = width + 1
    out = np.zeros((len(items), 2, W + 3), np.int32)
    for row, item in zip(out, items):
        row[:, :W], row[:, W], row[:, W + 1] = item.tokens, item.start, item.stop
        row[:, W + 2] = item.reference.astype(np.float32).view(np.int32)
    return out


class PreferencePairs(RankedBatches):
    """DPO's data source: rows (B, 2, T + 4) = the pair's tokens (T + 1), start, stop and the reference
    log-prob (float32 bits in an int32 column, so a row stays one integer array); empty rows (past the
    end of the held-out set) have start = stop = 0. One permutation of the pairs per epoch."""

    def __init__(self, train: list[EncodedPair], val: list[EncodedPair], width: int, global_batch: int,
                 seed: int, pad_id: int, name: str = "pairs"):
        if not train or not val:
            raise UserError("DPO needs at least one training and one held-out preference pair")
        super().__init__(train, val, width, global_batch, 2, seed, pad_id, name)

    def _row(self, item: EncodedPair) -> np.ndarray:
        return pair_rows([item], self.context)[0]

    @property
    def shape(self):
        return self.global_batch, 2, self.context + 4

    def _mark_empty(self, row: np.ndarray) -> None:
        row[:, self.context + 1:self.context + 3] = 0  # (start = stop: no reply token counts)

    def tokens_per_step(self, step: int) -> int:
        return int(sum((self._item(step * self.global_batch + r).stop + 1).sum() for r in range(self.global_batch)))
