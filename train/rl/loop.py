"""The loop of learning from rollouts (`plutao ppo`, `plutao grpo`): sample → score → update, per RL step.

RL step k:
1. sample: the prompts of step k (train/rl/rollouts.py: PromptSource) answered by the policy with the
   jitted KV-cache sampler, each row from its own seed (a pure function of run seed, k and row);
2. score: one jitted forward pass of policy, reference, value and reward models over the rollout
   (train/tasks/policy.py: score); the reward is the reward model's score or the gold checker;
3. advantages on the host (the task: PPO's GAE over KL-shaped rewards, GRPO's group baselines);
4. update: rl.epochs passes over the batch in rl.minibatches optimizer steps (each a train step of
   train/step.py, the same jitted function supervised training uses), with rl.ptx_coef each beside
   its own pretraining rows, with rl.ema each followed by the moving average's update;
5. metrics of the step (metrics.jsonl: reward-model score, gold reward, KL to the reference, entropy,
   clip fraction, approx-KL, value loss, explained variance, lengths, ratio mean/variance, time in
   sampling vs learning), greedy held-out accuracy every train.eval_every steps, samples every
   train.sample_every, a checkpoint every train.checkpoint_every.

A checkpoint is taken between RL steps and holds every model (the frozen ones too) and, in its
metadata, the adaptive β: a resumed run samples and updates exactly as the uninterrupted one did.
SIGTERM/SIGINT finish the RL step in flight, save and exit; SIGKILL loses at most the steps since the
last checkpoint.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from plutao.model.sampling import to_host
from plutao.tokenizer.chat import template_hash
from plutao.train.config.errors import NonFiniteError, UserError
from plutao.train.data import batches as batches_lib
from plutao.train.data.batches import sharded_batch
from plutao.train.parallel import sharding
from plutao.train.parallel.distributed import log
from plutao.train.rl import objectives as rl
from plutao.train.rl.rewards import read_shift
from plutao.train.rl.rollouts import PromptSource, Rollout, check_tools, row_seeds, sample
from plutao.train.run.checkpoint import Checkpoints
from plutao.train.run.lineage import init_from_parent, merge_params
from plutao.train.run.metrics import MetricsLog, plot_rewards
from plutao.train.run.resume import StopFlag, resume
from plutao.train.tasks.policy import RL_AXES, RolloutData
from plutao.train.worlds import arith

SCORED_KEYS = ("tokens", "targets", "rm_tokens", "rm_index")


def reward_spec(cfg) -> tuple[Path, int]:
    """The reward-model run (and its newest checkpoint) that rl.reward names."""
    path = Path(cfg.rl.reward)
    steps = sorted(int(d.name) for d in (path / "checkpoints").iterdir() if d.name.isdigit()) if (
        path / "checkpoints").is_dir() else []
    if not steps:
        raise UserError(f"--reward {path}: that run has no checkpoint; train it with `plutao reward` first")
    return path, steps[-1]


def load_parents(trainer, state: dict, cfg, fingerprint: str) -> tuple[dict, dict]:
    """Policy and reference from the SFT run, value model and reward model from the reward run; the
    lineage to record."""
    target = trainer.abstract_sharded_state()
    sft = cfg.train.init_from

    def restored(tree, spec, what):
        params, lineage = init_from_parent(tree, spec, fingerprint, cfg.model)
        if lineage["fresh"]:
            raise UserError(f"{spec} lacks {', '.join(lineage['fresh'][:3])} for the {what}; give a run of the right kind")
        return params, lineage

    policy, lineage = restored(target["params"]["policy"], sft, "policy")
    params = {"policy": merge_params(state["params"]["policy"], policy)}
    frozen = {"reference": restored(target["frozen"]["reference"], sft, "reference")[0]}
    if "ema" in trainer.slots:  # (the moving average starts at the SFT policy: its own copy, updated in place)
        frozen["ema"] = jax.tree.map(jnp.copy, params["policy"])
    if "reward" in trainer.slots:
        rm_dir, rm_step = reward_spec(cfg)
        spec = f"{rm_dir.absolute()}:{rm_step}"
        frozen["reward"], rm_lineage = restored(target["frozen"]["reward"], spec, "reward model")
        offset, scale = read_shift(rm_dir, rm_step)
        lineage["reward"] = {"parent": rm_lineage["parent"], "step": rm_step, "config_hash": rm_lineage["config_hash"],
                             "offset": offset, "scale": scale}
        if "value" in trainer.slots:
            params["value"] = restored(target["params"]["value"], spec, "value model")[0]
    for name in params.keys() | frozen.keys():
        assert name in trainer.slots, name
    return {**state, "params": params, "frozen": frozen}, lineage


@functools.cache
def _score_step(trainer):
    """The jitted scoring pass: (params, frozen, batch) → per-token and per-row arrays, replicated."""

    axes = {"tokens": ("batch", "length"), "targets": ("batch", "length"), **RL_AXES}
    sh = batches_lib.shardings({k: axes[k] for k in SCORED_KEYS}, trainer.mesh)
    state_sh = trainer.state_shardings

    def score(params, frozen, batch):
        return trainer.active_task.score(trainer._modules(params, frozen), batch, trainer.constrain)

    return jax.jit(score, in_shardings=(state_sh["params"], state_sh["frozen"], sh),
                   out_shardings=sharding.replicated(trainer.mesh)), axes


def _sharded(arrays: dict, axes: dict, mesh) -> dict:
    shapes = {k: v.shape for k, v in arrays.items()}
    return sharded_batch(lambda rows: {k: v[rows] for k, v in arrays.items()}, shapes, axes, mesh)


def score_rollout(trainer, state: dict, roll: Rollout) -> dict:
    """The scoring pass over a rollout, on the host: per-token log-probs (policy, reference), exact KL,
    entropy, values (PPO), the reward model's raw score (when there is one)."""
    score_step, axes = _score_step(trainer)
    arrays = {"tokens": roll.tokens, "targets": roll.targets, "rm_tokens": roll.rm_tokens, "rm_index": roll.rm_index}
    scored = score_step(state["params"], state["frozen"], _sharded(arrays, axes, trainer.mesh))
    return {k: np.asarray(to_host(v)) for k, v in scored.items()}


@functools.cache
def _ema_step(trainer, decay: float):
    """ema ← decay·ema + (1 − decay)·policy, in place (the moving average's buffers are donated)."""
    sh = trainer.state_shardings

    def step(ema, policy):
        return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, policy)

    return jax.jit(step, in_shardings=(sh["frozen"]["ema"], sh["params"]["policy"]),
                   out_shardings=sh["frozen"]["ema"], donate_argnums=0)


def update(trainer, state: dict, roll: Rollout, scored: dict, scores: np.ndarray, beta: float, seed: int,
           step: int, data: RolloutData | None = None) -> tuple[dict, dict, dict]:
    """Advantages from the scores (the task's), then rl.epochs passes of rl.minibatches train steps
    (each with its pretraining rows under rl.ptx_coef, each followed by the moving average's update
    under rl.ema). Returns (state, mean step metrics, the advantages' metrics)."""
    task, r = trainer.active_task, trainer.active_task.cfg.rl
    mask = roll.loss_weights
    inputs = {"old_logprobs": scored["logprobs"] * mask, "ref_logprobs": scored["ref_logprobs"] * mask}
    if "values" in scored:
        inputs["values"] = scored["values"]
    extra, adv_metrics = task.advantages(roll, inputs, scores, beta)
    full = {"tokens": roll.tokens, "targets": roll.targets, "loss_weights": mask, **extra}
    full = {k: np.asarray(full[k]) for k in task.batch_keys}
    rng = np.random.default_rng([seed, 0xA11, step])
    per, rows = task.step_rows(), roll.n
    sums: dict = {}
    for epoch in range(r.epochs):
        order = rng.permutation(rows)
        for mb in range(r.minibatches):
            idx = np.sort(order[mb * per:(mb + 1) * per])
            batch = {k: v[idx] for k, v in full.items()}
            if r.ptx_coef:  # (optimizer step u of the run reads pretraining batch u: resumable)
                u = (step * r.epochs + epoch) * r.minibatches + mb
                batch |= data.pretraining_batch(u, trainer.active_task.ids.eot_id)
            state, m = trainer.train_step(state, _sharded(batch, task.batch_axes, trainer.mesh))
            if r.ema:
                ema = _ema_step(trainer, r.ema)(state["frozen"]["ema"], state["params"]["policy"])
                state = {**state, "frozen": {**state["frozen"], "ema": ema}}
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v  # (device scalars: one transfer at the end)
    n = r.epochs * r.minibatches
    return state, {k: float(to_host(v)) / n for k, v in sums.items()}, adv_metrics


def _policy(trainer, state):
    """The model rollouts sample from (the policy being trained)."""
    return trainer.model(trainer.inference_params(state))["policy"]


def _served(trainer, state):
    """The model the run serves and evaluates: the policy, or its moving average under rl.ema."""
    return trainer.model(trainer.inference_params(state))[trainer.active_task.served_slot[1]]


def evaluate_policy(policy, tokenizer, source: PromptSource, cfg) -> dict:
    """Greedy replies to the held-out problems: accuracy (by digit count for the world), format, length."""
    prompts = source.held_out(cfg.rl.eval_problems)
    if not prompts:
        return {}
    out = sample(policy, tokenizer, prompts, [0] * len(prompts), context=cfg.model.context_length,
                 max_new_tokens=cfg.reply_tokens, temperature=0.0, tools=cfg.rl.tools)
    gold = out.gold()
    result = {"accuracy": float(np.nanmean(gold)), "format_ok": float(out.ended.mean()),
              "mean_length": float(out.lengths.mean())}
    digits = np.array([p.digits for p in prompts])
    if digits.any():
        result["accuracy_by_digits"] = {str(d): float(np.nanmean(gold[digits == d]))
                                        for d in range(1, arith.MAX_DIGITS + 1) if (digits == d).any()}
    return result


def rollout_metrics(roll: Rollout, scored: dict, rm_score: np.ndarray | None, gold: np.ndarray,
                    tools: bool = False) -> dict:
    mask = roll.loss_weights
    n_tok = max(float(mask.sum()), 1.0)
    gap = np.abs(scored["logprobs"] - roll.sampler_logprobs) * mask
    kl_row = (scored["kl"] * mask).sum(1)
    k3_row = (np.asarray(rl.kl_k3(scored["logprobs"], scored["ref_logprobs"])) * mask).sum(1)
    out = {"kl": float(kl_row.mean()), "kl_k3": float(k3_row.mean()),
           "entropy": float((scored["entropy"] * mask).sum() / n_tok),
           "mean_length": float(roll.lengths.mean()), "ended": float(roll.ended.mean()),
           "logprob_gap": float(gap.max())}
    if rm_score is not None:
        out["rm_score"] = float(rm_score.mean())
    if np.isfinite(gold).any():
        out["gold_reward"] = float(np.nanmean(gold))
    if tools:  # (rl.tools: the share of replies that called a tool, and calls per reply)
        out["tool_call_rate"], out["tool_calls"] = float((roll.calls > 0).mean()), float(roll.calls.mean())
    return out


def last_checkpoint(checkpoints) -> str:
    steps = checkpoints.all_steps()
    return f"the last checkpoint is step {steps[-1]}" if steps else "no checkpoint was saved yet"


def _format(m: dict) -> str:
    parts = [f"{k} {m[k]:.3f}" for k in ("rm_score", "gold_reward", "kl", "entropy", "mean_length") if k in m]
    return ", ".join(parts)


def train_rl(p, run_dir: Path, saved: dict | None, write_run_files, quiet: bool, allow_changed) -> dict:

    cfg, trainer, task, tok = p.cfg, p.trainer, p.task, p.tokenizer
    r, t = cfg.rl, cfg.train
    check_tools(r.tools, tok)
    main = jax.process_index() == 0
    data: RolloutData = p.batches
    source: PromptSource = data.prompts
    own = run_dir / "checkpoints"
    history_entry = None
    lineage = None
    fresh = not (own.is_dir() and any(d.name.isdigit() for d in own.iterdir()))
    if fresh:  # (the parents are read, and refused if they do not fit, before anything is written)
        state, lineage = load_parents(trainer, trainer.init_state(), cfg, tok.fingerprint)
    checkpoints = Checkpoints(own, keep=t.keep_checkpoints)
    if not fresh:
        latest, state, meta, history_entry = resume(trainer, checkpoints, saved, cfg, run_dir, allow_changed)
        # (the adapted β resumes where it was; a fixed one is what the config says)
        beta = float(meta["beta"]) if r.target_kl else r.beta
        step, spent_before = latest, float(meta.get("train_seconds", 0.0))
        shift = (saved or {}).get("lineage", {}).get("reward", {})
    else:
        lineage["template_hash"] = template_hash(tok)
        beta, step, spent_before = r.beta, 0, 0.0
        shift = lineage.get("reward", {})
        log(f"policy and reference from {lineage['parent']} step {lineage['step']}"
             + (f"; reward model {lineage['reward']['parent']} step {lineage['reward']['step']}" if "reward" in lineage
                else "; reward: the gold checker"))
    offset, scale = float(shift.get("offset", 0.0)), float(shift.get("scale", 1.0))
    write_run_files(history_entry, lineage)
    rows = r.prompts * r.group
    log(f"plutao {task.name}: {p.data_summary}; {r.epochs} epochs × {r.minibatches} minibatches of "
         f"{task.step_rows()} rows per step; mesh {dict(trainer.mesh.shape)}; steps {step}→{t.steps}")

    metrics_log = MetricsLog(run_dir, enabled=main, start_step=step)
    budget_start = time.perf_counter()
    last_eval: dict = {}

    def spent():
        return spent_before + time.perf_counter() - budget_start

    def save(at):
        health = to_host(state["health"]["nonfinite_steps"])
        checkpoints.save(at, {k: state[k] for k in trainer.checkpointed},
                         {"val_loss": None, "train_seconds": spent(), "nonfinite_steps": int(health), "beta": beta})

    def evaluation(at):
        nonlocal last_eval
        last_eval = evaluate_policy(_served(trainer, state), tok, source, cfg)
        if last_eval:
            metrics_log.write({"step": at, "split": "val", **last_eval})
            by = last_eval.get("accuracy_by_digits", {})
            log(f"step {at}: held-out greedy accuracy {last_eval['accuracy']:.3f}"
                 + (" (" + ", ".join(f"{d}d {a:.2f}" for d, a in by.items()) + ")" if by else "")
                 + f", format {last_eval['format_ok']:.3f}")

    try:
        if step == 0 and t.eval_every:
            evaluation(0)
        with StopFlag() as stop, tqdm(total=t.steps, initial=step, disable=quiet or not main or step >= t.steps,
                                      unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
            last_step = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
            while step < last_step and not stop.agreed(step, 1, bool(t.max_seconds) and spent() >= t.max_seconds):
                t0 = time.perf_counter()
                policy = _policy(trainer, state)
                prompts = [q for q in source.step(step, r.prompts) for _ in range(r.group)]
                roll = sample(policy, tok, prompts, row_seeds(t.seed, step, rows), context=cfg.model.context_length,
                              max_new_tokens=cfg.reply_tokens, temperature=r.temperature, tools=r.tools)
                t1 = time.perf_counter()
                scored = score_rollout(trainer, state, roll)
                gold = roll.gold()
                rm_score = (scored["rm_score"] - offset) / scale if "rm_score" in scored else None
                scores = (rm_score if rm_score is not None else gold) - r.tool_cost * roll.calls  # (rl.tool_cost)
                if not np.isfinite(scores).all():
                    raise NonFiniteError(f"the reward of RL step {step + 1} is NaN/inf (reward model {r.reward}); "
                                         f"{last_checkpoint(checkpoints)}")
                t2 = time.perf_counter()
                state, learned, adv_metrics = update(trainer, state, roll, scored, scores, beta, t.seed, step, data)
                t3 = time.perf_counter()
                if int(to_host(state["health"]["first_nonfinite"])):
                    raise NonFiniteError(f"the loss or gradient norm became NaN/inf at RL step {step + 1}; not saving "
                                         "that state; lower optim.lr or rl.clip")
                step += 1
                real_tokens = float((roll.tokens != tok.pad_id).sum())
                m = {"step": step, "split": "train", **rollout_metrics(roll, scored, rm_score, gold, bool(r.tools)), **adv_metrics,
                     "loss": learned["loss"], "grad_norm": learned["grad_norm"], "lr": learned["lr"],
                     **{k: learned[k] for k in task.step_metrics if k not in ("ratio", "ratio_sq")
                        and (k != "ptx_loss" or r.ptx_coef)},
                     "ratio_mean": learned["ratio"], "ratio_var": max(learned["ratio_sq"] - learned["ratio"] ** 2, 0.0),
                     "beta": beta, "sample_seconds": t1 - t0, "score_seconds": t2 - t1, "learn_seconds": t3 - t2,
                     "rollout_tokens_per_sec": float(roll.lengths.sum()) / max(t1 - t0, 1e-9),
                     "train_tokens_per_sec": real_tokens * r.epochs / max(t3 - t2, 1e-9)}
                metrics_log.write(m)
                bar.set_postfix_str(_format(m), refresh=False)
                bar.update(1)
                if r.target_kl:
                    beta = rl.adaptive_beta(beta, m["kl"], r.target_kl, rows, r.kl_horizon)
                if t.sample_every and step % t.sample_every == 0:
                    shown = [f"{q.messages[-1]['content']} → {x!r}" + (f" (RM {s:+.2f})" if rm_score is not None else "")
                             + (f" gold {g:.0f}" if np.isfinite(g) else "")
                             for q, x, s, g in list(zip(roll.prompts, roll.replies, scores, gold))[:4]]
                    metrics_log.write({"step": step, "sample": "\n".join(shown)})
                    log(f"--- step {step}: {_format(m)} ---\n" + "\n".join(shown))
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    evaluation(step)
                if step % t.checkpoint_every == 0 and step < t.steps:
                    save(step)
            if step < t.steps and not (t.max_seconds and spent() >= t.max_seconds and stop.signal is None):
                save(step)
                checkpoints.close()
                why = f"stopped by signal {stop.signal}" if stop.signal is not None else "reached train.stop_at_step"
                log(f"{why} at step {step}; checkpoint saved in {run_dir}/checkpoints/{step}. "
                     "Run the same command again to resume.")
                return {"interrupted": True, "step": step, "run_dir": str(run_dir), "signal": stop.signal}
            if step > (checkpoints.latest_step() or 0):
                evaluation(step)
                save(step)
            checkpoints.close()
    finally:
        metrics_log.close()
    plot = plot_rewards(run_dir) if main else None
    log(f"done: step {step}; held-out accuracy {last_eval.get('accuracy', float('nan')):.3f}\n"
         f"  checkpoint: {run_dir / 'checkpoints' / str(step)}\n  metrics and samples: {run_dir / 'metrics.jsonl'}"
         f"\n  plot: {plot}")
    return {"step": step, "run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / str(step)),
            "train_seconds": spent(), "plot": str(plot) if plot else None,
            **{f"val_{k}": v for k, v in last_eval.items()}}

