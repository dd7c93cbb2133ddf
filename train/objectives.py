"""What each model family is trained to predict, as pure functions of (model, batch, key).

- causal LM (GPT, RNN/LSTM/GRU): row of T+1 tokens → predict token t+1 from tokens ≤ t.
- translation (encoder-decoder): a row packs the source (L ids, padded) and the target (L+1 ids:
  <bos> … <eos>, padded); the decoder predicts target t+1 from the source and target ≤ t. Padding
  carries no loss.
- masked LM (BERT): 15% of the ordinary tokens are selected; of those 80% become <mask>, 10% a random
  token, 10% stay; the loss counts the selected positions only.

Each returns sums (loss, count, and for the masked LM the number predicted correctly), so that
micro-batches and evaluation batches add up exactly before one division.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from plutao.model.families import CAUSAL_LM
from plutao.model.layers import no_constraint
from plutao.train.losses import cross_entropy_sum

Array = jax.Array


def split_pair_row(batch_BW: Array) -> tuple[Array, Array]:
    """A packed translation batch (B, 2L+1) → source (B, L) and target (B, L+1)."""
    L = (batch_BW.shape[1] - 1) // 2
    return batch_BW[:, :L], batch_BW[:, L:]


def mask_tokens(tokens_BT: Array, key: Array, *, rate: float, mask_id: int, first_regular_id: int,
                vocab_limit: int) -> tuple[Array, Array]:
    """BERT's corruption: (inputs, selected). Special tokens (ids < first_regular_id) are never selected."""
    k_select, k_kind, k_random = jax.random.split(key, 3)
    selected_BT = jax.random.bernoulli(k_select, rate, tokens_BT.shape) & (tokens_BT >= first_regular_id)
    u_BT = jax.random.uniform(k_kind, tokens_BT.shape)
    random_BT = jax.random.randint(k_random, tokens_BT.shape, first_regular_id, vocab_limit, tokens_BT.dtype)
    corrupted_BT = jnp.where(u_BT < 0.8, mask_id, jnp.where(u_BT < 0.9, random_BT, tokens_BT))
    return jnp.where(selected_BT, corrupted_BT, tokens_BT), selected_BT


@dataclasses.dataclass(frozen=True)
class Objective:
    family: str
    label_smoothing: float = 0.0
    pad_id: int = 0
    mask_id: int = 5
    first_regular_id: int = 11  # ids below are special tokens
    vocab_limit: int = 0  # the tokenizer's vocabulary size: random replacements are drawn below it
    mask_rate: float = 0.15
    # Special ids that are real prediction targets (<|endoftext|>, <eos>, a word-level <unk>): label smoothing spreads its
    # mass over these and the ordinary ids below vocab_limit, never over padding, other specials or
    # the padded rows of a vocabulary rounded up past the tokenizer's.
    target_specials: tuple[int, ...] = (1, 3, 4)

    def smoothing_support(self, vocab: int) -> Array | None:
        if not self.vocab_limit:
            return None
        ids_V = jnp.arange(vocab)
        support_V = (ids_V >= self.first_regular_id) & (ids_V < self.vocab_limit)
        for i in self.target_specials:
            support_V |= ids_V == i
        return support_V

    def _cross_entropy(self, logits, targets, weights, smoothing: float) -> dict:
        """{"loss", "count"} and, when smoothing, "nll": the plain cross-entropy beside the smoothed loss."""
        loss, count = cross_entropy_sum(logits, targets, weights, label_smoothing=smoothing,
                                        support_V=self.smoothing_support(logits.shape[-1]) if smoothing else None)
        out = {"loss": loss, "count": count}
        if smoothing:
            out["nll"] = cross_entropy_sum(logits, targets, weights)[0]
        return out

    def sums(self, model, batch: Array, key: Array | None, *, train: bool, constrain=no_constraint) -> dict:
        """{"loss", "count"[, "correct"]}: summed token losses and how many tokens they cover.

        With train=True dropout uses `key` and label smoothing applies; otherwise (evaluation) the loss
        is plain cross-entropy and `key` only draws the masked LM's (fixed) masks.
        """
        smoothing = self.label_smoothing if train else 0.0
        dropout_key = key if train else None
        if self.family in CAUSAL_LM:
            logits, _, _ = model(batch[:, :-1], dropout_key=dropout_key, constrain=constrain)
            return self._cross_entropy(logits, batch[:, 1:], None, smoothing)
        if self.family == "encoder_decoder":
            src_BL, tgt_BL1 = split_pair_row(batch)
            logits, _ = model(src_BL, src_BL != self.pad_id, tgt_BL1[:, :-1], dropout_key=dropout_key,
                              constrain=constrain)
            targets = tgt_BL1[:, 1:]
            return self._cross_entropy(logits, targets, targets != self.pad_id, smoothing)
        if self.family == "encoder":
            tokens_BT = batch[:, :-1]
            mask_key, dropout_key = jax.random.split(key)
            inputs_BT, selected_BT = mask_tokens(tokens_BT, mask_key, rate=self.mask_rate, mask_id=self.mask_id,
                                                 first_regular_id=self.first_regular_id,
                                                 vocab_limit=self.vocab_limit)
            logits, _ = model(inputs_BT, tokens_BT != self.pad_id, dropout_key=dropout_key if train else None,
                              constrain=constrain)
            correct = jnp.sum((jnp.argmax(logits, -1) == tokens_BT) & selected_BT)
            return self._cross_entropy(logits, tokens_BT, selected_BT, smoothing) | {
                "correct": correct.astype(jnp.float32)}
        raise ValueError(f"no gradient objective for model.family={self.family}")
