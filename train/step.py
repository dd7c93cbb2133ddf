"""The training state and the jitted train/eval steps: pure functions of (state, batch).

The NNX graph is split once: `graphdef` is static, `params` a plain pytree. Inside the step the
module is rebuilt by `nnx.merge` at trace time only, so a step is one XLA program with no Python
per call. State is created directly with its target sharding (parameters are never materialised
whole on one device) and donated to the step, so it is updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from plutao.model.config import ModelConfig
from plutao.model.families import build_model
from plutao.train import sharding
from plutao.train.objectives import Objective

DROPOUT, EVAL_MASKS = 1, 2  # purpose tags folded into keys
CHECKPOINTED = ("params", "opt_state", "step")  # the parts of the state a checkpoint holds


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about a run's step functions."""

    model_cfg: ModelConfig
    tx: optax.GradientTransformation
    schedule: Any
    mesh: Mesh
    seed: int
    grad_accum: int = 1
    objective: Objective | None = None  # None = next-token prediction without label smoothing
    # A step whose loss or gradient norm is NaN/inf changes neither parameters nor optimizer state.
    # "skip": training goes on (the steps are counted); "stop": every later step is a no-op too,
    # so the state stays the last good one while the loop notices and stops.
    on_nonfinite: str = "stop"

    @functools.cached_property
    def _objective(self) -> Objective:
        return self.objective or Objective(self.model_cfg.family)

    @functools.cached_property
    def constrain(self):
        return sharding.activation_constraint(self.mesh)

    @functools.cached_property
    def graphdef(self):
        return nnx.split(nnx.eval_shape(lambda: build_model(self.model_cfg, nnx.Rngs(0))))[0]

    def _init(self, seed) -> dict:
        params = nnx.to_pure_dict(nnx.state(build_model(self.model_cfg, nnx.Rngs(jax.random.key(seed))), nnx.Param))
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
                "health": initial_health()}

    @functools.cached_property
    def abstract_state(self):
        return jax.eval_shape(self._init, jnp.int32(0))

    @functools.cached_property
    def state_shardings(self):
        abstract_model = nnx.eval_shape(lambda: build_model(self.model_cfg, nnx.Rngs(0)))
        params_sh = sharding.param_shardings(nnx.state(abstract_model, nnx.Param), self.mesh)
        repl = sharding.replicated(self.mesh)
        abs_params = self.abstract_state["params"]
        # Optimizer moments shaped like a parameter are sharded like it; everything else is replicated.
        opt_sh = optax.tree_map_params(
            self.tx, lambda s, sh, p: sh if s.shape == p.shape else repl, self.abstract_state["opt_state"],
            params_sh, abs_params, transform_non_params=lambda _: repl)
        return {"params": params_sh, "opt_state": opt_sh, "step": repl, "health": {k: repl for k in initial_health()}}

    def init_state(self) -> dict:
        return jax.jit(self._init, out_shardings=self.state_shardings)(jnp.int32(self.seed))

    def abstract_sharded_state(self):
        """ShapeDtypeStructs with shardings, of the whole state (what `plan` compiles against)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def checkpoint_target(self):
        """The restore target for checkpoints: the checkpointed parts of the abstract sharded state."""
        return {k: v for k, v in self.abstract_sharded_state().items() if k in CHECKPOINTED}

    def resumed_state(self, restored: dict, nonfinite_steps: int = 0) -> dict:
        """A restored checkpoint made a full state again (the health counters live in its metadata)."""
        health = jax.device_put(initial_health(nonfinite_steps), sharding.replicated(self.mesh))
        return {**restored, "health": health}

    # --- the steps -------------------------------------------------------------------------------

    def _loss_sum(self, params, tokens_BT1, key):
        sums = self._objective.sums(nnx.merge(self.graphdef, params), tokens_BT1, key, train=True,
                                    constrain=self.constrain)
        return sums["loss"], sums

    # The seed is an argument, not a constant baked into the program: runs that differ only by seed
    # share one compiled executable (and the persistent compilation cache across a sweep's trials).
    def _train_step(self, state, tokens_BT1, seed):
        step = state["step"]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT), step)
        grad_fn = jax.value_and_grad(self._loss_sum, has_aux=True)
        A = self.grad_accum
        if A == 1:
            (_, sums), grads = grad_fn(state["params"], tokens_BT1, key)
        else:
            # Sum the gradients of summed losses over micro-batches, then divide once by the total
            # token count: exactly the gradient of the mean loss over the whole batch.
            # Micro-batch i takes rows i, i+A, i+2A, ...: every micro-batch is spread over all
            # data-parallel devices instead of living on 1/A of them.
            micro_ABT1 = tokens_BT1.reshape(tokens_BT1.shape[0] // A, A, *tokens_BT1.shape[1:]).swapaxes(0, 1)

            def accumulate(carry, xs):
                i, micro = xs
                (_, sums), g = grad_fn(state["params"], micro, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (g, sums)), None

            (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, state["params"], micro_ABT1[0], key)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (grads_shape, sums_shape))
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(A), micro_ABT1))
        denom = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss, grad_norm = sums["loss"] / denom, optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Detected inside the program: the host learns of it with the metrics it fetches anyway.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        health = state["health"]
        apply = finite if self.on_nonfinite == "skip" else finite & (health["nonfinite_steps"] == 0)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                         (params, opt_state), (state["params"], state["opt_state"]))
        health = {"nonfinite_steps": health["nonfinite_steps"] + (~finite).astype(jnp.int32),
                  "first_nonfinite": jnp.where(~finite & (health["first_nonfinite"] == 0), step + 1,
                                               health["first_nonfinite"])}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(step), **health}
        if "nll" in sums:  # with label smoothing: the plain cross-entropy beside the smoothed loss
            metrics["loss_unsmoothed"] = sums["nll"] / denom
        return {"params": params, "opt_state": opt_state, "step": step + 1, "health": health}, metrics

    def _eval_step(self, params, tokens_BT1, index, seed):
        """Summed plain cross-entropy (no smoothing, no dropout) and its token count (and, for the
        masked LM, correct predictions). Evaluation batch `index` always draws the same masks, and
        each batch its own."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVAL_MASKS), index)
        return self._objective.sums(nnx.merge(self.graphdef, params), tokens_BT1, key, train=False,
                                    constrain=self.constrain)

    @functools.cached_property
    def train_step(self):
        batch_sh = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)
        step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh, repl),
                       out_shardings=(self.state_shardings, repl), donate_argnums=0)
        return SeededStep(step, np.int32(self.seed))

    @functools.cached_property
    def eval_step(self):
        batch_sh = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)
        step = jax.jit(self._eval_step, in_shardings=(self.state_shardings["params"], batch_sh, repl, repl),
                       out_shardings=repl)
        return SeededStep(step, np.int32(self.seed))

    @functools.cached_property
    def split(self) -> sharding.SplitReport:
        """Which parameters FSDP and tensor parallelism split on this mesh, and which stay whole."""
        abstract_model = nnx.eval_shape(lambda: build_model(self.model_cfg, nnx.Rngs(0)))
        return sharding.split_report(nnx.state(abstract_model, nnx.Param), self.mesh)

    @functools.cached_property
    def moments_per_param(self) -> int:
        """Optimizer-state tensors shaped like each parameter (AdamW: 2), for memory accounting."""
        params = jax.tree.leaves(self.abstract_state["params"])
        shapes = {p.shape for p in params if p.ndim}
        moments = [s for s in jax.tree.leaves(self.abstract_state["opt_state"]) if s.ndim and s.shape in shapes]
        return round(len(moments) / max(len(params), 1))

    @functools.cached_property
    def params_finite(self):
        """Whether every parameter is finite (one bool, computed on the devices)."""
        return jax.jit(lambda params: jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])))

    def model(self, params) -> nnx.Module:
        """A live module over these parameters (for sampling and inspection outside the hot path)."""
        return nnx.merge(self.graphdef, params)


@dataclasses.dataclass(frozen=True)
class SeededStep:
    """A jitted step with the run's seed bound as its last (traced) argument."""

    jitted: Any
    seed: np.ndarray

    def __call__(self, *args):
        return self.jitted(*args, self.seed)

    def lower(self, *args):
        return self.jitted.lower(*args, self.seed)


def initial_health(nonfinite_steps: int = 0) -> dict:
    """Counters the step keeps: non-finite steps so far, and the first one (1-based; 0 = none yet)."""
    return {"nonfinite_steps": jnp.int32(nonfinite_steps), "first_nonfinite": jnp.int32(0)}


def global_batch(tokens, mesh: Mesh):
    """Place a whole (B, T+1) batch held by this (single) process with the batch sharding."""
    return jax.device_put(tokens, sharding.batch_sharding(mesh))


def sharded_batch(draw_rows, shape: tuple[int, int], mesh: Mesh):
    """The global batch, built from the rows each local device holds: `draw_rows(slice)` is called
    once per distinct row range this process needs, never for rows only other processes hold."""
    drawn: dict[tuple, np.ndarray] = {}

    def rows_for(index):
        rows = index[0]
        key = rows.indices(shape[0])
        if key not in drawn:
            drawn[key] = draw_rows(rows)
        return drawn[key][:, index[1]]

    return jax.make_array_from_callback(shape, sharding.batch_sharding(mesh), rows_for)
