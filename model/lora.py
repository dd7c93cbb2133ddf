"""Low-rank adapters (LoRA, Hu et al. 2021): a frozen weight W plus a trained (α/r)·A·B.

The adapted projections are named by `lora.targets`: "attention" (q, k, v, o) and "mlp" (up, gate,
down), or any of those seven. A is initialised N(0, 1/fan_in), B at zero, so an adapted model starts
out exactly equal to its base.

The adapters are applied in weight space: the forward pass runs on W + (α/r)·reshape(A·B). Flax's
`nnx.LoRA` wraps a Linear layer's `x @ W` call; our projections are einsums over multi-axis weights
that the attention and MLP code read as arrays (w_qkv is (D, 3, H, K) so tensor parallelism can split
the heads axis), so a call wrapper has nothing to wrap. Adding the low-rank product to the weight is
exact, keeps every projection's code and sharding as it is, and makes merging (`plutao merge-lora`)
the same computation the training used. A and B carry logical axes (sharded like the weight they
adapt) and their own role, so weight decay never touches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.layers import normal_param, zeros_param

# target → (weight name inside a block, which slice of its stacked axis (None = the whole weight),
# input axes, output axes): the weight's shape is input dims + output dims (w_qkv: one part of axis 1).
PROJECTIONS = {
    "q": ("attn", "w_qkv", 0, ("embed",), ("heads", "kv")),
    "k": ("attn", "w_qkv", 1, ("embed",), ("heads", "kv")),
    "v": ("attn", "w_qkv", 2, ("embed",), ("heads", "kv")),
    "o": ("attn", "w_o", None, ("heads", "kv"), ("embed",)),
    "up": ("mlp", "w_in", None, ("embed",), ("mlp",)),
    "gate": ("mlp", "w_gate", None, ("embed",), ("mlp",)),
    "down": ("mlp", "w_out", None, ("mlp",), ("embed",)),
}
GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("up", "gate", "down")}
# Grouped-query attention keeps W^Q (D, H, K) apart from W^{KV} (D, 2, G, K).
GROUPED = {"q": ("attn", "w_q", None, ("embed",), ("heads", "kv")),
           "k": ("attn", "w_kv", 0, ("embed",), ("kv_heads", "kv")),
           "v": ("attn", "w_kv", 1, ("embed",), ("kv_heads", "kv"))}


def projections(model_cfg) -> dict:
    """PROJECTIONS for this model's attention layout."""
    return PROJECTIONS | GROUPED if model_cfg.grouped else PROJECTIONS


def expand_targets(targets) -> tuple[str, ...]:
    """The projections `lora.targets` names, or a one-line ValueError naming the valid ones."""
    out = []
    for t in targets:
        if t not in GROUPS and t not in PROJECTIONS:
            raise ValueError(f"lora.targets: unknown target {t!r}; use attention, mlp, or any of "
                             f"{', '.join(PROJECTIONS)}")
        out += [x for x in GROUPS.get(t, (t,)) if x not in out]
    if not out:
        raise ValueError("lora.targets is empty; name at least one projection (e.g. lora.targets=[attention])")
    return tuple(out)


class Adapters(nnx.Module):
    """A and B for every adapted projection of every block of a decoder."""

    def __init__(self, model_cfg, lora_cfg, rngs: nnx.Rngs):
        self.rank, self.scale = lora_cfg.rank, lora_cfg.alpha / lora_cfg.rank
        d, f, h, k = model_cfg.d_model, model_cfg.d_ff, model_cfg.n_heads, model_cfg.resolved().d_head
        sizes = {"embed": d, "mlp": f, "heads": h, "kv": k, "kv_heads": model_cfg.kv_heads}
        self.projections = projections(model_cfg)
        names = [t for t in expand_targets(lora_cfg.targets) if t != "gate" or model_cfg.activation == "swiglu"]
        self.names = tuple(names)
        self.n_layers = model_cfg.n_layers
        a, b = {}, {}
        r = lora_cfg.rank
        for layer in range(model_cfg.n_layers):
            for t in names:
                _, _, _, ins, outs = self.projections[t]
                key = f"{t}{layer}"
                fan_in = int(np.prod([sizes[x] for x in ins]))
                a[key] = normal_param(rngs, tuple(sizes[x] for x in ins) + (r,), ins + (None,), fan_in ** -0.5,
                                      role="adapter")
                b[key] = zeros_param((r,) + tuple(sizes[x] for x in outs), (None,) + outs, role="adapter")
        self.a, self.b = nnx.Dict(a), nnx.Dict(b)

    def delta(self, key: str) -> jax.Array:
        """(α/r)·A·B shaped like the slice of the weight it adapts."""
        A, B = self.a[key][...], self.b[key][...]
        return self.scale * jnp.tensordot(A, B, axes=1)


def adapted_params(params: dict, adapters: Adapters) -> dict:
    """The base model's parameters (a pure dict) with every adapted weight replaced by W + (α/r)·A·B."""
    out = jax.tree.map(lambda x: x, params)
    for layer in range(adapters.n_layers):
        for t in adapters.names:
            module, weight, part, _, _ = adapters.projections[t]
            block = out["blocks"][layer][module]
            w = block[weight]
            d = adapters.delta(f"{t}{layer}").astype(w.dtype)
            block[weight] = w + d if part is None else w.at[:, part].add(d)
    return out


def with_adapters(base: nnx.Module, adapters: Adapters) -> nnx.Module:
    """A live model whose weights are the base's plus the adapters' (a function of both: gradients reach
    the adapters only through the added products)."""
    graphdef, state = nnx.split(base)
    pure = adapted_params(nnx.to_pure_dict(state), adapters)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)

