"""The device mesh and the one table that maps semantic axis names to mesh axes.

Model code names axes (`embed`, `heads`, `mlp`, ...); only `LOGICAL_AXIS_RULES` decides where they
live. With the default mesh (every device on `data`) parameters are replicated and the batch is
split across devices: plain data parallelism.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from plutao.train.config import MeshConfig
from plutao.train.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations: the global batch is split over both data-parallel axes
    "length": None,
    "embed": "fsdp",  # parameters: FSDP shards the model dimension
    "vocab": "tensor",
    "heads": "tensor",  # Megatron: attention heads and the MLP hidden dimension split over `tensor`
    "mlp": "tensor",
    "kv": None,
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise UserError(f"only one of mesh.{', mesh.'.join(free)} may be -1 (= the remaining devices)")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise UserError(f"mesh sizes must be positive or -1, got {sizes}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if n_devices % fixed:
            raise UserError(f"{n_devices} devices cannot be split into mesh {sizes}; make the fixed sizes divide {n_devices}")
        sizes[free[0]] = n_devices // fixed
    if int(np.prod(list(sizes.values()))) != n_devices:
        raise UserError(f"mesh data×fsdp×tensor = {sizes} multiplies to {int(np.prod(list(sizes.values())))}, "
                        f"but there are {n_devices} devices; set one of them to -1")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry these semantic names (size-1 mesh axes dropped)."""
    out = []
    used: set[str] = set()
    for name in axes:
        rule = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        targets = (rule,) if isinstance(rule, str) else tuple(rule or ())
        targets = tuple(t for t in targets if mesh.shape[t] > 1 and t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def param_shardings(abstract_state, mesh: Mesh):
    """A NamedSharding for every parameter, from its `axes` metadata through the table."""
    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(tuple(axes), mesh))

    return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
