"""The reinforcement-learning stages as commands: `plutao ppo` and `plutao grpo` (train/rl_loop.py).

Each is an ordinary stage run (experiments/commands/assistant.py: stage_config) from an SFT run; the
reward model it learns against is checked before anything is sampled or written: it must be a
`plutao reward` run speaking the policy's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from plutao.experiments.commands.assistant import _check_not_other_parent, _summary, check_parent, stage_config
from plutao.train.errors import UserError
from plutao.train.rundir import existing_run_config


def check_reward_run(reward: str, policy_parent: Path) -> Path:
    """The reward-model run of --reward, refused unless it judges replies in the policy's tokens."""
    from plutao.train.config import Config
    from plutao.train.tasks import task_class

    path = Path(reward)
    saved = existing_run_config(path)
    kind = task_class(Config.from_dict(saved))
    if not kind.judges:
        raise UserError(f"--reward {path} is a {kind.label} run, not a reward model; give the --workdir of a "
                        "`plutao reward` run (or --reward gold for the world's checker, with `plutao grpo`)")
    mine = existing_run_config(policy_parent).get("provenance", {}).get("tokenizer_fingerprint")
    theirs = saved.get("provenance", {}).get("tokenizer_fingerprint")
    if mine != theirs:
        raise UserError(f"--reward {path} speaks another tokenizer than {policy_parent}; use a reward model trained "
                        "from this SFT run's lineage (`plutao reward SFT_RUN`)")
    return path


def _prompts(args) -> dict:
    data = args.data
    return {"data.path": str(Path(data).absolute()) if data.endswith(".jsonl") else data, "data.val_path": ""}


def cmd_ppo(args) -> int:
    from plutao.train.loop import train

    parent = Path(args.sft_run)
    check_parent("ppo", parent)
    if not args.reward:
        raise UserError("`plutao ppo` learns against a reward model: give --reward RM_RUN (a `plutao reward` run)")
    rm = check_reward_run(args.reward, parent)
    extra = {"rl.reward": str(rm.absolute())} | ({"rl.beta": args.beta} if args.beta is not None else {})
    cfg, _ = stage_config(parent, "ppo", _prompts(args) | extra, args.step, list(args.overrides))
    run_dir = Path(args.workdir)
    _check_not_other_parent(run_dir, cfg)
    return _summary(args, train(cfg, run_dir, quiet=args.quiet))


def cmd_grpo(args) -> int:
    from plutao.train.loop import train

    parent = Path(args.sft_run)
    check_parent("grpo", parent)
    if not args.reward:
        raise UserError("`plutao grpo` needs --reward RM_RUN (learned preferences) or --reward gold (the world's checker)")
    reward = "gold" if args.reward == "gold" else str(check_reward_run(args.reward, parent).absolute())
    extra = {"rl.reward": reward}
    for key, value in (("rl.group", args.group), ("rl.baseline", args.baseline), ("rl.beta", args.beta)):
        if value is not None:
            extra[key] = value
    cfg, _ = stage_config(parent, "grpo", _prompts(args) | extra, args.step, list(args.overrides))
    run_dir = Path(args.workdir)
    _check_not_other_parent(run_dir, cfg)
    return _summary(args, train(cfg, run_dir, quiet=args.quiet))
