"""The reinforcement-learning stages as commands: `plutao ppo` and `plutao grpo` (train/rl/loop.py).

Each is an ordinary stage run (experiments/commands/assistant.py: stage_config) from an SFT run; the
reward model it learns against is checked before anything is sampled or written: it must be a
`plutao reward` run speaking the policy's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from plutao.experiments.commands import check_run_kind, finish, run_training, stage_parser
from plutao.experiments.commands.assistant import _check_not_other_parent, check_parent, stage_config
from plutao.train.config.errors import UserError
from plutao.train.run.rundir import existing_run_config


def check_reward_run(reward: str, policy_parent: Path) -> Path:
    """The reward-model run of --reward, refused unless it judges replies in the policy's tokens."""
    from plutao.train.config.schema import Config
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


def ptx_source(parent: Path, overrides: list[str]) -> dict:
    """With rl.ptx_coef > 0 and no rl.ptx_data given: the pretraining text of the base run the SFT
    parent descends from (its data.path and data.weights), recorded in this run's config."""
    from plutao.experiments.report_card import pretraining_ancestor
    from plutao.train.config.schema import parse_overrides

    given = parse_overrides(overrides)
    try:
        coef = float(given.get("rl.ptx_coef", 0))
    except ValueError:
        return {}  # (the config's validation says what is wrong with it)
    base = pretraining_ancestor(parent) if coef and "rl.ptx_data" not in given else None
    if base is None:
        return {}
    data = existing_run_config(base).get("data", {})
    return {"rl.ptx_data": data.get("path", ""), "rl.ptx_weights": list(data.get("weights", []))}


def _prompts(args) -> dict:
    data = args.data
    return {"data.path": str(Path(data).absolute()) if data.endswith(".jsonl") else data, "data.val_path": ""}


def cmd_ppo(args) -> int:
    check_run_kind(Path(args.workdir), "ppo")
    parent = Path(args.sft_run)
    check_parent("ppo", parent)
    if not args.reward:
        raise UserError("`plutao ppo` learns against a reward model: give --reward RM_RUN (a `plutao reward` run)")
    rm = check_reward_run(args.reward, parent)
    extra = {"rl.reward": str(rm.absolute())} | ({"rl.beta": args.beta} if args.beta is not None else {})
    extra |= ptx_source(parent, list(args.overrides))
    cfg, _ = stage_config(parent, "ppo", _prompts(args) | extra, args.step, list(args.overrides))
    run_dir = Path(args.workdir)
    _check_not_other_parent(run_dir, cfg)
    return finish(args, run_training(cfg, run_dir, quiet=args.quiet))


def cmd_grpo(args) -> int:
    check_run_kind(Path(args.workdir), "grpo")
    parent = Path(args.sft_run)
    check_parent("grpo", parent)
    if not args.reward:
        raise UserError("`plutao grpo` needs --reward RM_RUN (learned preferences) or --reward gold (the world's checker)")
    reward = "gold" if args.reward == "gold" else str(check_reward_run(args.reward, parent).absolute())
    extra = {"rl.reward": reward}
    for key, value in (("rl.group", args.group), ("rl.baseline", args.baseline), ("rl.beta", args.beta)):
        if value is not None:
            extra[key] = value
    extra |= ptx_source(parent, list(args.overrides))
    cfg, _ = stage_config(parent, "grpo", _prompts(args) | extra, args.step, list(args.overrides))
    run_dir = Path(args.workdir)
    _check_not_other_parent(run_dir, cfg)
    return finish(args, run_training(cfg, run_dir, quiet=args.quiet))


def cmd_dpo(args) -> int:
    """`plutao dpo SFT_RUN --workdir DIR [--data builtin:arith|FILE.jsonl] [--beta B]`: the rankings
    (for builtin:arith sampled from the SFT run exactly as `plutao reward` samples them, so both stages
    learn from the same comparisons), their pairs with the SFT model's log-probs, then the training."""
    from plutao.experiments.commands.assistant import make_comparisons
    from plutao.train.data.conversations import read_rankings

    check_run_kind(Path(args.workdir), "dpo")
    parent = Path(args.sft_run)
    check_parent("dpo", parent)
    run_dir = Path(args.workdir)
    pairs_dir = run_dir / "pairs"
    data = {"data.path": str((pairs_dir / "train.jsonl").absolute()),
            "data.val_path": str((pairs_dir / "val.jsonl").absolute())}
    extra = {"rl.beta": args.beta} if args.beta is not None else {}
    if args.beta is not None and args.beta <= 0:
        raise UserError(f"--beta must be > 0 (the loss's inverse temperature), got {args.beta}")
    cfg, _ = stage_config(parent, "dpo", data | extra, args.step, list(args.overrides))
    _check_not_other_parent(run_dir, cfg)
    if args.data == "builtin:arith":
        source = run_dir / "comparisons"
        make_comparisons(parent, args.step, cfg, run_dir)
        rankings = read_rankings(source / "train.jsonl"), read_rankings(source / "val.jsonl")
    elif Path(args.data).is_dir():  # a reward run: the very comparisons it was trained and evaluated on
        source = Path(args.data) / "comparisons"
        if not (source / "train.jsonl").is_file() or not (source / "val.jsonl").is_file():
            raise UserError(f"--data {args.data} is a directory without comparisons/train.jsonl and val.jsonl; give "
                            "a `plutao reward --data builtin:arith` run, builtin:arith or a .jsonl file")
        rankings = read_rankings(source / "train.jsonl"), read_rankings(source / "val.jsonl")
    else:
        from plutao.train.config.schema import DataConfig
        from plutao.train.data.conversations import with_held_out

        path = str(Path(args.data).absolute())
        train_r, val_r, _ = with_held_out(read_rankings(path), read_rankings, path, DataConfig(path=path), "ranking(s)")
        rankings = train_r, val_r
    write_pairs(parent, args.step, cfg, pairs_dir, *rankings)
    return finish(args, run_training(cfg, run_dir, quiet=args.quiet))


def write_pairs(parent: Path, step: int | None, cfg, folder: Path, train_rankings, val_rankings) -> None:
    """RUN_DIR/pairs/{train,val}.jsonl: the rankings' pairs, each with the SFT model's log-probs of both
    replies (computed once, by the function the DPO loss uses). Kept when they exist for this parent."""
    import dataclasses
    import hashlib
    import json

    import jax
    import numpy as np
    from flax import nnx

    from plutao.train.data.chat_batches import pair_rows
    from plutao.train.data.conversations import write_jsonl
    from plutao.train.parallel.distributed import log
    from plutao.train.run.lineage import load_run
    from plutao.train.run.rundir import parse_init_from
    from plutao.train.tasks import task_for
    from plutao.train.tasks.dpo import encode_pairs, pairs_of

    parent_dir, parent_step = parse_init_from(cfg.train.init_from)
    if parent_step is None:
        parent_step = max((int(d.name) for d in (parent_dir / "checkpoints").iterdir() if d.name.isdigit()), default=0)
    content = [[r.prompt, r.responses, r.ranks, r.meta.get("ended")] for r in list(train_rankings) + list(val_rankings)]
    info = {"parent": str(parent_dir.absolute()), "parent_step": parent_step,
            "rankings": hashlib.sha256(json.dumps([len(train_rankings), content]).encode()).hexdigest()[:16]}
    from plutao.experiments.commands.assistant import cached

    if cached(folder, info, f"{folder} holds the pairs {folder.parent} was trained on, from other rankings or another "
                            "checkpoint of the SFT run; use a new --workdir (or the same --data and --step)"):
        return
    sft = load_run(parent, parent_step)
    task = task_for(dataclasses.replace(cfg, model=sft.cfg.model), sft.tokenizer)
    graphdef, params = nnx.split(sft.model)
    score = jax.jit(lambda p, b: task.sequence_logprobs(nnx.merge(graphdef, p), b))
    out = {}
    for split, rankings in (("train", train_rankings), ("val", val_rankings)):
        pairs = pairs_of(rankings)
        if not pairs:
            raise UserError(f"the {split} rankings hold no two replies of different rank: nothing to prefer")
        encoded, width = encode_pairs(pairs, sft.tokenizer, cfg.model.context_length)
        ref = np.zeros((len(pairs), 2), np.float32)
        batch = 64
        for lo in range(0, len(pairs), batch):
            part = pair_rows(encoded[lo:lo + batch], width)
            n = len(part)
            part = np.concatenate([part, np.repeat(part[-1:], batch - n, 0)]) if n < batch else part
            ref[lo:lo + n] = np.asarray(score(params, task.named(part)))[:n]
        log(f"{split}: {len(pairs):,} pairs from {len(rankings):,} rankings; reference log-probs computed")
        out[split] = [{"prompt": p.prompt, "chosen": p.responses[0], "rejected": p.responses[1],
                       "meta": p.meta | {"reference_logprobs": [float(a), float(b)]}}
                      for p, (a, b) in zip(pairs, ref)]
    if jax.process_index() == 0:
        for split, lines in out.items():
            write_jsonl(folder / f"{split}.jsonl", lines)
        tmp = folder / "info.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(folder / "info.json")
    if jax.process_count() > 1:
        from plutao.train.parallel.distributed import any_process

        any_process(False)


def cmd_pipeline(args) -> int:
    import json
    import sys

    from plutao.experiments.pipeline import run

    summary = run(Path(args.workdir), args.seeds, args.scale, list(args.overrides), problems=args.problems,
                  best_of=args.best_of, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                  tools="" if args.tools == "none" else args.tools)
    if args.json:
        print(json.dumps(summary))
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    prompts_help = ("where the rollout prompts come from: builtin:arith (fresh world questions) or a .jsonl of "
                    "{\"messages\": [...], \"answer\": \"...\"} lines (default %(default)s)")
    po = stage_parser(sub, "ppo", "PPO: the SFT policy learns against a frozen reward model, with a KL penalty to itself",
               "sft_run", "the --workdir of a `plutao sft` run (policy and reference)", prompts_help, cmd_ppo,
               "e.g. rl.beta=0 (after the stage's defaults)")
    po.add_argument("--reward", metavar="RM_RUN", help="the --workdir of a `plutao reward` run (required)")
    po.add_argument("--beta", type=float, help="KL coefficient to the SFT policy (default 0.1; 0 = no leash)")

    gr = stage_parser(sub, "grpo", "GRPO/RLOO: G replies per prompt, group baselines, against a reward model or the world's "
               "checker", "sft_run", "the --workdir of a `plutao sft` run", prompts_help, cmd_grpo)
    gr.add_argument("--reward", metavar="RM_RUN|gold", help="a `plutao reward` run, or gold (verifiable rewards)")
    gr.add_argument("--group", type=int, help="replies per prompt, G ≥ 2 (default 8)")
    gr.add_argument("--baseline", choices=("group", "rloo"), help="group mean/std (GRPO, default) or leave-one-out")
    gr.add_argument("--beta", type=float, help="weight of the KL-to-reference term (default 0.04; 0 = none)")

    dp = stage_parser(sub, "dpo", "DPO: the SFT policy learns from preference pairs directly (no reward model)", "sft_run",
               "the --workdir of a `plutao sft` run (policy and reference)", "builtin:arith (replies sampled from the "
               "SFT run and ranked by the world's labeler, as `plutao reward` does), RM_RUN (the comparisons that "
               "reward run was trained on) or a .jsonl of pairs/ranked lists", cmd_dpo)
    dp.add_argument("--beta", type=float, help="the loss's β (default 0.1)")

    pi = sub.add_parser("pipeline", help="every assistant stage on the arithmetic world (base → SFT → RM → PPO, DPO, "
                        "GRPO), per seed, resumable, then report cards and their summary over seeds")
    pi.add_argument("world", choices=("arith",), help="the built-in world")
    pi.add_argument("overrides", nargs="*", help="key=value for every stage, or STAGE:key=value (stages: base, sft, "
                    "rm, ppo, dpo, grpo-gold, grpo-rm)")
    pi.add_argument("--workdir", required=True, help="where every stage's run goes (re-running skips finished ones)")
    pi.add_argument("--seeds", type=int, default=1, help="independent chains, train.seed 0..S-1 (default %(default)s)")
    pi.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's step count (default 1)")
    pi.add_argument("--problems", type=int, default=200, help="report card: problems per digit count (default 200)")
    pi.add_argument("--best-of", type=int, default=8, help="report card: best-of-N column of the SFT run (default 8)")
    pi.add_argument("--tools", default="calculator", help="tools the SFT stage learns to call (on 4–5 digit problems) "
                    "and the later stages may call; the report card asks every chat run with and without them "
                    "(default %(default)s; none = no tools)")
    pi.add_argument("--json", action="store_true", help="print DIR/summary.json (each seed's report card and the mean "
                    "± std over seeds) on stdout")
    pi.set_defaults(fn=cmd_pipeline)
