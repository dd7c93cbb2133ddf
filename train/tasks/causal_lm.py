"""Causal language modelling: predict token t+1 from the tokens ≤ t (GPT, and the recurrent baselines).

A data-source row of T+1 tokens becomes `tokens` (the first T) and `targets` (the last T); every
target counts. Milestone samples continue train.sample_prompt from <|endoftext|>.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from plutao.model.decode import generate
from plutao.model.heads import forward_logits
from plutao.model.layers import no_constraint
from plutao.model.sampling import SamplingConfig, to_host
from plutao.train.config.errors import UserError
from plutao.train.data import sources as data_lib
from plutao.train.data.batches import NamedBatches
from plutao.train.eval.likelihood import stream_metrics
from plutao.train.tasks.base import Data, Task

# A recurrent model has no context limit: `plutao eval` lets it carry its state across long windows.
RECURRENT_EVAL_WINDOW = 512


def restart_positions(starts_BT: np.ndarray) -> np.ndarray:
    """(B, T) int32 positions counting from 0 again at every True of starts_BT (a segment's first token)."""
    index_BT = np.broadcast_to(np.arange(starts_BT.shape[1]), starts_BT.shape)
    return (index_BT - np.maximum.accumulate(np.where(starts_BT, index_BT, 0), axis=1)).astype(np.int32)


def document_segments(tokens_BT: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) of packed rows: each <|endoftext|> starts a new segment, where positions
    restart at 0."""
    starts_BT = tokens_BT == eot_id
    return (np.cumsum(starts_BT, axis=1) + 1).astype(np.int32), restart_positions(starts_BT)


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM(Task):
    name = "causal_lm"
    label = "base (causal LM)"
    scans_layers = True
    commands = frozenset({"sample", "score", "attention"})

    def read(self) -> Data:
        sources = data_lib.source_paths(self.cfg.data)
        docs_per_source = [data_lib.read_documents(s, self.cfg.data, world=self.cfg.world) for s in sources]
        return Data(data_lib.training_texts(self.cfg.data, docs_per_source), docs_per_source, ",".join(sources))

    def row_source(self, data: Data, tokenizer) -> data_lib.Batches:
        splits = data_lib.load_splits(self.cfg.data, data.payload, tokenizer, self.cfg.world)
        return data_lib.Batches(splits, self.cfg.data.weights, self.cfg.model.context_length,
                                self.cfg.train.batch_size, self.cfg.train.seed)

    def batches(self, data: Data, tokenizer):
        rows = self.row_source(data, tokenizer)
        return NamedBatches(rows, self.named, self.batch_axes), f"{sum(len(s.train) for s in rows.splits):,} training tokens"

    @property
    def separates_documents(self) -> bool:
        return self.cfg.data.separate_documents

    def named(self, rows):
        return self.with_segments({"tokens": rows[:, :-1], "targets": rows[:, 1:]})

    def with_segments(self, batch):
        """With data.separate_documents: each <|endoftext|> starts a new segment (the document it
        precedes), and positions restart there, so no token attends across a document boundary."""
        if not self.separates_documents:
            return batch
        segment_ids, positions = document_segments(batch["tokens"], self.ids.eot_id)
        return batch | {"segment_ids": segment_ids, "positions": positions}

    def segments_of(self, batch) -> dict:
        return ({"segment_ids_BT": batch["segment_ids"], "positions_BT": batch["positions"]}
                if "segment_ids" in batch else {})

    def sums(self, model, batch, key, *, train, constrain=no_constraint):
        logits, _ = forward_logits(model, batch["tokens"], dropout_key=key if train else None, constrain=constrain,
                                   **self.segments_of(batch))
        return self.cross_entropy(logits, batch["targets"], batch.get("loss_weights"), train=train)

    def milestone_sample(self, model, batches, tokenizer, step):
        t = self.cfg.train
        prompt = [tokenizer.eot_id] + tokenizer.encode(t.sample_prompt)
        sampling = SamplingConfig(temperature=0.8, max_new_tokens=t.sample_tokens, seed=t.seed * 1_000_003 + step,
                                  stop_at_eot=False)
        ids = generate(model, [prompt[-self.cfg.model.context_length:]], sampling, eot_id=tokenizer.eot_id,
                       pad_id=tokenizer.pad_id)[0]
        return t.sample_prompt + tokenizer.decode(ids)

    def eval_stream(self, run, tokens):
        return stream_metrics(run.trainer.graphdef, run.params, tokens, self.eval_context(), run.tokenizer)

    def eval_line(self, r, step):
        return (f"{r['data']}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}, "
                f"{r['bits_per_char']:.4f} bits/char, {r['bits_per_byte']:.4f} bits/byte "
                f"({r['tokens']:,} tokens, step {step})")

    def attention_sets(self, model, tokenizer, text, target):
        """Self-attention over <|endoftext|> + the text."""
        seq = self.attention_input(tokenizer, text)
        weights = model(np.array([seq], np.int32), return_weights=True).weights
        strings = tokenizer.token_strings(seq)
        return {"self": ([to_host(w)[0] for w in weights], strings, strings)}

    def attention_input(self, tokenizer, text) -> list[int]:
        seq = [tokenizer.eot_id] + tokenizer.encode(text)
        if len(seq) > self.cfg.model.context_length:
            raise UserError(f"the text is {len(seq)} tokens, longer than model.context_length={self.cfg.model.context_length}")
        return seq


@dataclasses.dataclass(frozen=True, eq=False)
class RecurrentLM(CausalLM):
    """The same objective over an LSTM/GRU/Elman RNN (model/baselines/rnn.py): no attention to inspect,
    and no trained context limit when scoring text."""

    name = "recurrent_lm"
    has_attention = False
    scans_layers = False
    commands = frozenset({"sample", "score"})

    def eval_context(self):
        return RECURRENT_EVAL_WINDOW
