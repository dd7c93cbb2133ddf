"""Llama (`LlamaForCausalLM`) in plutao's terms: rotary positions in the half-split layout ours uses
(no permutation), RMSNorm, SwiGLU (gate_proj → w_gate, up_proj → w_in, down_proj → w_out), grouped-query
attention, optional attention and MLP biases. Its Linear weights are stored (out, in) and transposed on
the way. Both config forms are read: rope_theta + rope_scaling, and rope_parameters."""

from __future__ import annotations

from typing import Any

import numpy as np

from plutao.model.config import ModelConfig
from plutao.train.config.errors import UserError
from plutao.train.interop.hf_layout import Exports, refuse, same, transposed

ARCH, NAME = "LlamaForCausalLM", "Llama"
MODEL_TYPE = "llama"
SHAPE = "rotary positions, RMSNorm, pre-norm, SwiGLU"
DEFAULT_CONTEXT_CAP = 8192  # a rotary model's context when its config allows more (a KV cache is sized by it)


def _rope(config: dict, where: str) -> dict[str, Any]:
    """Rotary settings from the old (rope_theta + rope_scaling) or the new (rope_parameters) form."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in ("default", None):
        return out
    if kind == "linear":
        return out | {"rope_scaling": "linear", "rope_factor": float(merged["factor"])}
    if kind == "llama3":
        return out | {"rope_scaling": "llama3", "rope_factor": float(merged["factor"]),
                      "rope_low_freq_factor": float(merged.get("low_freq_factor", 1.0)),
                      "rope_high_freq_factor": float(merged.get("high_freq_factor", 4.0)),
                      "rope_original_context": int(merged.get("original_max_position_embeddings", 8192))}
    raise UserError(f"{where}: rope scaling type {kind!r} is not supported (plutao implements default, linear and "
                    "llama3)")



def read_config(config: dict, where: str, context: int) -> tuple[ModelConfig, list[str]]:
    notes: list[str] = []
    refuse(config, where, {"num_local_experts": "mixture of experts", "num_experts": "mixture of experts",
                            "sliding_window": "sliding-window attention",
                            "layer_types": "per-layer attention types"})
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={config['hidden_act']!r} is not supported (Llama's MLP is SwiGLU: silu)")
    d, h = int(config["hidden_size"]), int(config["num_attention_heads"])
    most = int(config.get("max_position_embeddings", 2048))
    length = context or min(most, DEFAULT_CONTEXT_CAP)
    if not context and most > DEFAULT_CONTEXT_CAP:
        notes.append(f"context {length} of the {most} positions the model allows (set --context-length to "
                     "use more: the KV cache grows with it)")
    cfg = ModelConfig(vocab_size=int(config["vocab_size"]), context_length=length,
                      n_layers=int(config["num_hidden_layers"]), d_model=d, n_heads=h,
                      n_kv_heads=int(config.get("num_key_value_heads") or h),
                      d_head=int(config.get("head_dim") or d // h), d_ff=int(config["intermediate_size"]),
                      norm="pre", norm_type="rmsnorm", positions="rotary", activation="swiglu", bias=False,
                      attention_bias="on" if config.get("attention_bias") else "off",
                      mlp_bias="on" if config.get("mlp_bias") else "off",
                      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                      norm_eps=float(config.get("rms_norm_eps", 1e-6)), **_rope(config, where))
    return cfg, notes


def write_config(cfg: ModelConfig, specials: dict) -> dict:
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "linear":
        rope |= {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope |= {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                 "high_freq_factor": cfg.rope_high_freq_factor, "original_max_position_embeddings":
                 cfg.rope_original_context}
    return {"architectures": [ARCH], "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head, "hidden_act": "silu",
            "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
            # (both forms: rope_parameters for transformers 5, rope_theta/rope_scaling for the engines and 4.x)
            "rope_parameters": rope, "rope_theta": cfg.rope_theta,
            "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]},
            "attention_bias": cfg.attn_bias, "mlp_bias": cfg.ffn_bias, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": 0.0, "pretraining_tp": 1, "dtype": "float32", **specials}


def fits(cfg: ModelConfig) -> bool:
    return (cfg.positions == "rotary" and cfg.norm_type == "rmsnorm" and cfg.norm == "pre"
            and cfg.activation == "swiglu")


def import_plan(cfg: ModelConfig, names: set[str]) -> dict:
    H, G, K, D = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
    plan: dict = {}
    plan[("token_embed",)] = same("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        a = f"model.layers.{i}."
        q, k, v, o = (f"{a}self_attn.{x}_proj" for x in "qkvo")
        plan[("blocks", i, "norm_attn", "scale")] = same(f"{a}input_layernorm.weight")
        plan[("blocks", i, "norm_mlp", "scale")] = same(f"{a}post_attention_layernorm.weight")
        if cfg.grouped:
            plan[("blocks", i, "attn", "w_q")] = ([f"{q}.weight"], lambda get, q=q: get(f"{q}.weight").T.reshape(D, H, K))
            plan[("blocks", i, "attn", "w_kv")] = ([f"{k}.weight", f"{v}.weight"], lambda get, k=k, v=v: np.stack(
                [get(f"{k}.weight").T.reshape(D, G, K), get(f"{v}.weight").T.reshape(D, G, K)], axis=1))
            if cfg.attn_bias:
                plan[("blocks", i, "attn", "b_q")] = ([f"{q}.bias"], lambda get, q=q: get(f"{q}.bias").reshape(H, K))
                plan[("blocks", i, "attn", "b_kv")] = ([f"{k}.bias", f"{v}.bias"], lambda get, k=k, v=v: np.stack(
                    [get(f"{k}.bias").reshape(G, K), get(f"{v}.bias").reshape(G, K)]))
        else:
            plan[("blocks", i, "attn", "w_qkv")] = ([f"{x}.weight" for x in (q, k, v)], lambda get, q=q, k=k, v=v: np.stack(
                [get(f"{x}.weight").T.reshape(D, H, K) for x in (q, k, v)], axis=1))
            if cfg.attn_bias:
                plan[("blocks", i, "attn", "b_qkv")] = ([f"{x}.bias" for x in (q, k, v)], lambda get, q=q, k=k, v=v:
                                                        np.stack([get(f"{x}.bias").reshape(H, K) for x in (q, k, v)]))
        plan[("blocks", i, "attn", "w_o")] = ([f"{o}.weight"], lambda get, o=o: get(f"{o}.weight").T.reshape(H, K, D))
        if cfg.attn_bias:
            plan[("blocks", i, "attn", "b_o")] = same(f"{o}.bias")
        for ours, theirs in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj")):
            plan[("blocks", i, "mlp", ours)] = transposed(f"{a}mlp.{theirs}.weight")
        if cfg.ffn_bias:
            for ours, theirs in (("b_gate", "gate_proj"), ("b_in", "up_proj"), ("b_out", "down_proj")):
                plan[("blocks", i, "mlp", ours)] = same(f"{a}mlp.{theirs}.bias")
    plan[("final_norm", "scale")] = same("model.norm.weight")
    if not cfg.tie_embeddings:
        plan[("lm_head",)] = transposed("lm_head.weight")
    return plan


def export_plan(cfg: ModelConfig) -> Exports:
    H, G, K, D = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
    out = Exports()
    out.same("model.embed_tokens.weight", ("token_embed",))
    for i in range(cfg.n_layers):
        a, b = f"model.layers.{i}.", ("blocks", i)
        out.same(f"{a}input_layernorm.weight", (*b, "norm_attn", "scale"))
        out.same(f"{a}post_attention_layernorm.weight", (*b, "norm_mlp", "scale"))
        if cfg.grouped:
            out.append((f"{a}self_attn.q_proj.weight", lambda get, b=b: get((*b, "attn", "w_q")).reshape(D, H * K).T))
            for j, x in enumerate("kv"):
                out.append((f"{a}self_attn.{x}_proj.weight",
                            lambda get, b=b, j=j: get((*b, "attn", "w_kv"))[:, j].reshape(D, G * K).T))
            if cfg.attn_bias:
                out.append((f"{a}self_attn.q_proj.bias", lambda get, b=b: get((*b, "attn", "b_q")).reshape(H * K)))
                for j, x in enumerate("kv"):
                    out.append((f"{a}self_attn.{x}_proj.bias",
                                lambda get, b=b, j=j: get((*b, "attn", "b_kv"))[j].reshape(G * K)))
        else:
            for j, x in enumerate("qkv"):
                out.append((f"{a}self_attn.{x}_proj.weight",
                            lambda get, b=b, j=j: get((*b, "attn", "w_qkv"))[:, j].reshape(D, H * K).T))
            if cfg.attn_bias:
                for j, x in enumerate("qkv"):
                    out.append((f"{a}self_attn.{x}_proj.bias",
                                lambda get, b=b, j=j: get((*b, "attn", "b_qkv"))[j].reshape(H * K)))
        out.append((f"{a}self_attn.o_proj.weight", lambda get, b=b: get((*b, "attn", "w_o")).reshape(H * K, D).T))
        if cfg.attn_bias:
            out.same(f"{a}self_attn.o_proj.bias", (*b, "attn", "b_o"))
        for ours, theirs in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj")):
            out.append((f"{a}mlp.{theirs}.weight", lambda get, b=b, ours=ours: get((*b, "mlp", ours)).T))
        if cfg.ffn_bias:
            for ours, theirs, n in (("b_gate", "gate_proj", cfg.d_ff), ("b_in", "up_proj", cfg.d_ff),
                                    ("b_out", "down_proj", D)):
                out.same(f"{a}mlp.{theirs}.bias", (*b, "mlp", ours), n)
    out.same("model.norm.weight", ("final_norm", "scale"))
    if not cfg.tie_embeddings:
        out.add("lm_head.weight", lambda get: get(("lm_head",)).T)
    return out
