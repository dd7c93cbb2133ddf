"""Held-out loss, perplexity and bits per character/byte; log P(text) by the chain rule."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx

from plutao.model.heads import forward_logits
from plutao.train.config.errors import UserError
from plutao.train.losses import cross_entropy_sum, token_logprobs

EVAL_ROWS = 32  # windows per forward pass


@functools.partial(jax.jit, static_argnums=0)
def _loss_sum(graphdef, params, tokens_BT1, weights_BT):
    logits_BTV, _ = forward_logits(nnx.merge(graphdef, params), tokens_BT1[:, :-1])
    return cross_entropy_sum(logits_BTV, tokens_BT1[:, 1:], weights_BT)


@functools.partial(jax.jit, static_argnums=0)
def _logprobs(graphdef, params, tokens_1T):
    logits_1TV, _ = forward_logits(nnx.merge(graphdef, params), tokens_1T[:, :-1])
    return token_logprobs(logits_1TV, tokens_1T[:, 1:])[0]


def stream_metrics(graphdef, params, tokens: np.ndarray, context: int, tokenizer) -> dict:
    """Loss over every token of a stream after the first, in non-overlapping context-sized windows.

    Bits per character/byte divide the total loss (in bits) by the characters/UTF-8 bytes of the
    predicted text; a special token such as <|endoftext|> counts as one character and one byte.
    """
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < 2:
        raise UserError("the text has fewer than 2 tokens; nothing to evaluate")
    n_full = (len(tokens) - 1) // context
    total, count = 0.0, 0.0
    for lo in range(0, n_full, EVAL_ROWS):
        hi = min(lo + EVAL_ROWS, n_full)
        idx = np.arange(lo, hi)[:, None] * context + np.arange(context + 1)[None, :]
        s, c = _loss_sum(graphdef, params, tokens[idx], np.ones((hi - lo, context), np.float32))
        total, count = total + float(s), count + float(c)
    tail = tokens[n_full * context:]
    if len(tail) >= 2:
        s, c = _loss_sum(graphdef, params, tail[None, :], np.ones((1, len(tail) - 1), np.float32))
        total, count = total + float(s), count + float(c)
    predicted = tokens[1:].tolist()
    specials = set(tokenizer.special_ids.values())
    n_special = sum(1 for t in predicted if t in specials)
    text = tokenizer.decode(predicted, skip_special=True)
    chars, n_bytes = len(text) + n_special, len(text.encode("utf-8")) + n_special
    loss = total / count
    bits = total / math.log(2)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2),
            "bits_per_char": bits / chars, "bits_per_byte": bits / n_bytes, "tokens": int(count),
            "chars": chars, "bytes": n_bytes}


def score_text(graphdef, params, tokenizer, text: str, context: int) -> dict:
    """log P(text) = Σ_t log P(token_t | <|endoftext|>, tokens < t): the chain rule as a sum of logs."""
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("--text is empty; give some text to score")
    if len(ids) > context:
        raise UserError(f"the text is {len(ids)} tokens but the model's context is {context}; "
                        f"score at most {context} tokens")
    tokens = np.array([[tokenizer.eot_id] + ids], np.int32)
    logprobs = np.asarray(_logprobs(graphdef, params, tokens), np.float64)
    total = float(logprobs.sum())
    return {
        "text": text, "tokens": len(ids), "logprob": total, "logprob_bits": total / math.log(2),
        "perplexity": math.exp(-total / len(ids)),
        "per_token": [{"token": s, "id": i, "logprob": float(lp), "prob": math.exp(lp)}
                      for s, i, lp in zip(tokenizer.token_strings(ids), ids, logprobs)],
    }


def masked_lm_metrics(trainer, params, tokens: np.ndarray, context: int) -> dict:
    """Masked-LM loss and accuracy over non-overlapping windows, with the evaluation masks (train.mask_rate
    of the ordinary tokens, 80/10/10 corruption): each batch of windows its own draw, the same at every call."""
    tokens = np.asarray(tokens, np.int32)
    n = (len(tokens) - 1) // context
    if n < 1:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than one window of model.context_length="
                        f"{context} + 1; give more text")
    sums: dict[str, float] = {}
    for lo in range(0, n, EVAL_ROWS):
        hi = min(lo + EVAL_ROWS, n)
        idx = np.arange(lo, hi)[:, None] * context + np.arange(context + 1)[None, :]
        batch = pad_rows(tokens[idx], trainer.mesh.size, trainer.active_task.ids.pad_id)
        for k, v in trainer.eval_step(params, batch, np.int32(lo // EVAL_ROWS)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if not sums["count"]:
        raise UserError("the text has no ordinary (non-special) tokens to mask; give some text")
    loss = sums["loss"] / sums["count"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "masked_accuracy": sums["correct"] / sums["count"],
            "masked_tokens": int(sums["count"]), "tokens": int(n * context)}


def pad_rows(batch: np.ndarray, multiple: int, pad_id: int) -> np.ndarray:
    """Append padding rows so the batch splits evenly over the devices; padding carries no loss."""
    extra = -len(batch) % multiple
    return batch if not extra else np.concatenate([batch, np.full((extra, batch.shape[1]), pad_id, batch.dtype)])
