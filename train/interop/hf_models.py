"""Hugging Face GPT-2 and Llama checkpoints in plutao's terms: config.json ↔ ModelConfig, and each
parameter ↔ the tensors it is made of.

GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm with biases, tanh-GELU, fused c_attn. Its
Conv1D weights are stored (in, out), as ours are, so c_attn (D, 3D) is our w_qkv (D, 3, H, K).
Llama (`LlamaForCausalLM`): rotary positions in the half-split layout ours uses (no permutation),
RMSNorm, SwiGLU (gate_proj → w_gate, up_proj → w_in, down_proj → w_out), grouped-query attention.
Its Linear weights are stored (out, in) and transposed on the way.

`import_plan` and `export_plan` list, per tensor, a function that builds it from the other side's
tensors one at a time, so neither direction holds a model twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from plutao.model.config import ModelConfig
from plutao.train.config.errors import UserError

ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")
DEFAULT_CONTEXT_CAP = 8192  # a rotary model's context when its config allows more (a KV cache is sized by it)


def architecture(config: dict, where: str) -> str:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    arch = archs[0] if archs else {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}.get(model_type, "")
    if arch not in ARCHITECTURES:
        named = arch or (f"model_type {model_type!r}" if model_type else "no architecture")
        raise UserError(f"{where}: {named} is not supported; plutao imports {' and '.join(ARCHITECTURES)} checkpoints")
    return arch


def _refuse(config: dict, where: str, keys: dict[str, str]) -> None:
    """A one-line error for each setting that is on (true, a window, more than one expert)."""
    for key, what in keys.items():
        value = config.get(key)
        if value is None or value is False or value == [] or value == {}:
            continue
        if type(value) is int and value <= 1 and key != "sliding_window":  # (0 or 1 experts: a dense MLP)
            continue
        raise UserError(f"{where}: {key}={value!r} ({what}) is not supported")


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


def model_config(config: dict, where: str, context: int = 0) -> tuple[str, ModelConfig, list[str]]:
    """(architecture, our config, notes) for a Hugging Face config.json."""
    arch = architecture(config, where)
    notes: list[str] = []
    try:
        if arch == "GPT2LMHeadModel":
            _refuse(config, where, {"add_cross_attention": "cross-attention",
                                    "scale_attn_by_inverse_layer_idx": "per-layer attention scaling"})
            if config.get("scale_attn_weights", True) is False:
                raise UserError(f"{where}: scale_attn_weights=false (unscaled attention) is not supported")
            act = config.get("activation_function", "gelu_new")
            acts = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "relu": "relu"}
            if act not in acts:
                raise UserError(f"{where}: activation_function={act!r} is not supported (plutao's GELU is the tanh "
                                "approximation GPT-2 uses: gelu_new)")
            d = int(config["n_embd"])
            positions = int(config["n_positions"])
            if context and context != positions:
                raise UserError(f"{where}: a GPT-2 model's context is its {positions} learned positions; leave out "
                                "--context-length")
            cfg = ModelConfig(vocab_size=int(config["vocab_size"]), context_length=positions,
                              n_layers=int(config["n_layer"]), d_model=d, n_heads=int(config["n_head"]),
                              d_ff=int(config.get("n_inner") or 4 * d), norm="pre", norm_type="layernorm",
                              positions="learned", activation=acts[act], bias=True,
                              tie_embeddings=bool(config.get("tie_word_embeddings", True)),
                              norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))
        else:
            _refuse(config, where, {"num_local_experts": "mixture of experts", "num_experts": "mixture of experts",
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
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json lacks or garbles {e} for a {arch}; it is not a complete "
                        "transformers config") from None
    problems = cfg.problems()
    if problems:
        raise UserError(f"{where}: {problems[0]}")
    return arch, cfg.resolved(), notes


def hf_config(cfg: ModelConfig, arch: str, specials: dict[str, int | None]) -> dict:
    """config.json for `cfg` as `arch` (the inverse of `model_config`)."""
    cfg = cfg.resolved()
    if arch == "GPT2LMHeadModel":
        return {"architectures": [arch], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.context_length, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new" if cfg.activation == "gelu"
                else "relu", "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "dtype": "float32", **specials}
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "linear":
        rope |= {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope |= {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                 "high_freq_factor": cfg.rope_high_freq_factor, "original_max_position_embeddings":
                 cfg.rope_original_context}
    return {"architectures": [arch], "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head, "hidden_act": "silu",
            "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
            # (both forms: rope_parameters for transformers 5, rope_theta/rope_scaling for the engines and 4.x)
            "rope_parameters": rope, "rope_theta": cfg.rope_theta,
            "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]},
            "attention_bias": cfg.attn_bias, "mlp_bias": cfg.ffn_bias, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": 0.0, "pretraining_tp": 1, "dtype": "float32", **specials}


def export_architecture(cfg: ModelConfig) -> str:
    """The layout a plutao model exports to, or a one-line error naming what neither has."""
    cfg = cfg.resolved()
    gpt2 = {"positions": "learned", "norm_type": "layernorm", "norm": "pre"}
    llama = {"positions": "rotary", "norm_type": "rmsnorm", "norm": "pre", "activation": "swiglu"}
    if cfg.family != "decoder":
        raise UserError(f"a model.family={cfg.family} model has no Hugging Face causal-LM layout; export-hf writes decoders")
    # (GPT-2's biases are written as zeros where a model has none: the same function)
    for arch, want, extra in (("GPT2LMHeadModel", gpt2, not cfg.grouped and cfg.d_head * cfg.n_heads == cfg.d_model
                               and cfg.activation in ("gelu", "relu")),
                              ("LlamaForCausalLM", llama, not cfg.bias or cfg.norm_type == "rmsnorm")):
        if all(getattr(cfg, k) == v for k, v in want.items()) and extra:
            return arch
    have = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("positions", "norm_type", "norm", "activation", "bias"))
    raise UserError(f"this model ({have}) matches neither GPT-2's layout (learned positions, LayerNorm, pre-norm, GELU, "
                    "biases everywhere) nor Llama's (rotary, RMSNorm, pre-norm, SwiGLU, no norm bias); export-hf "
                    "writes those two")


Build = Callable[[Callable[[str], np.ndarray]], np.ndarray]


def import_plan(arch: str, cfg: ModelConfig, names: set[str]) -> dict[tuple, tuple[list[str], Build]]:
    """{our parameter path: (the checkpoint tensors it needs, build(get) → our array)}."""
    H, G, K, D = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
    plan: dict[tuple, tuple[list[str], Build]] = {}

    def same(name):
        return [name], lambda get: get(name)

    def transposed(name):
        return [name], lambda get: get(name).T

    if arch == "GPT2LMHeadModel":
        p = "transformer." if "transformer.wte.weight" in names else ""
        plan[("token_embed",)] = same(f"{p}wte.weight")
        plan[("pos_embed",)] = same(f"{p}wpe.weight")
        for i in range(cfg.n_layers):
            h = f"{p}h.{i}."
            for ours, theirs in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
                plan[("blocks", i, ours, "scale")] = same(f"{h}{theirs}.weight")
                plan[("blocks", i, ours, "bias")] = same(f"{h}{theirs}.bias")
            plan[("blocks", i, "attn", "w_qkv")] = ([f"{h}attn.c_attn.weight"],
                                                    lambda get, h=h: get(f"{h}attn.c_attn.weight").reshape(D, 3, H, K))
            plan[("blocks", i, "attn", "b_qkv")] = ([f"{h}attn.c_attn.bias"],
                                                    lambda get, h=h: get(f"{h}attn.c_attn.bias").reshape(3, H, K))
            plan[("blocks", i, "attn", "w_o")] = ([f"{h}attn.c_proj.weight"],
                                                  lambda get, h=h: get(f"{h}attn.c_proj.weight").reshape(H, K, D))
            plan[("blocks", i, "attn", "b_o")] = same(f"{h}attn.c_proj.bias")
            plan[("blocks", i, "mlp", "w_in")] = same(f"{h}mlp.c_fc.weight")
            plan[("blocks", i, "mlp", "b_in")] = same(f"{h}mlp.c_fc.bias")
            plan[("blocks", i, "mlp", "w_out")] = same(f"{h}mlp.c_proj.weight")
            plan[("blocks", i, "mlp", "b_out")] = same(f"{h}mlp.c_proj.bias")
        plan[("final_norm", "scale")] = same(f"{p}ln_f.weight")
        plan[("final_norm", "bias")] = same(f"{p}ln_f.bias")
        if not cfg.tie_embeddings:
            plan[("lm_head",)] = transposed("lm_head.weight")
        return plan
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


def export_plan(arch: str, cfg: ModelConfig) -> list[tuple[str, Callable[[Callable[[tuple], np.ndarray]], np.ndarray]]]:
    """[(tensor name, make(get) → the tensor from our parameters)] in the order the file holds them."""
    H, G, K, D = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
    out: list = []

    def same(name, path, size=0):  # (size: a bias this model may not have, written as zeros)
        out.append((name, lambda get: get(path) if size == 0 or _has(get, path) else np.zeros(size, np.float32)))

    if arch == "GPT2LMHeadModel":
        same("transformer.wte.weight", ("token_embed",))
        same("transformer.wpe.weight", ("pos_embed",))
        for i in range(cfg.n_layers):
            h, b = f"transformer.h.{i}.", ("blocks", i)
            for ours, theirs in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
                same(f"{h}{theirs}.weight", (*b, ours, "scale"))
                same(f"{h}{theirs}.bias", (*b, ours, "bias"), D)
            out.append((f"{h}attn.c_attn.weight", lambda get, b=b: get((*b, "attn", "w_qkv")).reshape(D, 3 * H * K)))
            same(f"{h}attn.c_attn.bias", (*b, "attn", "b_qkv"), 3 * D)
            out[-1] = (out[-1][0], lambda get, f=out[-1][1]: f(get).reshape(3 * H * K))
            out.append((f"{h}attn.c_proj.weight", lambda get, b=b: get((*b, "attn", "w_o")).reshape(H * K, D)))
            same(f"{h}attn.c_proj.bias", (*b, "attn", "b_o"), D)
            same(f"{h}mlp.c_fc.weight", (*b, "mlp", "w_in"))
            same(f"{h}mlp.c_fc.bias", (*b, "mlp", "b_in"), cfg.d_ff)
            same(f"{h}mlp.c_proj.weight", (*b, "mlp", "w_out"))
            same(f"{h}mlp.c_proj.bias", (*b, "mlp", "b_out"), D)
        same("transformer.ln_f.weight", ("final_norm", "scale"))
        same("transformer.ln_f.bias", ("final_norm", "bias"), D)
    else:
        same("model.embed_tokens.weight", ("token_embed",))
        for i in range(cfg.n_layers):
            a, b = f"model.layers.{i}.", ("blocks", i)
            same(f"{a}input_layernorm.weight", (*b, "norm_attn", "scale"))
            same(f"{a}post_attention_layernorm.weight", (*b, "norm_mlp", "scale"))
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
                same(f"{a}self_attn.o_proj.bias", (*b, "attn", "b_o"))
            for ours, theirs in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj")):
                out.append((f"{a}mlp.{theirs}.weight", lambda get, b=b, ours=ours: get((*b, "mlp", ours)).T))
            if cfg.ffn_bias:
                for ours, theirs, n in (("b_gate", "gate_proj", cfg.d_ff), ("b_in", "up_proj", cfg.d_ff),
                                        ("b_out", "down_proj", D)):
                    same(f"{a}mlp.{theirs}.bias", (*b, "mlp", ours), n)
        same("model.norm.weight", ("final_norm", "scale"))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", lambda get: get(("lm_head",)).T))
    return out


def _has(get, path) -> bool:
    try:
        get(path)
    except KeyError:
        return False
    return True


def exported_config(cfg: ModelConfig) -> ModelConfig:
    """What a model exported as GPT-2 reads back as: biases everywhere (zeros where it had none)."""
    if export_architecture(cfg) == "GPT2LMHeadModel":
        return dataclasses.replace(cfg.resolved(), bias=True, attention_bias="auto", mlp_bias="auto")
    return cfg.resolved()
