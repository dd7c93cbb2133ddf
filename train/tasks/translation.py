"""Translation (encoder-decoder): the decoder predicts target token t+1 from the whole source and the
target tokens ≤ t. One vocabulary for both sides, trained on the training pairs only.

The pair source (train/data/pairs.py) draws rows [source padded to L | <bos> target <eos> padded to L+1];
they become `source` (B, L), `tokens` (B, L: target inputs), `targets` (B, L) and `loss_weights`
(padding carries no loss).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from flax import nnx

from plutao.model.heads import forward_logits
from plutao.model.layers import no_constraint
from plutao.model.sampling import to_host
from plutao.model.seq2seq import greedy_decode, strip
from plutao.train.config.errors import UserError
from plutao.train.data import sources as data_lib
from plutao.train.data.batches import NamedBatches
from plutao.train.data.pairs import PairBatches, encode_pairs, held_out, pack, read_pairs
from plutao.train.eval.translate import translate
from plutao.train.tasks.base import Data, Task


@dataclasses.dataclass(frozen=True, eq=False)
class Translation(Task):
    name = "translation"
    commands = frozenset({"translate", "attention"})
    batch_keys: ClassVar[tuple[str, ...]] = ("source", "tokens", "targets", "loss_weights")

    @classmethod
    def problems(cls, cfg):
        out = super().problems(cfg)
        if cfg.data.weights:
            out.insert(0, "translation data (model.family=encoder_decoder) has no mixture weights; drop data.weights")
        return out

    def read(self) -> Data:
        d = self.cfg.data
        sources = data_lib.source_paths(d)
        pairs = [pair for s in sources for pair in read_pairs(s)]
        if d.val_path:
            train_pairs, val_pairs = pairs, read_pairs(d.val_path, flag="data.val_path")
        else:
            val = [held_out(pair, d.val_fraction) for pair in pairs]
            train_pairs = [q for q, v in zip(pairs, val) if not v]
            val_pairs = [q for q, v in zip(pairs, val) if v]
        val_pairs = list(dict.fromkeys(val_pairs))  # each held-out pair is scored once
        texts = [text for pair in train_pairs for text in pair]
        return Data(iter(texts), (train_pairs, val_pairs), ",".join(sources))

    def batches(self, data: Data, tokenizer):
        train_pairs, val_pairs = data.payload
        rows = PairBatches(encode_pairs(train_pairs, tokenizer), encode_pairs(val_pairs, tokenizer, unseen=True),
                           self.cfg.model.context_length, self.cfg.train.batch_size, self.cfg.train.seed,
                           tokenizer.pad_id, data.names)
        summary = (f"{len(rows.train):,} training and {len(rows.val):,} held-out pairs"
                   + (f" ({rows.dropped:,} longer than the context left out)" if rows.dropped else ""))
        return NamedBatches(rows, self.named, self.batch_axes), summary

    def named(self, rows):
        L = (rows.shape[1] - 1) // 2
        src, tgt = rows[:, :L], rows[:, L:]
        return {"source": src, "tokens": tgt[:, :-1], "targets": tgt[:, 1:],
                "loss_weights": (tgt[:, 1:] != self.ids.pad_id).astype(np.float32)}

    def row_width(self, context):
        return 2 * context + 1

    def sums(self, model, batch, key, *, train, constrain=no_constraint):
        src_BL = batch["source"]
        logits, _ = forward_logits(model, src_BL, src_BL != self.ids.pad_id, batch["tokens"],
                                   dropout_key=key if train else None, constrain=constrain)
        return self.cross_entropy(logits, batch["targets"], batch["loss_weights"], train=train)

    def val_batches(self, batches, wanted):
        """Held-out pairs are a finite set: at most one pass over them, each pair counted once."""
        return min(wanted, batches.val_batches())

    def milestone_sample(self, model, batches, tokenizer, step, n: int = 4):
        """Greedy translations of the first few held-out sources, with their references."""
        val = getattr(batches, "source", batches).val  # (the pair source's held-out pairs, not NamedBatches.val)
        ids = list(range(min(n, len(val))))
        L = self.cfg.model.context_length
        src = pack([val.src[i] for i in ids], [val.tgt[i] for i in ids], L, tokenizer.pad_id)[:, :L]
        graphdef, live = nnx.split(model)
        out, _ = greedy_decode(graphdef, live, src, src != tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                               max_len=L)
        out = to_host(out)
        lines = []
        for row, i in enumerate(ids):
            source = tokenizer.decode(strip(val.src[i], tokenizer.eos_id, tokenizer.pad_id))
            hyp = tokenizer.decode(strip(out[row], tokenizer.eos_id, tokenizer.pad_id))
            ref = tokenizer.decode(strip(val.tgt[i][1:], tokenizer.eos_id, tokenizer.pad_id))
            lines.append(f"{source} → {hyp}   (reference: {ref})")
        return "\n".join(lines)

    def attention_sets(self, model, tokenizer, text, target):
        """Encoder self-, decoder self- and cross-attention for the text and `target` (or the model's
        own greedy translation)."""
        L = self.cfg.model.context_length
        src = tokenizer.encode(text) + [tokenizer.eos_id]
        if len(src) > L:
            raise UserError(f"the source is {len(src)} tokens, longer than model.context_length={L}")
        target = target if target is not None else translate(model, tokenizer, [text], beam_size=1)[0][0][0]
        tgt = ([tokenizer.bos_id] + tokenizer.encode(target))[:L]
        src_a, tgt_a = np.array([src], np.int32), np.array([tgt], np.int32)
        weights = model(src_a, src_a != tokenizer.pad_id, tgt_a, return_weights=True).weights
        src_s, tgt_s = tokenizer.token_strings(src), tokenizer.token_strings(tgt)
        return {"encoder-self": ([to_host(w)[0] for w in weights["encoder-self"]], src_s, src_s),
                "decoder-self": ([to_host(w)[0] for w in weights["decoder-self"]], tgt_s, tgt_s),
                "cross": ([to_host(w)[0] for w in weights["cross"]], tgt_s, src_s)}
