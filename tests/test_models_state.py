"""Several models in one training state: frozen models stay bit-identical and have no optimizer
state; per-model optimizer settings; one model keeps the checkpoint layout it always had."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plutao.model.config import ModelConfig
from plutao.model.heads import forward_logits
from plutao.train.config.schema import MeshConfig, OptimConfig
from plutao.train.optim import lr_schedule, make_optimizer
from plutao.train.parallel.sharding import make_mesh
from plutao.train.run.checkpoint import Checkpoints
from plutao.train.step import Trainer
from plutao.train.tasks import task_for_model
from plutao.train.tasks.base import ModelSlot
from plutao.train.tasks.causal_lm import CausalLM

CFG = ModelConfig(vocab_size=32, context_length=8, n_layers=1, d_model=16, n_heads=2).resolved()


@dataclasses.dataclass(frozen=True, eq=False)
class KLToReference(CausalLM):
    """Cross-entropy of a policy plus its KL divergence from a frozen reference (what RL from a
    reward model regularises with): both models are read inside the step."""

    second_trainable: bool = False

    def model_slots(self):
        return {"policy": ModelSlot(self.build_model), "reference": ModelSlot(self.build_model, self.second_trainable)}

    def sums(self, models, batch, key, *, train, constrain=None):
        logits, _ = forward_logits(models["policy"], batch["tokens"])
        ref_logits, _ = forward_logits(models["reference"], batch["tokens"])
        out = self.cross_entropy(logits, batch["targets"], None, train=train)
        logp, ref_logp = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
        kl = jnp.sum(jnp.exp(logp) * (logp - ref_logp))
        return out | {"loss": out["loss"] + kl}


def trainer_for(task, optim=None, groups=None, steps=10):
    optim = optim or OptimConfig(lr=1e-2, warmup_steps=0)
    mesh = make_mesh(MeshConfig())
    roles = Trainer(CFG, None, None, mesh, 0, task=task).param_roles()
    return Trainer(CFG, make_optimizer(optim, steps, roles, groups), lr_schedule(optim, steps), mesh, 0, task=task)


def batch(step):
    return np.random.default_rng(step).integers(11, 32, (4, 9)).astype(np.int32)


def run(trainer, steps=10):
    state = trainer.init_state()
    start = jax.device_get(state)
    for step in range(steps):
        state, _ = trainer.train_step(state, batch(step))
    return start, jax.device_get(state)


def test_a_frozen_model_is_bit_identical_after_ten_steps_and_has_no_optimizer_state():
    task = KLToReference(task_for_model(CFG).cfg)
    trainer = trainer_for(task)
    start, end = run(trainer)
    assert set(end["params"]) == {"policy"} and set(end["frozen"]) == {"reference"}
    for a, b in zip(jax.tree.leaves(start["frozen"]), jax.tree.leaves(end["frozen"])):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(end["params"]))]
    assert all(moved)
    # AdamW keeps two moments per trainable parameter, and nothing for the frozen reference.
    policy_size = sum(x.size for x in jax.tree.leaves(end["params"]))
    opt_size = sum(x.size for x in jax.tree.leaves(end["opt_state"]) if x.ndim)
    assert opt_size == 2 * policy_size
    # The two models start from different initialisations (each slot its own key).
    assert not np.array_equal(start["params"]["policy"]["token_embed"], start["frozen"]["reference"]["token_embed"])


def test_several_models_checkpoint_and_restore_with_the_frozen_ones(tmp_path):
    trainer = trainer_for(KLToReference(task_for_model(CFG).cfg))
    state = trainer.init_state()
    state, _ = trainer.train_step(state, batch(0))
    ckpt = Checkpoints(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, {k: state[k] for k in trainer.checkpointed})
    ckpt.close()
    restored = Checkpoints(tmp_path / "checkpoints", read_only=True).restore(1, trainer.checkpoint_target())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({k: state[k] for k in trainer.checkpointed})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_trainable_model_can_have_its_own_optimizer_settings():
    task = KLToReference(task_for_model(CFG).cfg, second_trainable=True)
    still = OptimConfig(lr=0.0, warmup_steps=0, weight_decay=0.0)
    trainer = trainer_for(task, groups={"reference": still})
    start, end = run(trainer, steps=3)
    assert set(end["params"]) == {"policy", "reference"} and "frozen" not in end
    for a, b in zip(jax.tree.leaves(start["params"]["reference"]), jax.tree.leaves(end["params"]["reference"])):
        np.testing.assert_array_equal(a, b)  # lr 0 and no decay: not moved, though trained
    assert not np.array_equal(start["params"]["policy"]["token_embed"], end["params"]["policy"]["token_embed"])


def test_weight_decay_by_role_reaches_every_model_of_the_state():
    task = KLToReference(task_for_model(CFG).cfg, second_trainable=True)
    decayed = OptimConfig(lr=0.0, warmup_steps=0, weight_decay=0.5, name="sgd", momentum=0.0, schedule="constant")
    trainer = trainer_for(task, optim=decayed, groups={"reference": dataclasses.replace(decayed, lr=1.0)})
    roles = trainer.param_roles()
    grads = jax.tree.map(jnp.zeros_like, trainer.abstract_state["params"])
    params = jax.tree.map(jnp.ones_like, trainer.abstract_state["params"])
    updates, _ = trainer.tx.update(grads, trainer.tx.init(params), params)
    flat_u, flat_r = jax.tree.leaves(updates["reference"]), jax.tree.leaves(roles["reference"])
    for u, role in zip(flat_u, flat_r):
        assert (float(jnp.abs(u).max()) > 0) == (role in ("weight", "embedding")), role  # lr 1: decayed by role
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["policy"]))  # lr 0 group


def test_one_model_keeps_the_checkpoint_layout_it_always_had():
    trainer = Trainer(CFG, optax.adamw(1e-3), lr_schedule(OptimConfig(), 10), make_mesh(MeshConfig()), 0)
    assert trainer.single and trainer.checkpointed == ("params", "opt_state", "step")
    assert set(trainer.checkpoint_target()) == {"params", "opt_state", "step"}
    assert "token_embed" in trainer.abstract_state["params"]  # the model's own parameters, not nested by name
