"""GPT-2 (`GPT2LMHeadModel`) in plutao's terms: learned positions, pre-norm LayerNorm with biases,
tanh-GELU, a fused c_attn. Its Conv1D weights are stored (in, out), as ours are, so c_attn (D, 3D) is
our w_qkv (D, 3, H, K). A plutao model without biases exports as GPT-2 with zero biases (the same
function)."""

from __future__ import annotations

from plutao.model.config import ModelConfig
from plutao.train.config.errors import UserError
from plutao.train.interop.hf_layout import Exports, refuse, same, transposed

ARCH, NAME = "GPT2LMHeadModel", "GPT-2"
MODEL_TYPE = "gpt2"
SHAPE = "learned positions, LayerNorm, pre-norm, GELU or ReLU, one key/value head per query head"


def read_config(config: dict, where: str, context: int) -> tuple[ModelConfig, list[str]]:
    refuse(config, where, {"add_cross_attention": "cross-attention",
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
    return cfg, []


def write_config(cfg: ModelConfig, specials: dict) -> dict:
    return {"architectures": [ARCH], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new" if cfg.activation == "gelu"
            else "relu", "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "dtype": "float32", **specials}


def fits(cfg: ModelConfig) -> bool:
    return (cfg.positions == "learned" and cfg.norm_type == "layernorm" and cfg.norm == "pre"
            and cfg.activation in ("gelu", "relu") and not cfg.grouped and cfg.d_head * cfg.n_heads == cfg.d_model)


def import_plan(cfg: ModelConfig, names: set[str]) -> dict:
    H, K, D = cfg.n_heads, cfg.d_head, cfg.d_model
    plan: dict = {}
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


def export_plan(cfg: ModelConfig) -> Exports:
    H, K, D = cfg.n_heads, cfg.d_head, cfg.d_model
    out = Exports()
    out.same("transformer.wte.weight", ("token_embed",))
    out.same("transformer.wpe.weight", ("pos_embed",))
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", ("blocks", i)
        for ours, theirs in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
            out.same(f"{h}{theirs}.weight", (*b, ours, "scale"))
            out.same(f"{h}{theirs}.bias", (*b, ours, "bias"), D)
        out.append((f"{h}attn.c_attn.weight", lambda get, b=b: get((*b, "attn", "w_qkv")).reshape(D, 3 * H * K)))
        out.same(f"{h}attn.c_attn.bias", (*b, "attn", "b_qkv"), 3 * D)
        out[-1] = (out[-1][0], lambda get, f=out[-1][1]: f(get).reshape(3 * H * K))
        out.append((f"{h}attn.c_proj.weight", lambda get, b=b: get((*b, "attn", "w_o")).reshape(H * K, D)))
        out.same(f"{h}attn.c_proj.bias", (*b, "attn", "b_o"), D)
        out.same(f"{h}mlp.c_fc.weight", (*b, "mlp", "w_in"))
        out.same(f"{h}mlp.c_fc.bias", (*b, "mlp", "b_in"), cfg.d_ff)
        out.same(f"{h}mlp.c_proj.weight", (*b, "mlp", "w_out"))
        out.same(f"{h}mlp.c_proj.bias", (*b, "mlp", "b_out"), D)
    out.same("transformer.ln_f.weight", ("final_norm", "scale"))
    out.same("transformer.ln_f.bias", ("final_norm", "bias"), D)
    if not cfg.tie_embeddings:
        out.add("lm_head.weight", lambda get: get(("lm_head",)).T)
    return out
