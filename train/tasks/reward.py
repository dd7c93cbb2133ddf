"""A reward model: the SFT trunk with a scalar head read at the <|reward|> token.

Each ranked prompt is one batch element holding its K responses, each encoded once as
prompt + response + <|end|> + <|reward|> (the chat template's tokens); the loss is InstructGPT's
−1/C(K,2) Σ log σ(r_w − r_l) over all of the prompt's pairs (train/losses.py: ranking_loss_sums).
Data: JSONL pairs or ranked lists (train/data/conversations.py); `plutao reward SFT_RUN --data
builtin:arith` first samples the responses from the SFT model and ranks them with the world's labeler.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from plutao.model.families import build_model
from plutao.model.heads import ScalarHead
from plutao.model.layers import no_constraint
from plutao.model.sampling import prompt_width
from plutao.tokenizer.chat import ChatError, reward_ids
from plutao.train.config.errors import UserError
from plutao.train.data.batches import NamedBatches
from plutao.train.data.chat_batches import RankedBatches, encode_ranking
from plutao.train.data.conversations import Ranking, read_rankings, reply_turns, single_path, with_held_out
from plutao.train.losses import ranking_loss_sums
from plutao.train.tasks.base import Data
from plutao.train.tasks.causal_lm import CausalLM

AXES = {"responses": ("batch", "responses", "length"), "reward_index": ("batch", "responses"),
        "rank": ("batch", "responses")}


def ranking_data(cfg) -> tuple[list[Ranking], list[Ranking], str]:
    d = cfg.data
    path = single_path(d)
    if path == "builtin:arith":
        raise UserError("builtin:arith rankings are sampled from an SFT model: run `plutao reward SFT_RUN --workdir DIR` "
                        "(it writes them to DIR/comparisons/ and trains on them)")
    if path is None or not path.endswith(".jsonl"):
        raise UserError(f"data.path={d.path!r}: the reward model reads one .jsonl file of rankings "
                        "({\"prompt\", \"chosen\", \"rejected\"} or {\"prompt\", \"responses\": [best, ..., worst]})")
    return with_held_out(read_rankings(path), read_rankings, path, d, "ranking(s)")


def margin_sum(r_BK, rank_BK):
    """Σ r_i − r_j over every ordered pair (i ranked better than j) of each prompt's responses: divided
    by the pairs `ranking_loss_sums` counts, the mean margin by which the better reply wins."""
    r_BK = r_BK.astype(jnp.float32)
    valid_BK = rank_BK >= 0
    better_BKK = (rank_BK[:, :, None] < rank_BK[:, None, :]) & valid_BK[:, :, None] & valid_BK[:, None, :]
    return jnp.sum(jnp.where(better_BKK, r_BK[:, :, None] - r_BK[:, None, :], 0.0))


def reward_scores(model, tokens_NT, index_N):
    """(N,) raw rewards of right-padded sequences read at index_N (the <|reward|> positions)."""
    out = model(tokens_NT)
    return model.reward_head(out.hidden_BTD, index_N)


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModel(CausalLM):
    name = "reward"
    label = "reward-model"
    chat = True
    judges = True
    decoder_only = "puts a scalar head on a decoder"
    parents = frozenset({"sft"})
    parent_refusal = "{parent} is not an SFT run (it is a {label} run); a reward model starts from the trunk of a `plutao sft` run"
    scans_layers = True
    batch_keys = ("responses", "reward_index", "rank")
    commands = frozenset({"score", "eval"})

    @property
    def batch_axes(self):
        return dict(AXES)

    def check_command(self, command, run_dir):
        if command not in self.commands:
            raise UserError(f"{run_dir} is a reward model: it scores replies and cannot {command.replace('-', ' ')}; "
                            f"score a reply with `plutao score {run_dir} --prompt P --response R`, or use the SFT run "
                            "it started from")

    def build_model(self, rngs):
        """The decoder (its parameters named as the SFT run's, so they are copied) plus `reward_head`."""
        model = build_model(self.cfg.model, rngs)
        model.reward_head = ScalarHead(self.cfg.model.d_model, rngs)
        return model

    def read(self) -> Data:
        train, val, name = ranking_data(self.cfg)
        texts = [m["content"] for r in train for m in r.prompt + [t for x in r.responses for t in reply_turns(x)]]
        return Data(texts, (train, val), name)

    def batches(self, data, tokenizer):
        train, val = data.payload
        context = self.cfg.model.context_length
        try:
            seqs = [[reward_ids(r.prompt + reply_turns(x), tokenizer, ended=end)
                     for x, end in zip(r.responses, r.meta.get("ended", [True] * len(r.responses)))]
                    for r in train + val]
        except ChatError as e:
            raise UserError(f"{data.names}: {e}") from None
        # Rows as wide as the longest sequence needs (a power of two, at most the context): short
        # ranked replies do not pay for a full context of padding in every step.
        T = prompt_width(max(len(x) for group in seqs for x in group), context)
        enc = [encode_ranking(group, r.ranks, T, tokenizer.pad_id) for group, r in zip(seqs, train + val)]
        enc = enc[:len(train)], enc[len(train):]
        k_max = max(len(r.responses) for r in train + val)
        rows = RankedBatches(*enc, T, self.cfg.train.batch_size, k_max, self.cfg.train.seed, tokenizer.pad_id,
                             data.names)
        pairs = sum(sum(a < b for a in r.ranks for b in r.ranks) for r in train)
        return NamedBatches(rows, self.named, self.batch_axes), (
            f"{len(train):,} ranked prompts ({sum(len(r.responses) for r in train):,} responses, {pairs:,} pairs; "
            f"K up to {k_max})")

    def named(self, rows):
        T = rows.shape[-1] - 2
        return {"responses": rows[..., :T], "reward_index": rows[..., T], "rank": rows[..., T + 1]}

    def sums(self, model, batch, key, *, train, constrain=no_constraint):
        tokens_BKT = batch["responses"]
        B, K, T = tokens_BKT.shape
        out = model(tokens_BKT.reshape(B * K, T), dropout_key=key if train else None, constrain=constrain)
        r_BK = model.reward_head(out.hidden_BTD, batch["reward_index"].reshape(B * K)).reshape(B, K)
        return ranking_loss_sums(r_BK, batch["rank"]) | {"margin": margin_sum(r_BK, batch["rank"])}

    def eval_summary(self, sums):
        pairs = max(sums["pairs"], 1.0)
        return {"loss": sums["loss"] / max(sums["count"], 1.0), "pairwise_accuracy": sums["correct"] / pairs,
                "brier": sums["brier"] / pairs, "margin": sums.get("margin", 0.0) / pairs}

    def val_text(self, val, *, final=False):
        """Pairwise accuracy and the mean reward margin r(better) − r(worse); the ranking loss beside them."""
        return (f"val pairwise accuracy {val['pairwise_accuracy']:.3f}, margin {val['margin']:+.4f} "
                f"(ranking loss {val['loss']:.4f})")

    def val_batches(self, batches, wanted):
        return batches.val_batches(wanted)

    def milestone_sample(self, model, batches, tokenizer, step):
        item = batches.val_items[0]
        r = np.asarray(reward_scores(model, item.tokens, item.reward_index))
        return "rewards of held-out ranking 0 (best first): " + ", ".join(f"{x:+.2f}" for x in r)
