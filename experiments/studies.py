"""Built-in studies: the classic Transformer ablations, each one command that fits a CPU budget.

Every study trains a small char-level model on the standard library's docstrings (no download) for a
few hundred steps per trial, 2–3 seeds per variant, about 10–20 minutes on 2 CPU cores. `scale`
multiplies the model width and the number of steps (and the batch) for real hardware: scale=8 is a
d_model-512 model trained 8× longer.
"""

from __future__ import annotations

from plutao.experiments.sweep_spec import SweepSpec
from plutao.train.config.errors import UserError


def _base(scale: float) -> dict:
    width = max(16, round(64 * scale / 16) * 16)
    return {"data.path": "builtin:python-docs", "data.tokenizer": "char", "model.n_layers": 2, "model.d_model": width,
            "model.n_heads": 4, "model.context_length": 64, "train.batch_size": max(8, int(16 * scale)),
            "train.steps": max(20, int(300 * scale)), "train.eval_every": max(10, int(100 * scale)),
            "train.eval_batches": 10, "train.sample_every": 0, "train.checkpoint_every": max(10, int(300 * scale)),
            "optim.lr": 2e-3, "optim.warmup_steps": max(2, int(30 * scale)), "optim.min_lr": 2e-4}


def _study(name: str, scale: float) -> SweepSpec:
    base = _base(scale)
    width = base["model.d_model"]
    studies = {
        "lr-warmup": SweepSpec(grid={"optim.lr": [5e-4, 2e-3, 8e-3], "optim.warmup_steps": [0, int(30 * scale),
                                                                                           int(120 * scale)]},
                               seeds=1),
        "norm-depth": SweepSpec(grid={"model.norm": ["pre", "post"], "model.n_layers": [1, 2, 4]}, seeds=2),
        "positions": SweepSpec(ablations={"learned": {"model.positions": "learned"},
                                          "sinusoidal": {"model.positions": "sinusoidal"},
                                          "rotary": {"model.positions": "rotary"}}, seeds=3),
        "heads": SweepSpec(grid={"model.n_heads": [1, 2, 4, 8]}, seeds=2),
        "activations": SweepSpec(ablations={"relu": {"model.activation": "relu"},
                                            "gelu": {"model.activation": "gelu"},
                                            # SwiGLU has a third matrix: d_ff = 8/3·d keeps the parameters equal.
                                            "swiglu": {"model.activation": "swiglu",
                                                       "model.d_ff": int(8 * width / 3)}}, seeds=3),
        # About equal parameter counts: 2 Transformer layers of width d hold ~2·12·d² weights, 2 LSTM
        # layers of width h ~2·8·h², so h ≈ √1.5·d ≈ 1.22·d. The n-gram is counted, not trained.
        "families": SweepSpec(ablations={"transformer": {},
                                         "lstm": {"model.family": "lstm", "model.d_model": int(width * 1.22),
                                                  "model.n_heads": 1},
                                         "ngram": {"model.family": "ngram", "model.ngram_order": 5}}, seeds=2),
    }
    if name not in studies:
        raise UserError(f"unknown study {name!r}; built-in studies: {', '.join(STUDIES)}")
    spec = studies[name]
    spec.overrides = base | spec.overrides
    spec.name = name
    return spec


STUDIES = ("lr-warmup", "norm-depth", "positions", "heads", "activations", "families")


def study(name: str, scale: float = 1.0) -> SweepSpec:
    if scale <= 0:
        raise UserError(f"scale must be > 0, got {scale}")
    return _study(name, scale)
