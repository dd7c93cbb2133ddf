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
from plutao.model.lora import with_adapters
from plutao.train.data import batches as batches_lib
from plutao.train.parallel import sharding
from plutao.train.tasks import Task, task_for_model
from plutao.train.tasks.base import ModelSlot

DROPOUT, EVAL_MASKS = 1, 2  # purpose tags folded into keys
CHECKPOINTED = ("params", "opt_state", "step")  # the parts of the state a checkpoint holds


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about a run's step functions."""

    model_cfg: ModelConfig
    tx: optax.GradientTransformation | None  # None: parameters only (inference: nothing to optimize)
    schedule: Any
    mesh: Mesh
    seed: int
    grad_accum: int = 1
    # What the steps compute from a named batch (train/tasks/); None = the model family's task with
    # default settings (next-token prediction without label smoothing, for a decoder).
    task: Task | None = None
    # A step whose loss or gradient norm is NaN/inf changes neither parameters nor optimizer state.
    # "skip": training goes on (the steps are counted); "stop": every later step is a no-op too,
    # so the state stays the last good one while the loop notices and stops.
    on_nonfinite: str = "stop"

    @functools.cached_property
    def active_task(self) -> Task:
        """The task the steps compute (`task`, or the model family's default one)."""
        return self.task or task_for_model(self.model_cfg)

    @functools.cached_property
    def slots(self) -> dict[str, ModelSlot]:
        """The named models of the state (train/tasks/base.py: ModelSlot)."""
        return self.active_task.model_slots()

    @functools.cached_property
    def single(self) -> bool:
        """One trainable model: the state holds its parameters directly, exactly as checkpoints always have."""
        return list(self.slots) == ["model"] and self.slots["model"].trainable

    @functools.cached_property
    def trainable(self) -> tuple[str, ...]:
        return tuple(n for n, slot in self.slots.items() if slot.trainable)

    @functools.cached_property
    def frozen_names(self) -> tuple[str, ...]:
        return tuple(n for n, slot in self.slots.items() if not slot.trainable)

    @functools.cached_property
    def checkpointed(self) -> tuple[str, ...]:
        """The parts of the state a checkpoint holds (frozen models too, so a run resumes without its
        parents; but not a LoRA run's base, which its lineage names)."""
        saved = [self.slots[n].saved for n in self.frozen_names]
        assert all(saved) or not any(saved), "frozen models are all saved or none"
        return CHECKPOINTED + (("frozen",) if any(saved) else ())

    @functools.cached_property
    def adapted(self) -> bool:
        """A LoRA run: a frozen base and trainable adapters, seen by the task as one model."""
        return "lora" in self.slots

    def _build(self, seed):
        """The module (one model), or an `Ensemble` whose attributes are the named models."""
        if self.single:
            return self.slots["model"].build(nnx.Rngs(seed))
        key = jax.random.key(seed) if isinstance(seed, int) else seed
        return Ensemble({n: slot.build(nnx.Rngs(jax.random.fold_in(key, i)))
                         for i, (n, slot) in enumerate(self.slots.items())})

    def _split_params(self, params: dict) -> tuple[dict, dict | None]:
        """All models' parameters → (trainable, frozen); one model: (its parameters, None)."""
        if self.single:
            return params, None
        return ({n: params[n] for n in self.trainable}, {n: params[n] for n in self.frozen_names})

    def _modules(self, params, frozen=None):
        """Live modules: the model, or {name: module} for several (frozen ones from `frozen`)."""
        if self.single:
            return nnx.merge(self.graphdef, params)
        live = nnx.merge(self.graphdef, {**params, **(frozen or {})})
        if self.adapted:
            return with_adapters(live.base, live.lora)
        return {n: getattr(live, n) for n in self.slots}

    @functools.cached_property
    def constrain(self):
        return sharding.activation_constraint(self.mesh)

    @functools.cached_property
    def graphdef(self):
        return nnx.split(nnx.eval_shape(lambda: self._build(0)))[0]

    def _init(self, seed) -> dict:
        params, frozen = self._split_params(nnx.to_pure_dict(nnx.state(self._build(jax.random.key(seed)), nnx.Param)))
        # The optimizer sees the trainable parameters only: frozen models have no optimizer state.
        opt_state = self.tx.init(params) if self.tx is not None else optax.EmptyState()
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
                 "health": initial_health()}
        if frozen:
            state["frozen"] = frozen
        return state

    @functools.cached_property
    def abstract_state(self):
        return jax.eval_shape(self._init, jnp.int32(0))

    @functools.cached_property
    def state_shardings(self):
        abstract_model = nnx.eval_shape(lambda: self._build(0))
        params_sh, frozen_sh = self._split_params(sharding.param_shardings(nnx.state(abstract_model, nnx.Param),
                                                                           self.mesh))
        repl = sharding.replicated(self.mesh)
        abs_params = self.abstract_state["params"]
        # Optimizer moments shaped like a parameter are sharded like it; everything else is replicated.
        # (Per-model settings hold each other's parameters as MaskedNode: those stay as they are.)
        opt_sh = optax.EmptyState() if self.tx is None else optax.tree_map_params(
            self.tx, lambda s, sh, p: s if isinstance(s, optax.MaskedNode) else (sh if s.shape == p.shape else repl),
            self.abstract_state["opt_state"], params_sh, abs_params, transform_non_params=lambda _: repl,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        out = {"params": params_sh, "opt_state": opt_sh, "step": repl, "health": {k: repl for k in initial_health()}}
        if frozen_sh:
            out["frozen"] = frozen_sh
        return out

    def init_state(self) -> dict:
        return jax.jit(self._init, out_shardings=self.state_shardings)(jnp.int32(self.seed))

    def abstract_sharded_state(self):
        """ShapeDtypeStructs with shardings, of the whole state (what `plan` compiles against)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def checkpoint_target(self):
        """The restore target for checkpoints: the checkpointed parts of the abstract sharded state."""
        return {k: v for k, v in self.abstract_sharded_state().items() if k in self.checkpointed}

    def inference_params(self, state: dict):
        """What `eval_step` and `model` take: the parameters (one model), or {"params", "frozen"}."""
        return state["params"] if self.single else {"params": state["params"], "frozen": state.get("frozen", {})}

    def resumed_state(self, restored: dict, nonfinite_steps: int = 0) -> dict:
        """A restored checkpoint made a full state again (the health counters live in its metadata)."""
        health = jax.device_put(initial_health(nonfinite_steps), sharding.replicated(self.mesh))
        return {**restored, "health": health}

    # --- the steps -------------------------------------------------------------------------------

    def _loss_sum(self, params, batch, key, frozen=None):
        sums = self.active_task.sums(self._modules(params, frozen), batch, key, train=True, constrain=self.constrain)
        return sums["loss"], sums

    # The seed is an argument, not a constant baked into the program: runs that differ only by seed
    # share one compiled executable (and the persistent compilation cache across a sweep's trials).
    def _train_step(self, state, batch, seed):
        step = state["step"]
        frozen = state.get("frozen")  # (no gradient is taken with respect to frozen models)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT), step)
        grad_fn = jax.value_and_grad(self._loss_sum, has_aux=True)
        A = self.grad_accum
        if A == 1:
            (_, sums), grads = grad_fn(state["params"], batch, key, frozen)
        else:
            # Sum the gradients of summed losses over micro-batches, then divide once by the total
            # token count: exactly the gradient of the mean loss over the whole batch.
            # Micro-batch i takes rows i, i+A, i+2A, ...: every micro-batch is spread over all
            # data-parallel devices instead of living on 1/A of them.
            micro_A = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, xs):
                i, micro = xs
                (_, sums), g = grad_fn(state["params"], micro, jax.random.fold_in(key, i), frozen)
                return jax.tree.map(jnp.add, carry, (g, sums)), None

            (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, state["params"],
                                                          jax.tree.map(lambda x: x[0], micro_A), key, frozen)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (grads_shape, sums_shape))
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(A), micro_A))
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
        for name in self.active_task.step_metrics:
            metrics[name] = sums[name] / denom
        new = {"params": params, "opt_state": opt_state, "step": step + 1, "health": health}
        if frozen is not None:
            new["frozen"] = frozen
        return new, metrics

    def _train_block(self, state, batches, n, seed):
        """Steps 1..n (n ≤ the block's slots) of `batches`, one after another in one program: the same
        step as `_train_step`, so k steps per dispatch give bit-for-bit the states of k dispatches.
        Returns the last step's metrics."""
        def one(i, carry):
            return self._train_step(carry[0], jax.tree.map(lambda x: x[i], batches), seed)

        first = jax.tree.map(lambda x: x[0], batches)
        metrics = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(self._train_step, state, first,
                                                                                    seed)[1])
        return jax.lax.fori_loop(0, n, one, (state, metrics))

    def _eval_step(self, params, batch, index, seed):
        """Summed plain cross-entropy (no smoothing, no dropout) and its token count (and, for the
        masked LM, correct predictions). Evaluation batch `index` always draws the same masks, and
        each batch its own."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVAL_MASKS), index)
        modules = self._modules(params) if self.single else self._modules(params["params"], params["frozen"])
        return self.active_task.sums(modules, batch, key, train=False, constrain=self.constrain)

    @functools.cached_property
    def batch_shardings(self) -> dict:
        """Each batch key's sharding, from the task's logical axes."""
        return batches_lib.shardings(self.active_task.batch_axes, self.mesh)

    @functools.cached_property
    def train_step(self):
        repl = sharding.replicated(self.mesh)
        step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings, repl),
                       out_shardings=(self.state_shardings, repl), donate_argnums=0)
        return SeededStep(step, np.int32(self.seed), self.active_task.named)

    @functools.cached_property
    def train_block(self):
        """`train_block(state, batches, n)`: n steps in one dispatch, over named batches stacked on a
        leading axis (train/data/batches.py: sharded_stack)."""
        repl = sharding.replicated(self.mesh)
        step = jax.jit(self._train_block, donate_argnums=0, out_shardings=(self.state_shardings, repl),
                       in_shardings=(self.state_shardings, batches_lib.stacked_shardings(self.active_task.batch_axes,
                                                                                         self.mesh), repl, repl))
        return SeededStep(step, np.int32(self.seed))

    @functools.cached_property
    def eval_step(self):
        repl = sharding.replicated(self.mesh)
        params_sh = self.inference_params(self.state_shardings)
        step = jax.jit(self._eval_step, in_shardings=(params_sh, self.batch_shardings, repl, repl), out_shardings=repl)
        return SeededStep(step, np.int32(self.seed), self.active_task.named)

    @functools.cached_property
    def split(self) -> sharding.SplitReport:
        """Which parameters FSDP and tensor parallelism split on this mesh, and which stay whole."""
        abstract_model = nnx.eval_shape(lambda: self._build(0))
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

    def model(self, params):
        """A live module over these parameters (for sampling and inspection outside the hot path); with
        several models, {name: module} over `inference_params(state)`."""
        return self._modules(params) if self.single else self._modules(params["params"], params["frozen"])

    def param_roles(self) -> dict:
        """The `role` of every trainable parameter, shaped like state["params"] (for weight decay)."""
        state = nnx.state(nnx.eval_shape(lambda: self._build(0)), nnx.Param)
        roles = jax.tree.map(lambda v: v.get_metadata()["role"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return self._split_params(nnx.to_pure_dict(roles))[0]


class Ensemble(nnx.Module):
    """Several named models as one module: its state is {name: that model's state}, so the sharding
    table, roles and checkpoints treat them like one model's parameters."""

    def __init__(self, models: dict[str, nnx.Module]):
        for name, model in models.items():
            setattr(self, name, model)


@dataclasses.dataclass(frozen=True)
class SeededStep:
    """A jitted step with the run's seed bound as its last (traced) argument. Its batch (the second
    argument) is a dict of named arrays; rows as a data source draws them (one int array) are named
    by the task first."""

    jitted: Any
    seed: np.ndarray
    named: Any = None

    def _args(self, args):
        if self.named is not None and len(args) > 1 and not isinstance(args[1], dict):
            args = (args[0], self.named(args[1]), *args[2:])
        return (*args, self.seed)

    def __call__(self, *args):
        return self.jitted(*self._args(args))

    def lower(self, *args):
        return self.jitted.lower(*self._args(args))


def initial_health(nonfinite_steps: int = 0) -> dict:
    """Counters the step keeps: non-finite steps so far, and the first one (1-based; 0 = none yet)."""
    return {"nonfinite_steps": jnp.int32(nonfinite_steps), "first_nonfinite": jnp.int32(0)}


def global_batch(tokens, mesh: Mesh):
    """Place a whole (B, W) row array held by this (single) process with the batch sharding (the
    step names it by its task)."""
    return jax.device_put(tokens, sharding.batch_sharding(mesh))
