"""Supervised fine-tuning: a base model learns to answer in the chat template.

Data: JSONL conversations (`{"messages": [...]}` or `{"prompt", "response"}`) or `builtin:arith`,
the arithmetic world's fallible demonstrator (train/worlds/arith.py). Each conversation is rendered
by the one chat template (tokenizer/chat.py) and packed into rows without attention across
conversations (train/data/chat_batches.py). The loss is cross-entropy over the assistant turns' tokens
and their <|end|> only; a micro-batch without such tokens adds zero (never NaN).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from plutao.model.decode import generate
from plutao.model.sampling import SamplingConfig
from plutao.tokenizer.chat import ChatError, fitted_prompt_ids, render, reply_stop_ids
from plutao.train.config.errors import UserError
from plutao.train.data.batches import AXES, NamedBatches
from plutao.train.data.chat_batches import PackedChats
from plutao.train.data.conversations import read_conversations, single_path, with_held_out
from plutao.train.tasks.base import Data
from plutao.train.tasks.causal_lm import CausalLM, restart_positions
from plutao.train.worlds import arith

BUILTIN = "builtin:arith"
HELD_OUT_DEMOS = 500


def chat_data(cfg) -> tuple[list[list[dict]], list[list[dict]], str]:
    """(training conversations, held-out conversations, name) of data.path (+ data.val_path)."""
    path = single_path(cfg.data)
    if path is None:
        raise UserError("supervised fine-tuning reads one data.path (builtin:arith or a .jsonl file of conversations)")
    if path == BUILTIN:
        train = [x["messages"] for x in arith.demonstrations(cfg.world)]
        val = [x["messages"] for x in arith.demonstrations(cfg.world, HELD_OUT_DEMOS, held_out=True)]
        return train, val, BUILTIN
    if not path.endswith(".jsonl"):
        raise UserError(f"data.path={path!r}: fine-tuning data is builtin:arith or a .jsonl file of conversations "
                        "({\"messages\": [...]} or {\"prompt\": ..., \"response\": ...} per line)")
    return with_held_out(read_conversations(path), read_conversations, path, cfg.data, "conversation(s)")


def milestone_prompts(cfg, val: list[list[dict]]) -> list[list[dict]]:
    """The fixed questions answered at every milestone: for builtin:arith one per digit count (1–5),
    otherwise the first held-out conversations up to their last user turn."""
    if cfg.data.path == BUILTIN:
        return [arith.evaluation_problem(cfg.world, d, 0)[0] for d in range(1, 6)]
    out = []
    for conv in val[:4]:
        last_user = max(i for i, m in enumerate(conv) if m["role"] == "user") if any(
            m["role"] == "user" for m in conv) else None
        if last_user is not None:
            out.append(conv[:last_user + 1])
    return out


def answer(model, tokenizer, prompts: list[list[dict]], *, context: int, max_new_tokens: int = 32,
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Replies to each conversation through the chat template (greedy by default)."""
    ids = [fitted_prompt_ids(p, tokenizer, max(context - max_new_tokens, context // 2, 1))[0] for p in prompts]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                              stop_ids=reply_stop_ids(tokenizer))
    return [tokenizer.decode(o) for o in generate(model, ids, sampling, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)]


@dataclasses.dataclass(frozen=True, eq=False)
class SFT(CausalLM):
    adapts = True
    name = "sft"
    label = "SFT"
    chat = True
    decoder_only = "fine-tunes a decoder"
    parents = frozenset({"causal_lm", "sft"})
    parent_refusal = "{parent} is a {label} run; fine-tune a base (or SFT) run"
    batch_keys = ("tokens", "targets", "loss_weights", "segment_ids", "positions")
    commands = frozenset({"sample", "score", "attention", "chat"})

    @property
    def separates_documents(self) -> bool:
        return True

    @property
    def batch_axes(self):
        return {k: AXES[k] for k in self.batch_keys}

    def read(self) -> Data:
        train, val, name = chat_data(self.cfg)
        texts = [m["content"] for conv in train for m in conv]  # (only when no parent tokenizer is given)
        return Data(texts, (train, val), name)

    def batches(self, data, tokenizer):
        train, val = data.payload
        try:
            rendered = [render(c, tokenizer) for c in train], [render(c, tokenizer) for c in val]
        except ChatError as e:
            raise UserError(f"{data.names}: {e}") from None
        rows = PackedChats(*rendered, self.cfg.model.context_length, self.cfg.train.batch_size, self.cfg.train.seed,
                           tokenizer.pad_id, data.names)
        rows.val_messages = val
        supervised = sum(int(r.weights.sum()) for r in rendered[0])
        summary = (f"{len(train):,} conversations ({int(rows.lengths.sum()):,} tokens, {supervised:,} of them trained; "
                   f"rows {rows.fill_rate():.0%} full" + (f"; {rows.truncated} cut at the context" if rows.truncated
                                                           else "") + ")")
        return NamedBatches(rows, self.named, self.batch_axes), summary

    def named(self, rows):
        ids, weights, seg = rows[:, 0], rows[:, 1], rows[:, 2]
        seg_BT = seg[:, :-1]
        starts_BT = np.concatenate([np.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
        return {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": weights[:, 1:].astype(np.float32),
                "segment_ids": seg_BT.astype(np.int32), "positions": restart_positions(starts_BT)}

    def val_batches(self, batches, wanted):
        return batches.val_batches(wanted)

    def eval_line(self, r, step):
        return (f"{r['data']}: loss {r['loss']:.4f} nats per assistant token, perplexity {r['perplexity']:.3f} "
                f"({r['examples']:,} held-out conversations, {r['scored']:,} assistant tokens scored, step {step})")

    def milestone_sample(self, model, batches, tokenizer, step):
        prompts = milestone_prompts(self.cfg, batches.val_messages)
        replies = answer(model, tokenizer, prompts, context=self.cfg.model.context_length,
                         max_new_tokens=self.cfg.reply_tokens)
        return "\n".join(f"{p[-1]['content']} → {r!r}" for p, r in zip(prompts, replies))
