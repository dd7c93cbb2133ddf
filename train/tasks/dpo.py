"""Direct preference optimisation (Rafailov et al., 2023): the policy learns from preference pairs
without a reward model, loss −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]).

Data: the rankings a reward model is trained on, each turned into its pairs (every two replies of
different rank, the better one chosen). `plutao dpo` computes the reference log-probs once, with the
SFT model and the very function the loss uses (`sequence_logprobs`), and writes them beside the pairs
(RUN_DIR/pairs/{train,val}.jsonl, "meta": {"reference_logprobs": [chosen, rejected], ...}); the
training state holds the policy alone.

A reply's log-prob sums its tokens and its <|end|> when it ended (a reply that ran to its budget is
scored without one); a reply that called a tool sums the assistant's tokens only, never the tool's result
(the tokens `runtime_targets` marks). Metrics: the implicit rewards β·(log π − log π_ref) of chosen and rejected, their
margin, the share of pairs ordered right, and the chosen reply's log-prob per pair, whose fall while
the margin grows is a known failure of DPO (both replies become less likely, the rejected faster).
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np

from plutao.model.heads import forward_logits
from plutao.model.layers import no_constraint
from plutao.model.sampling import prompt_width
from plutao.tokenizer.chat import ChatError, prompt_ids, render, runtime_targets
from plutao.train.config.errors import UserError
from plutao.train.data.batches import NamedBatches
from plutao.train.data.chat_batches import PreferencePairs, encode_pair
from plutao.train.data.conversations import Ranking, read_rankings, reply_turns, single_path, with_held_out
from plutao.train.losses import token_logprobs
from plutao.train.rl import objectives as rl
from plutao.train.tasks.base import Data
from plutao.train.tasks.causal_lm import CausalLM
from plutao.train.tasks.sft import answer

AXES = {"pair_tokens": ("batch", "responses", "length"), "pair_targets": ("batch", "responses", "length"),
        "pair_weights": ("batch", "responses", "length"), "reference": ("batch", "responses")}


def pairs_of(rankings: list[Ranking]) -> list[Ranking]:
    """Every pair of replies of different rank in each ranking, as a two-reply Ranking (better first);
    meta keeps the ranking's facts and each reply's `ended` and `correct`."""
    out = []
    for r in rankings:
        ended = r.meta.get("ended", [True] * len(r.responses))
        correct = r.meta.get("correct")
        for i in range(len(r.responses)):
            for j in range(len(r.responses)):
                if r.ranks[i] < r.ranks[j]:
                    meta = {k: v for k, v in r.meta.items() if k not in ("ended", "correct", "gold_ranks")}
                    meta["ended"] = [bool(ended[i]), bool(ended[j])]
                    if correct is not None:
                        meta["correct"] = [bool(correct[i]), bool(correct[j])]
                    out.append(Ranking(r.prompt, [r.responses[i], r.responses[j]], [0, 1], meta))
    return out


def reply_ids(prompt: list[dict], response, tokenizer, ended: bool) -> list[int]:
    """A reply's ids after the prompt's <|assistant|> through the chat template (its tool turns too), its
    <|end|> kept only when it ended."""
    head = len(prompt_ids(prompt, tokenizer))
    ids = render(prompt + reply_turns(response), tokenizer).ids.tolist()[head:]
    return ids if ended else ids[:-1]


def encode_pairs(pairs: list[Ranking], tokenizer, context: int) -> tuple[list, int]:
    """(EncodedPairs, width): prompt ids through the chat template, each reply + <|end|> when it ended."""
    try:
        seqs = []
        for p in pairs:
            ids = prompt_ids(p.prompt, tokenizer)
            replies = [reply_ids(p.prompt, x, tokenizer, e) for x, e in zip(p.responses, p.meta.get("ended", [True, True]))]
            seqs.append((ids, replies, p.meta.get("reference_logprobs", (0.0, 0.0))))
    except ChatError as e:
        raise UserError(str(e)) from None
    width = prompt_width(max(len(i) + len(r) for i, rs, _ in seqs for r in rs) - 1, context)
    return [encode_pair(i, rs, width, tokenizer.pad_id, ref) for i, rs, ref in seqs], width


def preference_data(cfg) -> tuple[list[Ranking], list[Ranking], str]:
    path = single_path(cfg.data)
    if path is None or not path.endswith(".jsonl"):
        raise UserError(f"data.path={cfg.data.path!r}: DPO reads the pairs `plutao dpo` writes (RUN_DIR/pairs/train.jsonl); "
                        "run `plutao dpo SFT_RUN --workdir DIR [--data FILE.jsonl]`")
    train, val, name = with_held_out(read_rankings(path), read_rankings, path, cfg.data, "pair(s)")
    for r in train + val:
        if len(r.responses) != 2 or "reference_logprobs" not in r.meta:
            raise UserError(f"{name}: DPO pairs carry their reference log-probs (meta.reference_logprobs); make them "
                            "with `plutao dpo SFT_RUN --workdir DIR --data FILE.jsonl`")
    return train, val, name


@dataclasses.dataclass(frozen=True, eq=False)
class DPO(CausalLM):
    adapts = True
    name = "dpo"
    label = "DPO"
    chat = True
    decoder_only = "fine-tunes a decoder"
    parents = frozenset({"sft"})
    parent_refusal = "{parent} is not an SFT run (it is a {label} run); DPO starts from a `plutao sft` run"
    scans_layers = True
    batch_keys = ("pair_tokens", "pair_targets", "pair_weights", "reference")
    commands = frozenset({"sample", "score", "attention", "chat"})
    step_metrics = ("chosen_reward", "rejected_reward", "margin", "accuracy", "chosen_logprob", "rejected_logprob")

    @property
    def batch_axes(self):
        return dict(AXES)

    @classmethod
    def problems(cls, cfg):
        out = super().problems(cfg)
        if cfg.rl.beta <= 0:
            out.append(f"DPO's β (rl.beta, --beta) must be > 0, got {cfg.rl.beta}")
        return out

    def read(self) -> Data:
        train, val, name = preference_data(self.cfg)
        return Data([], (train, val), name)

    def batches(self, data, tokenizer):
        train, val = data.payload
        context = self.cfg.model.context_length
        enc, width = encode_pairs(train + val, tokenizer, context)
        rows = PreferencePairs(enc[:len(train)], enc[len(train):], width, self.cfg.train.batch_size,
                               self.cfg.train.seed, tokenizer.pad_id, data.names)
        rows.val_pairs = val
        return NamedBatches(rows, self.named, self.batch_axes), f"{len(train):,} preference pairs ({len(val):,} held out)"

    def row_width(self, context):
        return context + 4

    def named(self, rows):
        W = rows.shape[-1] - 3
        tokens = rows[..., :W]
        index = np.arange(W - 1)
        reply = (index >= rows[..., W, None]) & (index < rows[..., W + 1, None])
        weights = (reply & ~runtime_targets(tokens[..., 1:], self.ids.tool_turn)).astype(np.float32)  # (tool turns: holes)
        return {"pair_tokens": tokens[..., :-1], "pair_targets": tokens[..., 1:], "pair_weights": weights,
                "reference": np.ascontiguousarray(rows[..., W + 2]).view(np.float32)}

    def sequence_logprobs(self, model, batch, key=None, constrain=no_constraint):
        """(B, 2) Σ log π over each reply's tokens (what the reference log-probs are computed with too)."""
        tokens = batch["pair_tokens"]
        B, K, T = tokens.shape
        logits, _ = forward_logits(model, tokens.reshape(B * K, T), dropout_key=key, constrain=constrain)
        logp = token_logprobs(logits, batch["pair_targets"].reshape(B * K, T))
        return (logp * batch["pair_weights"].reshape(B * K, T)).sum(-1).reshape(B, K)

    def sums(self, model, batch, key, *, train, constrain=no_constraint):
        lp = self.sequence_logprobs(model, batch, key if train else None, constrain)
        ref = batch["reference"]
        valid = (batch["pair_weights"].sum(-1) > 0).all(-1).astype(jnp.float32)
        loss, r_w, r_l = rl.dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], self.cfg.rl.beta)
        return {"loss": (loss * valid).sum(), "count": valid.sum(),
                "chosen_reward": (r_w * valid).sum(), "rejected_reward": (r_l * valid).sum(),
                "margin": ((r_w - r_l) * valid).sum(), "accuracy": ((r_w > r_l) * valid).sum(),
                "chosen_logprob": (lp[:, 0] * valid).sum(), "rejected_logprob": (lp[:, 1] * valid).sum()}

    def eval_summary(self, sums):
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss"] / n, **{k: sums[k] / n for k in self.step_metrics}}

    def val_text(self, val, *, final=False):
        """The share of held-out pairs ordered right, the mean margin β·(Δ log-ratio), and the DPO loss."""
        return (f"val preference accuracy {val['accuracy']:.3f}, margin {val['margin']:+.4f} "
                f"(DPO loss {val['loss']:.4f})")

    def val_batches(self, batches, wanted):
        return batches.val_batches(wanted)

    def eval_line(self, r, step):
        return (f"{r['data']}: preference accuracy {r['accuracy']:.3f}, margin {r['margin']:+.4f}, DPO loss "
                f"{r['loss']:.4f} (implicit rewards: chosen {r['chosen_reward']:+.4f}, rejected "
                f"{r['rejected_reward']:+.4f}; {r['scored']:,} held-out pairs, step {step})")

    def milestone_sample(self, model, batches, tokenizer, step, n: int = 4):
        """Replies to the first few distinct held-out questions (a ranking gives several pairs, all
        asking the same one)."""
        distinct: dict[str, list[dict]] = {}
        for pair in batches.val_pairs:
            distinct.setdefault(json.dumps(pair.prompt, sort_keys=True), pair.prompt)
            if len(distinct) == n:
                break
        prompts = list(distinct.values())
        replies = answer(model, tokenizer, prompts, context=self.cfg.model.context_length,
                         max_new_tokens=self.cfg.reply_tokens)
        return "\n".join(f"{p[-1]['content']} → {r!r}" for p, r in zip(prompts, replies))
