"""Masked language modelling (BERT): train.mask_rate of the ordinary tokens are selected; of those 80%
become <mask>, 10% a random ordinary token, 10% stay; the loss counts the selected positions only.

Evaluation batch i always draws the same masks (from a key folded with i), and each batch its own.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from plutao.model.heads import forward_logits
from plutao.model.layers import no_constraint
from plutao.model.sampling import to_host
from plutao.train.config.errors import UserError
from plutao.train.eval.likelihood import masked_lm_metrics
from plutao.train.tasks.base import Array, ordinary_mask
from plutao.train.tasks.causal_lm import CausalLM


def mask_tokens(tokens_BT: Array, key: Array, *, rate: float, mask_id: int, ordinary_V: Array) -> tuple[Array, Array]:
    """BERT's corruption: (inputs, selected). Special tokens (not in `ordinary_V`) are never selected,
    and random replacements are ordinary tokens."""
    k_select, k_kind, k_random = jax.random.split(key, 3)
    selected_BT = jax.random.bernoulli(k_select, rate, tokens_BT.shape) & ordinary_V[tokens_BT]
    u_BT = jax.random.uniform(k_kind, tokens_BT.shape)
    ordinary_N = jnp.flatnonzero(ordinary_V, size=ordinary_V.shape[0])
    n_ordinary = jnp.maximum(jnp.sum(ordinary_V), 1)
    first = ordinary_N[0]
    # Drawn as first + U{0, n-1} and mapped through the ordinary ids (the identity for a contiguous block).
    offset_BT = jax.random.randint(k_random, tokens_BT.shape, first, first + n_ordinary, tokens_BT.dtype) - first
    random_BT = ordinary_N[offset_BT].astype(tokens_BT.dtype)
    corrupted_BT = jnp.where(u_BT < 0.8, mask_id, jnp.where(u_BT < 0.9, random_BT, tokens_BT))
    return jnp.where(selected_BT, corrupted_BT, tokens_BT), selected_BT


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedLM(CausalLM):
    name = "masked_lm"
    scans_layers = False
    commands = frozenset({"fill-mask", "attention"})
    batch_keys: ClassVar[tuple[str, ...]] = ("tokens",)

    def named(self, rows):
        return self.with_segments({"tokens": rows[:, :-1]})

    def sums(self, model, batch, key, *, train, constrain=no_constraint):
        tokens_BT = batch["tokens"]
        mask_key, dropout_key = jax.random.split(key)
        inputs_BT, selected_BT = mask_tokens(tokens_BT, mask_key, rate=self.cfg.train.mask_rate,
                                             mask_id=self.ids.mask_id,
                                             ordinary_V=self.ids.ordinary_V(self.cfg.model.vocab_size))
        logits, _ = forward_logits(model, inputs_BT, tokens_BT != self.ids.pad_id,
                                   dropout_key=dropout_key if train else None, constrain=constrain,
                                   **self.segments_of(batch))
        correct = jnp.sum((jnp.argmax(logits, -1) == tokens_BT) & selected_BT)
        return self.cross_entropy(logits, tokens_BT, selected_BT, train=train) | {"correct": correct.astype(jnp.float32)}

    def eval_summary(self, sums):
        return super().eval_summary(sums) | {"accuracy": sums["correct"] / max(sums["count"], 1.0)}

    def val_text(self, val, *, final=False):
        return super().val_text(val, final=final) + f", masked-token accuracy {val['accuracy']:.3f}"

    def milestone_sample(self, model, batches, tokenizer, step, width: int = 64):
        """A held-out snippet with every 7th token masked, and the model's best guess for each mask."""
        tokens = np.asarray(batches.val(0, slice(0, 1))["tokens"][0, :width], np.int32)
        ordinary = ordinary_mask(tokenizer)
        masked = tokens.copy()
        positions = [i for i in range(3, len(tokens), 7) if tokens[i] < len(ordinary) and ordinary[tokens[i]]]
        masked[positions] = tokenizer.mask_id
        logits, _ = forward_logits(model, masked[None])
        filled = masked.copy()
        filled[positions] = np.argmax(to_host(logits)[0, positions], axis=-1)
        hits = int(sum(filled[i] == tokens[i] for i in positions))
        show = tokenizer.decode
        return (f"input:  {show(masked.tolist())}\nfilled: {show(filled.tolist())}\n"
                f"({hits}/{len(positions)} masked tokens recovered)")

    def eval_stream(self, run, tokens):
        return masked_lm_metrics(run.trainer, run.params, tokens, self.eval_context())

    def eval_line(self, r, step):
        return (f"{r['data']}: masked-LM loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}, "
                f"masked-token accuracy {r['masked_accuracy']:.2%} ({r['masked_tokens']:,} masked of "
                f"{r['tokens']:,} tokens, step {step})")

    def attention_input(self, tokenizer, text):
        seq = tokenizer.encode(text)
        if len(seq) > self.cfg.model.context_length:
            raise UserError(f"the text is {len(seq)} tokens, longer than model.context_length={self.cfg.model.context_length}")
        return seq

    def attention_sets(self, model, tokenizer, text, target):
        """Bidirectional self-attention over the text."""
        seq = self.attention_input(tokenizer, text)
        weights = model(np.array([seq], np.int32), return_weights=True).weights
        strings = tokenizer.token_strings(seq)
        return {"self": ([to_host(w)[0] for w in weights], strings, strings)}

    def fill(self, model, tokenizer, text: str, top_k: int) -> list[dict]:
        """For each <mask> in `text`, the top-k ordinary tokens with their probabilities (all masks
        predicted at once)."""
        mask_text = tokenizer.special_roles.get("mask", "<mask>")
        if mask_text not in text:
            raise UserError(f"the text has no {mask_text}; mark the hidden token(s), e.g. \"The cat sat on the "
                            f"{mask_text}.\"")
        if top_k < 1:
            raise UserError(f"--top-k must be ≥ 1, got {top_k}")
        ids, positions = [], []
        for i, piece in enumerate(text.split(mask_text)):
            if i:
                positions.append(len(ids))
                ids.append(tokenizer.mask_id)
            ids.extend(tokenizer.encode(piece))
        if len(ids) > self.cfg.model.context_length:
            raise UserError(f"the text is {len(ids)} tokens, longer than model.context_length={self.cfg.model.context_length}")
        logits, _ = forward_logits(model, np.array([ids], np.int32))
        probs = np.asarray(jax.nn.softmax(to_host(logits)[0, positions].astype(np.float64), axis=-1))
        ordinary = ordinary_mask(tokenizer)
        out = []
        for n, pos in enumerate(positions):
            p = probs[n].copy()
            p[: len(ordinary)][~ordinary] = 0.0  # a fill is ordinary text
            p[len(ordinary):] = 0.0  # (nor a padded row past the tokenizer's vocabulary)
            top = np.argsort(-p)[:top_k]
            out.append({"position": pos, "fills": [{"token": tokenizer.token_strings([int(i)])[0], "id": int(i),
                                                    "prob": float(probs[n, i])} for i in top]})
        return out
