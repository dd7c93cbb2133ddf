"""Optimizers and learning-rate schedules, all from optax."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from plutao.model.config import ModelConfig
from plutao.model.families import param_roles
from plutao.train.config.schema import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr, then cosine/linear decay to cfg.min_lr, constant, or 1/√step."""
    warmup = cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), cfg.min_lr)
    if cfg.schedule == "inverse_sqrt":
        # The original Transformer's d^-0.5·min(step^-0.5, step·warmup^-1.5), scaled so the peak is cfg.lr.
        def inverse_sqrt(step):
            step = jnp.maximum(step, 1).astype(jnp.float32)
            return cfg.lr * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
        return inverse_sqrt
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.min_lr, max(total_steps - warmup, 1))
    else:
        decay = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(cfg: OptimConfig, model: ModelConfig | dict) -> dict:
    """Which parameters weight decay applies to, by role (never by shape: with scanned layers a norm
    scale is 2-D): weight matrices always, embedding tables if optim.decay_embeddings, norms and
    biases never. `model` is a model config, or the roles tree itself (several models)."""
    decayed = ("weight", "embedding") if cfg.decay_embeddings else ("weight",)
    roles = param_roles(model.resolved()) if isinstance(model, ModelConfig) else model
    return jax.tree.map(lambda role: role in decayed, roles)


def make_optimizer(cfg: OptimConfig, total_steps: int, model: ModelConfig | dict,
                   groups: dict[str, OptimConfig] | None = None) -> optax.GradientTransformation:
    """The optimizer of `model`'s parameters (a model config, or the roles tree of several models'
    trainable parameters). `groups` gives some top-level models their own settings (their own
    learning rate, schedule, decay; gradient clipping stays global, from `cfg`)."""
    if groups:
        roles = param_roles(model.resolved()) if isinstance(model, ModelConfig) else model
        settings = {name: groups.get(name, cfg) for name in roles}
        labels = {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in roles.items()}
        inner = {}
        for name, group_cfg in settings.items():
            # Inside multi_transform a group sees the other groups' leaves as MaskedNode: so does its mask.
            group_roles = {n: (tree if n == name else jax.tree.map(lambda _: optax.MaskedNode(), tree))
                           for n, tree in roles.items()}
            inner[name] = _single(dataclasses.replace(group_cfg, grad_clip=0.0), total_steps, group_roles)
        opt = optax.multi_transform(inner, labels)
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt) if cfg.grad_clip > 0 else opt
    return _single(cfg, total_steps, model)


def _single(cfg: OptimConfig, total_steps: int, model: ModelConfig | dict) -> optax.GradientTransformation:
    lr = lr_schedule(cfg, total_steps)
    mask = _mask_with_holes(cfg, model)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, cfg.beta1, cfg.beta2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "lion":
        opt = optax.lion(lr, cfg.beta1, cfg.beta2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        # Without parameter-scale multiplication, optim.lr means an absolute step size, as for Adam.
        opt = optax.adafactor(lr, multiply_by_parameter_scale=False, weight_decay_rate=cfg.weight_decay or None,
                              weight_decay_mask=mask)
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask), optax.sgd(lr, cfg.momentum))
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def _mask_with_holes(cfg: OptimConfig, model: ModelConfig | dict):
    """decay_mask, keeping MaskedNode leaves (another group's parameters) as they are."""
    if isinstance(model, ModelConfig):
        return decay_mask(cfg, model)
    decayed = ("weight", "embedding") if cfg.decay_embeddings else ("weight",)
    return jax.tree.map(lambda role: role in decayed, model)
