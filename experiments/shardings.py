"""`plutao shardings`: the resolved PartitionSpec of every parameter and key activation.

Computed on an abstract mesh from abstract shapes: no devices and no memory are needed, so a dump
for 64 or 4096 devices runs anywhere. Checked-in goldens (tests/goldens/) catch accidental changes
to the axis table or to the model's axis names.
"""

from __future__ import annotations

import json

import jax
from jax.sharding import PartitionSpec

from plutao.model.counts import abstract_params
from plutao.train.config.schema import Config
from plutao.train.parallel import sharding


def _spec_list(spec: PartitionSpec) -> list:
    return [list(p) if isinstance(p, tuple) else p for p in spec]


def sharding_dump(cfg: Config, n_devices: int) -> dict:
    model = cfg.shaped_model()
    mesh = sharding.abstract_mesh(cfg.mesh, n_devices)
    specs = sharding.param_specs(abstract_params(model), mesh)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): _spec_list(spec)
            for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))}
    B, T = cfg.train.batch_size, model.context_length
    shapes = {"x_BTD (embeddings, block outputs)": (B, T, model.d_model),
              "q/k/v_BTHK": (B, T, model.n_heads, model.d_head), "mlp hidden_NF": (B * T, model.d_ff),
              "logits_BTV": (B, T, model.vocab_size), "k/v_BTGK": (B, T, model.kv_heads, model.d_head)}
    axes_of = sharding.ACTIVATION_AXES | (sharding.GROUPED_ACTIVATION_AXES if model.grouped else {})
    acts = {name: _spec_list(sharding.logical_to_spec(axes, mesh, shapes[name])) for name, axes in axes_of.items()}
    return {"mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)), "params": dict(sorted(flat.items())),
            "activations": acts, "batch": _spec_list(sharding.logical_to_spec(("batch", "length"), mesh, (B, T)))}


def dumps(d: dict) -> str:
    """JSON with one tensor per line, so a golden's diff names exactly what moved."""
    lines = ["{", f' "mesh": {json.dumps(d["mesh"])},', f' "batch": {json.dumps(d["batch"])},', ' "activations": {']
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in d["activations"].items()]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" },", ' "params": {']
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in d["params"].items()]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"
