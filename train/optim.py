"""Optimizers and learning-rate schedules, all from optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from plutao.model.config import ModelConfig
from plutao.model.families import param_roles
from plutao.train.config import OptimConfig


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


def decay_mask(cfg: OptimConfig, model: ModelConfig) -> dict:
    """Which parameters weight decay applies to, by role (never by shape: with scanned layers a norm
    scale is 2-D): weight matrices always, embedding tables if optim.decay_embeddings, norms and
    biases never."""
    decayed = ("weight", "embedding") if cfg.decay_embeddings else ("weight",)
    return jax.tree.map(lambda role: role in decayed, param_roles(model.resolved()))


def make_optimizer(cfg: OptimConfig, total_steps: int, model: ModelConfig) -> optax.GradientTransformation:
    lr = lr_schedule(cfg, total_steps)
    mask = decay_mask(cfg, model)
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
