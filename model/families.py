"""One entry point from a ModelConfig to its module: the three Transformer families and the
recurrent baselines (the n-gram model is counted, not trained by gradient: model/baselines/ngram.py)."""

from __future__ import annotations

import jax
from flax import nnx

from plutao.model.baselines.rnn import RecurrentLM
from plutao.model.bert import BERT
from plutao.model.config import ModelConfig
from plutao.model.encoder_decoder import EncoderDecoder
from plutao.model.gpt import GPT

TRANSFORMERS = ("decoder", "encoder_decoder", "encoder")
RECURRENT = ("lstm", "gru", "rnn")


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.family == "decoder":
        return GPT(cfg, rngs)
    if cfg.family == "encoder_decoder":
        return EncoderDecoder(cfg, rngs)
    if cfg.family == "encoder":
        return BERT(cfg, rngs)
    if cfg.family in RECURRENT:
        return RecurrentLM(cfg, rngs)
    raise ValueError(f"model.family={cfg.family} has no neural module; it is trained by counting")


def param_roles(cfg: ModelConfig) -> dict:
    """The `role` of every parameter ("weight", "embedding", "bias", "norm"), as a pure nested dict
    shaped like the parameters; computed from abstract shapes (nothing is allocated)."""
    state = nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param)
    roles = jax.tree.map(lambda var: var.get_metadata()["role"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(roles)
