"""The n-gram baseline: counted, not trained by gradient (model/baselines/ngram.py). It reads and
splits its corpus like the causal LM, and has no mesh, optimizer or step functions."""

from __future__ import annotations

import dataclasses

from plutao.train.tasks.causal_lm import CausalLM


@dataclasses.dataclass(frozen=True, eq=False)
class NGram(CausalLM):
    name = "ngram"
    trained_by_gradient = False
    has_attention = False
    scans_layers = False
    commands = frozenset({"sample"})

    @classmethod
    def problems(cls, cfg):
        out = super().problems(cfg)
        if cfg.train.init_from:
            out.append("train.init_from copies neural parameters; an n-gram model is counted (drop train.init_from)")
        if cfg.model.ngram_order < 1:
            out.append(f"model.ngram_order must be ≥ 1, got {cfg.model.ngram_order}")
        return out

    def batches(self, data, tokenizer):
        rows = self.row_source(data, tokenizer)
        return rows, f"{sum(len(s.train) for s in rows.splits):,} training tokens"

    def build_model(self, rngs):
        raise TypeError("an n-gram model is a count table (train/ngram_run.py), not a neural module")
