"""Open a finished (or running) run directory: its config, tokenizer and trained parameters."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from plutao.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from plutao.tokenizer.chat import template_hash
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, LoRAConfig
from plutao.train.parallel import sharding
from plutao.train.run.checkpoint import Checkpoints, Unreadable
from plutao.train.run.rundir import config_hash, existing_run_config, parse_init_from
from plutao.train.step import Trainer
from plutao.train.tasks import Task, task_class, task_for


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    tokenizer: Tokenizer
    trainer: Trainer
    params: dict | None  # (None when loaded `lazy`: read each with `param`)
    step: int
    task: Task
    _read: object = None

    @property
    def model(self):
        return self.trainer.model(self.params)

    def param(self, path: tuple) -> np.ndarray:
        """One parameter (path in the pure dict, e.g. ("blocks", 0, "attn", "w_o")) as a host array: from
        the loaded parameters, or, loaded `lazy`, read from the checkpoint alone."""
        if self.params is not None:
            node = self.params
            for k in path:
                node = node[k]
            return np.asarray(jax.device_get(node))
        return self._read(path)

    def param_shape(self, path: tuple) -> tuple[int, ...]:
        node = self.trainer.abstract_sharded_state()["params"] if self.params is None else self.params
        for k in path:
            node = node[k]
        return tuple(node.shape)


def load_run(run_dir: Path, step: int | None = None, *, lazy: bool = False) -> LoadedRun:
    """Open a run: its config, tokenizer and parameters. `lazy`: no parameter is read now; `param(path)`
    reads one at a time from the checkpoint (exporting a model never holds it; a LoRA run, whose
    weights are a sum, is loaded whole)."""
    run_dir = Path(run_dir)
    saved = existing_run_config(run_dir)
    cfg = Config.from_dict(saved)
    if not task_class(cfg).trained_by_gradient:
        raise UserError(f"{run_dir} is an n-gram run (a count table, no neural checkpoint); use `plutao eval` or "
                        "`plutao sample` with it")
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    except TokenizerError as e:
        raise UserError(str(e)) from None
    fingerprint = saved.get("provenance", {}).get("tokenizer_fingerprint")
    if fingerprint not in (None, tokenizer.fingerprint):
        raise UserError(f"{run_dir / 'tokenizer'} does not match the tokenizer this run was trained with; restore it")
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"{run_dir}: model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} ids; the run directory is inconsistent")
    mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))
    # Parameters only: no optimizer (and no optimizer state is read from the checkpoint).
    task = task_for(cfg, tokenizer)
    # A run of several models is used through the one it serves (a policy: not its reference or critic).
    trainer = Trainer(cfg.model, None, None, mesh, cfg.train.seed, task=task.served_task())
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir} has no checkpoint yet; train it first (`plutao train --workdir {run_dir}`)")
    checkpoints = Checkpoints(run_dir / "checkpoints", async_save=False, read_only=True)
    steps = checkpoints.all_steps()
    if not steps:
        raise UserError(f"{run_dir} has no checkpoint yet; train it first (`plutao train --workdir {run_dir}`)")
    target = {"params": trainer.abstract_sharded_state()["params"]}
    if task.served_slot:  # (a policy's, or its moving average's, parameters)
        part, slot = task.served_slot
        target = {part: {slot: target["params"]}}
    recorded = saved.get("lineage", {}).get("template_hash")
    if task.chat and recorded not in (None, template_hash(tokenizer)):
        raise UserError(f"{run_dir} was trained with another chat template (hash {recorded}); use the version of plutao "
                        "that trained it")
    if lazy and not trainer.adapted:
        return _lazy_run(run_dir, cfg, tokenizer, trainer, task, checkpoints, steps, step, target)
    if step is None:  # the newest that can be read (an unreadable one is reported, and left as it is)
        step, state, unreadable = checkpoints.restore_newest(target, part=True)
        for bad, reason in unreadable:
            print(f"plutao: checkpoint {bad} of {run_dir} cannot be read ({reason}); using checkpoint {step}",
                  file=sys.stderr)
    elif step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; available: {', '.join(map(str, sorted(steps)))}")
    else:
        try:
            state = checkpoints.restore_part(step, target)
        except Unreadable as e:
            raise UserError(f"checkpoint {step} of {run_dir} cannot be read ({e}); leave out --step to use the "
                            "newest readable one") from None
    checkpoints.close()
    params = state[task.served_slot[0]][task.served_slot[1]] if task.served_slot else state["params"]
    if trainer.adapted:  # adapters in the checkpoint, the base from the run they adapt: used merged
        adapted = {"params": params, "frozen": {"base": lora_base(trainer, saved.get("lineage", {}),
                                                                  tokenizer.fingerprint, cfg.model)}}
        params = nnx.to_pure_dict(nnx.state(trainer.model(adapted), nnx.Param))
        plain = task_for(dataclasses.replace(cfg, lora=LoRAConfig()), tokenizer).served_task()
        trainer = Trainer(cfg.model, None, None, mesh, cfg.train.seed, task=plain)
    return LoadedRun(run_dir, cfg, tokenizer, trainer, params, step, task)


def _lazy_run(run_dir, cfg, tokenizer, trainer, task, checkpoints, steps, step, target) -> LoadedRun:
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; available: {', '.join(map(str, sorted(steps)))}")
    prefix = tuple(task.served_slot) if task.served_slot else ("params",)

    held: dict = {}  # (the group read last: a block's parameters are read together, one block at a time)

    def read(path: tuple) -> np.ndarray:
        group = path[:2] if path[0] == "blocks" else path
        if group not in held:
            held.clear()
            sub = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                               _nested_get_keys(target, prefix + group))
            one: dict = {}
            _nested_set_keys(one, prefix + group, sub)
            try:
                held[group] = _nested_get_keys(checkpoints.restore_part(step, one), prefix + group)
            except Unreadable as e:
                raise UserError(f"checkpoint {step} of {run_dir} cannot be read ({e}); pass --step of a readable one"
                                ) from None
        return np.asarray(jax.device_get(_nested_get_keys(held[group], path[len(group):])))

    return LoadedRun(run_dir, cfg, tokenizer, trainer, None, step, task, read)


def _nested_set_keys(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _nested_get_keys(tree, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


def _nested_set(tree: dict, path, value) -> None:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _leaf_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def init_from_parent(params_target, spec: str, tokenizer_fingerprint: str | None = None, model=None,
                     grown_from: dict | None = None) -> tuple[dict, dict]:
    """The parameters of `params_target` (sharded ShapeDtypeStructs) that run `spec` ("RUN" or "RUN:STEP")
    also has, restored from its checkpoint, and the lineage to record: {"parent", "step", "config_hash",
    "tokenizer_fingerprint", "restored", "fresh"}. A parameter the parent holds with another shape is a
    one-line UserError (the backbones do not match); one it lacks (e.g. a new head) stays to be
    initialised fresh. Only parameters are read: never the parent's optimizer state.

    `grown_from` (train/prepare.py: data.add_specials grew the parent's tokenizer): the parent speaks the
    tokenizer before growth, and every parameter with a vocabulary axis grows along it — the parent's
    rows copied, each added row the mean of the parent's — so the parent's logits on its own ids are
    unchanged until training moves them."""
    parent, step = parse_init_from(spec)
    saved = existing_run_config(parent)
    fingerprint = saved.get("provenance", {}).get("tokenizer_fingerprint")
    parent_family = saved.get("model", {}).get("family", "decoder")
    if model is not None and parent_family != model.family:  # (a model config: the families must agree)
        raise UserError(f"train.init_from={spec}: that run is a model.family={parent_family} model and this one "
                        f"model.family={model.family}; start from a run of the same family")
    parent_vocab, vocab = saved.get("model", {}).get("vocab_size"), model.vocab_size if model is not None else None
    if grown_from is not None:
        if fingerprint not in (None, grown_from["fingerprint"]):
            raise UserError(f"train.init_from={spec}: that run's tokenizer is not the one data.add_specials grew; start "
                            "from the run whose tokenizer this one extends")
        if parent_vocab != grown_from["vocab"][0]:
            raise UserError(f"train.init_from={spec}: that model has {parent_vocab} vocabulary rows for a tokenizer of "
                            f"{grown_from['vocab'][0]} ids; data.add_specials grows only a model whose rows are its "
                            "tokenizer's")
    elif tokenizer_fingerprint and fingerprint not in (None, tokenizer_fingerprint):
        raise UserError(f"train.init_from={spec}: that run's tokenizer differs from this run's; a run started from "
                        "another uses its tokenizer (start in a new --workdir)")
    if not (parent / "checkpoints").is_dir():
        raise UserError(f"train.init_from={spec}: {parent} has no checkpoint yet; train it first")
    checkpoints = Checkpoints(parent / "checkpoints", async_save=False, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise UserError(f"train.init_from={spec}: {parent} has no checkpoint yet; train it first")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"train.init_from={spec}: {parent} has no checkpoint at step {step}; available: "
                            f"{', '.join(map(str, steps))}")
        try:
            recorded = checkpoints.recorded_leaves(step)
        except Unreadable as e:
            raise UserError(f"train.init_from={spec}: checkpoint {step} of {parent} cannot be read ({e})") from None
        shared: dict = {}
        fresh, grows = [], {}  # (grows: leaf name → (path, its axis of the vocabulary, the target leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(params_target)[0]:
            name = _leaf_name(path)
            have = recorded.get(f"params.{name}")
            if have is None:
                fresh.append(name)
                continue
            axis = _grown_axis(have, leaf, parent_vocab, vocab) if grown_from is not None else None
            if axis is not None:
                grows[name] = (path, axis, leaf)
                _nested_set(shared, path, jax.ShapeDtypeStruct(have[0], leaf.dtype,
                                                               sharding=sharding.replicated(leaf.sharding.mesh)))
                continue
            if have != (tuple(leaf.shape), np.dtype(leaf.dtype).name):
                raise UserError(f"train.init_from={spec}: the parent's {name} is {have[0]} {have[1]} but this model's is "
                                f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}; the backbones differ (match the "
                                "parent's model.* settings)")
            _nested_set(shared, path, leaf)
        if not shared:
            raise UserError(f"train.init_from={spec}: this model shares no parameter with {parent}; check model.family")
        try:
            restored = checkpoints.restore_part(step, {"params": shared})["params"]
        except Unreadable as e:
            raise UserError(f"train.init_from={spec}: checkpoint {step} of {parent} cannot be read ({e})") from None
    finally:
        checkpoints.close()
    for name, (path, axis, leaf) in grows.items():
        old = np.asarray(jax.device_get(_nested_get(restored, path)))
        added = np.repeat(old.mean(axis=axis, keepdims=True), leaf.shape[axis] - old.shape[axis], axis=axis)
        _nested_set(restored, path, jax.device_put(np.concatenate([old, added], axis=axis).astype(old.dtype),
                                                   leaf.sharding))
    lineage = {"parent": str(parent.absolute()), "step": step, "config_hash": config_hash(saved),
               "tokenizer_fingerprint": fingerprint, "restored": len(jax.tree.leaves(shared)), "fresh": fresh}
    if grown_from is not None:
        lineage["grown"] = {**grown_from, "parameters": sorted(grows), "new_rows": "the mean of the parent's rows"}
    return restored, lineage


def _grown_axis(have: tuple, leaf, parent_vocab: int | None, vocab: int | None) -> int | None:
    """The axis along which a parent's parameter (shape, dtype) grows into `leaf`: the one axis where
    they differ, holding the parent's vocabulary there and this model's here; None if it does not grow."""
    shape, dtype = have
    if dtype != np.dtype(leaf.dtype).name or len(shape) != len(leaf.shape) or parent_vocab is None:
        return None
    differ = [i for i, (a, b) in enumerate(zip(shape, leaf.shape)) if a != b]
    if len(differ) == 1 and shape[differ[0]] == parent_vocab and leaf.shape[differ[0]] == vocab:
        return differ[0]
    return None


def _nested_get(tree: dict, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", None))]
    return tree


def lora_base(trainer: Trainer, lineage: dict, fingerprint: str | None, model) -> dict:
    """A LoRA run's frozen base, read from the parent checkpoint its lineage names (checkpoints hold the
    adapters only); refused when that parent changed since."""
    spec = f"{lineage['parent']}:{lineage['step']}"
    base, now = init_from_parent(trainer.abstract_sharded_state()["frozen"]["base"], spec, fingerprint, model)
    if lineage.get("config_hash") not in (None, now["config_hash"]):
        raise UserError(f"the base run {lineage['parent']} of this LoRA run was changed since the adapters were "
                        "trained (its config differs); restore it, or merge and retrain")
    return base


def merge_params(params: dict, restored: dict) -> dict:
    """`params` with every leaf that `restored` holds replaced by it."""
    out = jax.tree.map(lambda x: x, params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        _nested_set(out, path, leaf)
    return out
