"""The device mesh and the one table that maps semantic axis names to mesh axes.

Model code names axes (`embed`, `heads`, `mlp`, ...) on parameters and activations; only
`LOGICAL_AXIS_RULES` decides where they live:

- data parallelism: the global batch is split over `data` and `fsdp`;
- FSDP: parameters (and so the optimizer moments, which follow them) are split along `embed` over
  `fsdp`, and XLA gathers each weight where it is used;
- tensor parallelism (Megatron): attention heads and the MLP hidden dimension are split over
  `tensor`, so W^Q/W^K/W^V and the MLP input are column-parallel and W^O and the MLP output are
  row-parallel (one reduction per sub-layer).

Activations are pinned with sharding constraints at the model's seams (embeddings, each block's
output, q/k/v, the MLP hidden layer, logits); everything between them is left to XLA's sharding
propagation. Constraints rather than explicit-sharding mode keep the model code free of mesh
types, and let the same model run unsharded (no mesh at all) in sampling and tests.

A mesh axis is used at most once per tensor, and never for a dimension it does not divide (that
dimension is then replicated): a character vocabulary of 76 stays whole under tensor=8, while
heads that do not divide are refused up front by `check_divisibility`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from plutao.model.config import ModelConfig
from plutao.train.config.errors import UserError
from plutao.train.config.schema import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),  # grouped-query attention's key/value heads (whole when tensor does not divide them)
    "mlp": ("tensor",),
    "kv": (),
    "layers": (),
}

# The activations the model pins, with their semantic axes (also written to the sharding dumps).
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "x_BTD (embeddings, block outputs)": ("batch", "length", "act_embed"),
    "q/k/v_BTHK": ("batch", "length", "heads", "kv"),
    "mlp hidden_NF": ("batch", "mlp"),
    "logits_BTV": ("batch", "length", "vocab"),
}
# Grouped-query attention's keys and values (only in models with fewer key/value heads).
GROUPED_ACTIVATION_AXES = {"k/v_BTGK": ("batch", "length", "kv_heads", "kv")}
# Activations keep the model dimension whole: FSDP's axis is already spent on the batch.
LOGICAL_AXIS_RULES["act_embed"] = ()


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes for n devices. `mesh.data=0` (the default) takes the remaining devices unless another
    axis was given -1 explicitly, which then wins (data becomes 1)."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    if sizes["data"] == 0:
        sizes["data"] = 1 if -1 in (cfg.fsdp, cfg.tensor) else -1
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise UserError(f"only one of mesh.{', mesh.'.join(free)} may be -1 (= the remaining devices)")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise UserError(f"mesh sizes must be positive or -1 (mesh.data may also be 0), got "
                        f"{ {'data': cfg.data, 'fsdp': cfg.fsdp, 'tensor': cfg.tensor} }")
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


def abstract_mesh(cfg: MeshConfig, n_devices: int) -> AbstractMesh:
    """A mesh of the right shape without devices: enough to resolve PartitionSpecs."""
    sizes = mesh_shape(cfg, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def check_divisibility(model: ModelConfig, mesh, batch_size: int, grad_accum: int = 1) -> None:
    """User errors for shapes the mesh cannot split, raised before anything is compiled."""
    tensor, dp = mesh.shape["tensor"], mesh.shape["data"] * mesh.shape["fsdp"]
    if model.n_heads % tensor:
        raise UserError(f"model.n_heads={model.n_heads} is not divisible by mesh.tensor={tensor}; "
                        "choose a tensor size that divides the number of heads")
    if model.resolved().d_ff % tensor:
        raise UserError(f"model.d_ff={model.resolved().d_ff} is not divisible by mesh.tensor={tensor}")
    micro = batch_size // grad_accum
    if micro % dp:
        raise UserError(f"the micro-batch of {micro} sequences (train.batch_size / train.grad_accum) is not "
                        f"divisible by the {dp} data-parallel devices (mesh.data × mesh.fsdp); change one of them")


def logical_to_spec(axes: tuple[str | None, ...], mesh, shape: tuple[int, ...] | None = None) -> PartitionSpec:
    """The PartitionSpec for a tensor whose dimensions carry these semantic names."""
    out, used = [], set()
    for i, name in enumerate(axes):
        targets = []
        size = 1
        for t in LOGICAL_AXIS_RULES.get(name, ()) if name else ():
            n = mesh.shape[t]
            if n == 1 or t in used or (shape is not None and shape[i] % (size * n)):
                continue
            targets.append(t)
            size *= n
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else tuple(targets))
    return PartitionSpec(*out)


def param_specs(abstract_state, mesh) -> dict:
    """A PartitionSpec for every parameter (pure nested dict), from its `axes` metadata."""
    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return logical_to_spec(tuple(axes), mesh, var.shape)

    return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


# The config key behind each parameter dimension a mesh axis splits (for messages).
AXIS_KEYS = {"embed": "model.d_model", "heads": "model.n_heads", "kv_heads": "model.n_kv_heads", "mlp": "model.d_ff", "vocab": "the vocabulary size"}
SHARDING_AXES = ("fsdp", "tensor")  # mesh axes that split parameters (data only splits the batch)


@dataclasses.dataclass(frozen=True)
class Whole:
    """A parameter a mesh axis would split, held whole on every device because the axis does not divide it."""

    name: str
    mesh_axis: str
    logical: str
    dim: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class SplitReport:
    """What FSDP and tensor parallelism do to the parameters on this mesh."""

    mesh_sizes: dict[str, int]
    split: dict[str, int]  # mesh axis -> parameter tensors it splits
    whole: list[Whole]
    n_params: int

    def wasted_bytes(self, moments: int = 0) -> int:
        """Bytes per device the whole tensors take beyond their split size (with `moments` optimizer
        moments shaped like each parameter)."""
        return int(sum(w.nbytes * (1 - 1 / self.mesh_sizes[w.mesh_axis]) for w in self.whole) * (1 + moments))

    def check(self) -> None:
        """A mesh axis that splits no parameter at all is a user error naming the dimension and the sizes
        that would divide it."""
        for axis in SHARDING_AXES:
            n = self.mesh_sizes[axis]
            if n == 1 or self.split[axis]:
                continue
            blocked = [w for w in self.whole if w.mesh_axis == axis]
            if not blocked:
                raise UserError(f"mesh.{axis}={n} splits no parameter of this model; set mesh.{axis}=1")
            logical = max({w.logical for w in blocked}, key=lambda a: sum(w.nbytes for w in blocked if w.logical == a))
            dim = max((w for w in blocked if w.logical == logical), key=lambda w: w.nbytes).dim
            total = int(np.prod(list(self.mesh_sizes.values())))
            fits = [k for k in range(2, total + 1) if dim % k == 0 and total % k == 0]
            choice = (f"mesh.{axis} sizes that divide both {dim} and the {total} devices: "
                      f"{', '.join(map(str, fits))}" if fits else f"no mesh.{axis} > 1 divides both {dim} and the "
                      f"{total} devices")
            raise UserError(f"mesh.{axis}={n} would shard no parameter: the {logical!r} dimension "
                            f"({AXIS_KEYS.get(logical, logical)}={dim}) is not a multiple of {n}, so every parameter "
                            f"would stay whole on every device; {choice}, or choose {AXIS_KEYS.get(logical, logical)} "
                            f"divisible by {n}")

    def note(self, moments: int = 0) -> str | None:
        """One line on the parameters that stay whole, or None when every split applies."""
        if not self.whole:
            return None
        names = sorted({w.name for w in self.whole})
        reasons = sorted({f"{w.logical} {w.dim} is not a multiple of mesh.{w.mesh_axis}={self.mesh_sizes[w.mesh_axis]}"
                          for w in self.whole})
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return (f"sharding: {len(names)} of {self.n_params} parameter tensors stay whole on every device "
                f"({'; '.join(reasons)}): {shown}; that costs {_mib(self.wasted_bytes(moments))} per device "
                f"more than split" + (" (with the optimizer moments)" if moments else ""))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def split_report(abstract_state, mesh) -> SplitReport:
    """For each parameter and each mesh axis that splits parameters: split, or held whole because the
    axis does not divide the dimension it would split."""
    sizes = dict(mesh.shape)
    split = {a: 0 for a in SHARDING_AXES}
    whole: list[Whole] = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, var in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = tuple(var.get_metadata().get("axes") or (None,) * len(var.shape))
        spec = logical_to_spec(axes, mesh, var.shape)
        used = {t for part in spec if part for t in ((part,) if isinstance(part, str) else part)}
        for axis in SHARDING_AXES:
            if sizes[axis] == 1:
                continue
            if axis in used:
                split[axis] += 1
                continue
            # Dimensions this axis would split, and none of them divisible by it.
            wanted = [(i, a) for i, a in enumerate(axes) if a and axis in LOGICAL_AXIS_RULES.get(a, ())]
            if wanted and all(var.shape[i] % sizes[axis] for i, _ in wanted):
                i, logical = wanted[0]
                nbytes = int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
                whole.append(Whole(name, axis, logical, int(var.shape[i]), nbytes))
    return SplitReport(sizes, split, whole, len(leaves))


def param_shardings(abstract_state, mesh: Mesh) -> dict:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(abstract_state, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def activation_constraint(mesh: Mesh):
    """The function the model calls at its seams: pin x to the sharding its axis names resolve to."""
    def constrain(x, axes):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, mesh, x.shape)))

    return constrain


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

