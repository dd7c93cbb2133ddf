"""The assistant stages as commands: sft, reward, and what reads a reward model (best-of-n sampling,
`plutao score --prompt/--response`, `plutao eval` of a reward run).

A stage is an ordinary training (train/loop.py) of a task (train/tasks/sft.py, reward.py) whose
config starts from the parent run's: same model and tokenizer, `train.init_from` = the parent, the
stage's defaults (train/config/presets.py: STAGE_PRESETS), then the user's key=value overrides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plutao.experiments.commands import check_run_kind, finish, run_training, stage_parser
from plutao.train.config.errors import UserError
from plutao.train.config.presets import STAGE_PRESETS
from plutao.train.config.schema import Config, apply_overrides, flatten, parse_overrides
from plutao.train.run.rundir import existing_run_config, read_run_config

FREE_MODEL_KEYS = ("model.dropout", "model.dtype", "model.remat", "model.attention")
INHERITED = ("model.", "data.tokenizer", "data.vocab_size", "data.cache_dir", "world.", "mesh.")


def stage_config(parent: Path, stage: str, data: dict, step: int | None, overrides: list[str],
                 world: dict | None = None) -> tuple[Config, dict]:
    """The stage run's config: the parent's model, tokenizer and world, the stage's defaults, then the
    user's overrides; and the parent's saved config."""
    saved = existing_run_config(parent)
    parent_cfg = Config.from_dict(saved)
    inherited = {k: v for k, v in flatten(parent_cfg.to_dict()).items() if k.startswith(INHERITED)}
    inherited.pop("model.dropout", None)
    layers = inherited | STAGE_PRESETS[stage] | data | (world or {}) | {
        "train.init_from": f"{parent.absolute()}:{step}" if step is not None else str(parent.absolute())}
    cfg = apply_overrides(apply_overrides(Config(), layers), parse_overrides(overrides))
    from plutao.train.tasks import validate

    validate(cfg)
    for key, new in flatten(cfg.to_dict()).items():  # (refused here, before anything is sampled or written)
        if (key.startswith(("model.", "data.tokenizer", "data.vocab_size")) and key in inherited
                and key not in FREE_MODEL_KEYS and inherited[key] != new):
            raise UserError(f"{parent} was trained with {key}={inherited[key]!r}, but this {stage} run asks for {new!r}; "
                            f"a {stage} run keeps its parent's model and tokenizer (drop the override)")
    return cfg, saved


def check_parent(stage: str, parent: Path) -> None:
    """The stage's task says which kinds of run it starts from (train/tasks/: parents)."""
    from plutao.train.tasks import TASKS, task_class

    cfg = Config.from_dict(existing_run_config(parent))
    if cfg.lora.rank:
        raise UserError(f"{parent} is a LoRA run (adapters over its own parent); merge it first "
                        f"(`plutao merge-lora {parent} --workdir MERGED`) and start this {stage} run from MERGED")
    TASKS[stage].check_parent(parent, task_class(cfg))


def _check_not_other_parent(run_dir: Path, cfg: Config) -> None:
    """Refuse a --workdir that already holds a run started from another parent (before writing anything)."""
    saved = read_run_config(run_dir)
    if saved is None:
        return
    old = saved.get("train", {}).get("init_from", "")
    if old != cfg.train.init_from or saved.get("train", {}).get("task", "") != cfg.train.task:
        raise UserError(f"{run_dir} already holds a {saved.get('train', {}).get('task') or 'training'} run from "
                        f"{old or 'scratch'}; use a new --workdir for one from {cfg.train.init_from}")


def cmd_sft(args) -> int:
    check_run_kind(Path(args.workdir), "sft")
    parent = Path(args.base_run)
    check_parent("sft", parent)
    data_path = str(Path(args.data).absolute()) if args.data.endswith(".jsonl") else args.data
    data = {"data.path": data_path, "data.val_path": ""}
    cfg, _ = stage_config(parent, "sft", data, args.step, list(args.overrides))
    run_dir = Path(args.workdir)
    _check_not_other_parent(run_dir, cfg)
    return finish(args, run_training(cfg, run_dir, quiet=args.quiet))


def _k_range(text: str | None) -> dict:
    if text is None:
        return {}
    lo, sep, hi = text.partition("..")
    try:
        k_min, k_max = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise UserError(f"--k {text!r}: give MIN..MAX (e.g. --k 4..9) or one number") from None
    if not 2 <= k_min <= k_max <= 16:
        raise UserError(f"--k {text}: need 2 ≤ MIN ≤ MAX ≤ 16 responses per prompt")
    return {"world.k_min": k_min, "world.k_max": k_max}


def cmd_reward(args) -> int:
    check_run_kind(Path(args.workdir), "reward")
    parent = Path(args.sft_run)
    check_parent("reward", parent)
    world = _k_range(args.k)
    if args.labeler_noise is not None:
        if args.labeler_noise < 0:
            raise UserError(f"--labeler-noise must be ≥ 0 (0 = the gold labeler), got {args.labeler_noise}")
        world["world.labeler_noise"] = args.labeler_noise
    run_dir = Path(args.workdir)
    builtin = args.data == "builtin:arith"
    if builtin:
        data = {"data.path": str((run_dir / "comparisons" / "train.jsonl").absolute()),
                "data.val_path": str((run_dir / "comparisons" / "val.jsonl").absolute())}
    else:
        if world:
            raise UserError("--k and --labeler-noise shape the built-in rankings; your file's rankings are used as given")
        data = {"data.path": args.data, "data.val_path": ""}
    cfg, _ = stage_config(parent, "reward", data, args.step, list(args.overrides), world)
    _check_not_other_parent(run_dir, cfg)
    demonstrations(parent)  # (read now: a parent whose data is gone fails before anything is trained)
    if builtin:
        make_comparisons(parent, args.step, cfg, run_dir)
    summary = run_training(cfg, run_dir, quiet=args.quiet)
    if not summary.get("interrupted") and not summary.get("signal"):
        shift_rewards(run_dir, parent, args.step)
    return finish(args, summary)


def make_comparisons(parent: Path, step: int | None, cfg: Config, run_dir: Path) -> None:
    """RUN_DIR/comparisons/{train,val}.jsonl, sampled from the SFT run once (kept for resumes and for
    inspection); refused when they exist for another parent or world."""
    import dataclasses

    import jax

    from plutao.train.data.conversations import write_jsonl
    from plutao.train.parallel.distributed import log
    from plutao.train.rl.comparisons import make_rankings, usable
    from plutao.train.rl.rollouts import check_tools
    from plutao.train.run.lineage import load_run

    folder = run_dir / "comparisons"
    info = {"parent": cfg.train.init_from, "world": dataclasses.asdict(cfg.world)}
    if cfg.rl.tools:  # (replies sampled with tools: the rankings differ; without, the key is absent as before)
        info["tools"] = cfg.rl.tools
    def as_now(have: dict) -> dict:  # (world settings added since the files were made: at their defaults)
        return {**have, "world": {**dataclasses.asdict(type(cfg.world)()), **have.get("world", {})}}

    if cached(folder, info, f"{folder} holds the rankings {run_dir} was trained on, from another parent or other "
                            "world.* or rl.tools settings; use a new --workdir (or the same settings)", as_now):
        return
    sft = load_run(parent, step)
    check_tools(cfg.rl.tools, sft.tokenizer)
    world, context = cfg.world, cfg.model.context_length
    lines = {}
    for split, n, held_out in (("train", world.comparisons, False), ("val", max(world.comparisons // 10, 5), True)):
        made = make_rankings(sft.model, sft.tokenizer, world, held_out=held_out, context=context, n=n, log=log,
                             tools=cfg.rl.tools)
        lines[split] = [x for x in made if usable(x)]
        log(f"{split}: {len(lines[split]):,} of {n:,} prompts have replies of different quality")
        if not lines[split]:
            raise UserError(f"every {split} prompt got {world.k_min}..{world.k_max} replies of equal quality, so there is "
                            "nothing to rank; raise world.comparisons or --k")
    if jax.process_index() == 0:
        for split, rows in lines.items():
            write_jsonl(folder / f"{split}.jsonl", rows)
        tmp = folder / "info.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(folder / "info.json")
    if jax.process_count() > 1:
        from plutao.train.parallel.distributed import any_process

        any_process(False)  # (every process waits until the files are there)


def cached(folder: Path, info: dict, refusal: str, as_now=lambda have: have) -> bool:
    """Whether FOLDER/info.json (read through `as_now`, which fills settings added since) says the files
    beside it were made from `info` (then they are reused). Files made otherwise are remade, unless a run
    was trained on them (FOLDER/../config.json): refused."""
    try:
        have = as_now(json.loads((folder / "info.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError, AttributeError):
        have = None
    if have == info:
        return True
    if have is not None and (folder.parent / "config.json").is_file():
        raise UserError(refusal)
    return False


def demonstrations(parent: Path) -> list[list[dict]]:
    """The SFT parent's held-out demonstrations, each up to its last assistant reply (what the
    reward shift averages over)."""
    from plutao.train.tasks.sft import chat_data

    _, val, _ = chat_data(Config.from_dict(existing_run_config(parent)))
    return [conv[:max(i for i, m in enumerate(conv) if m["role"] == "assistant") + 1] for conv in val]


def shift_rewards(run_dir: Path, parent: Path, parent_step: int | None) -> None:
    """Shift the final rewards so the SFT demonstrations average 0, and scale them so the replies of the
    held-out rankings (for the built-in world: SFT samples) spread by 1 (RUN_DIR/reward_offset.json)."""
    import jax
    import numpy as np

    from plutao.train.data.conversations import read_rankings, reply_turns, single_path, with_held_out
    from plutao.train.parallel.distributed import log
    from plutao.train.rl.rewards import RewardScorer, write_shift

    scorer = RewardScorer.load(run_dir)
    demos = demonstrations(parent)
    offset = float(np.mean(scorer.raw(demos)))
    data = scorer.run.cfg.data
    path = single_path(data)
    _, held, _ = with_held_out(read_rankings(path), read_rankings, path, data, "rankings")
    replies = [r.prompt + reply_turns(x) for r in held for x in r.responses]
    ended = [e for r in held for e in r.meta.get("ended", [True] * len(r.responses))]  # (scored as they ended)
    spread = float(np.std(scorer.raw(replies, ended=ended))) if len(replies) > 1 else 0.0
    scale = spread if spread > 1e-6 else 1.0
    if jax.process_index() == 0:
        write_shift(run_dir, scorer.run.step, offset, scale, len(demos), len(replies))
    log(f"rewards shifted by {-offset:+.4f} (the parent's {len(demos)} held-out demonstrations now average 0) and "
        f"divided by {scale:.4f} (the {len(replies)} replies of the held-out rankings now spread by 1)")


# --- reading a reward model ------------------------------------------------------------------------

def sample_best_of(args, run) -> int:
    """`plutao sample SFT_RUN --prompt P --best-of N --reward RM_RUN [--show-all]`."""
    import numpy as np

    from plutao.model.decode import complete
    from plutao.model.sampling import SamplingConfig
    from plutao.tokenizer.chat import conversation, fitted_prompt_ids, reply_stop_ids
    from plutao.train.rl.rewards import RewardScorer

    if args.best_of < 1:
        raise UserError(f"--best-of must be ≥ 1, got {args.best_of}")
    if not args.reward:
        raise UserError("--best-of N needs --reward RM_RUN to judge the N replies")
    if not run.task.chat:
        raise UserError(f"{args.run_dir} is not a chat run (train.task={run.cfg.train.task or 'none'}); best-of-n "
                        "samples replies from a `plutao sft` run")
    scorer = RewardScorer.load(args.reward)
    if scorer.tokenizer.fingerprint != run.tokenizer.fingerprint:
        raise UserError(f"--reward {args.reward} speaks another tokenizer than {args.run_dir}; use a reward model "
                        "trained from this run's lineage")
    tok = run.tokenizer
    messages = conversation(args.prompt, system=args.system)
    context = run.cfg.model.context_length
    ids = fitted_prompt_ids(messages, tok, max(context - args.max_new_tokens, context // 2, 1))[0]
    samplings = [SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed * 1_000_003 + i,
                                stop_ids=reply_stop_ids(tok)) for i in range(args.best_of)]
    outs = complete(run.model, [ids] * args.best_of, samplings, eot_id=tok.eot_id, pad_id=tok.pad_id)
    replies = [tok.decode(c.content) for c in outs]
    rewards = scorer.score([messages + [{"role": "assistant", "content": r}] for r in replies],
                           ended=[c.stop_token == tok.end_id for c in outs])
    best = int(np.argmax(rewards))
    if args.show_all:
        for i in np.argsort(-rewards, kind="stable"):
            print(f"{rewards[i]:+.3f}{'  *' if i == best else '   '} {replies[i]!r}")
    else:
        print(replies[best])
    return 0


def score_reward(args, run_dir: Path) -> int:
    """`plutao score RM_RUN --prompt P --response R [--json]`."""
    from plutao.tokenizer.chat import conversation
    from plutao.train.rl.rewards import RewardScorer

    if args.prompt is None or args.response is None:
        raise UserError(f"{run_dir} is a reward model: give --prompt P --response R to score a reply")
    scorer = RewardScorer.load(run_dir, args.step, what="")
    messages = conversation(args.prompt, args.response)
    raw = float(scorer.raw([messages])[0])
    reward = (raw - scorer.offset) / scorer.scale
    if args.json:
        print(json.dumps({"reward": reward, "raw": raw, "offset": scorer.offset, "scale": scorer.scale,
                          "step": scorer.run.step}))
    else:
        print(f"reward {reward:+.4f} (raw {raw:+.4f}, offset {scorer.offset:+.4f}, scale {scorer.scale:.4f}, "
              f"step {scorer.run.step})")
    return 0


def eval_reward(args, run_dir: Path) -> int:
    """`plutao eval RM_RUN [--json]`: held-out pairwise accuracy and calibration."""
    from plutao.train.eval.reward_model import evaluate_rankings
    from plutao.train.rl.rewards import RewardScorer
    from plutao.train.tasks.reward import ranking_data

    scorer = RewardScorer.load(run_dir, args.step, what="")
    if args.data:
        from plutao.train.data.conversations import read_rankings

        val = read_rankings(args.data)
    else:
        _, val, _ = ranking_data(scorer.run.cfg)
    result = evaluate_rankings(scorer, val) | {"step": scorer.run.step, "data": args.data or "held-out"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"pairwise accuracy {result['pairwise_accuracy']:.3f} on {result['pairs']:,} held-out pairs "
          f"({result['rankings']:,} rankings, step {result['step']})", file=sys.stdout)
    for d, acc in result.get("by_digits", {}).items():
        print(f"  {d}-digit problems: {acc['accuracy']:.3f} ({acc['pairs']:,} pairs)")
    if result.get("right_vs_wrong_accuracy") is not None:
        print(f"  one right, one wrong: {result['right_vs_wrong_accuracy']:.3f} ({result['right_vs_wrong_pairs']:,} pairs)")
    if result.get("both_wrong_accuracy") is not None:
        print(f"  both replies wrong: {result['both_wrong_accuracy']:.3f} ({result['both_wrong_pairs']:,} pairs)")
    if result.get("gold_agreement") is not None:
        print(f"  agreement with the gold labeler: {result['gold_agreement']:.3f}")
    print(f"  Brier score of σ(r_w − r_l): {result['brier']:.4f}; calibration (predicted → observed):")
    for b in result["calibration"]:
        print(f"    {b['predicted']:.2f} → {b['observed']:.2f} ({b['pairs']:,} pairs)")
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    stage_parser(sub, "sft", "supervised fine-tuning: a base run learns to answer in the chat template", "base_run",
          "the --workdir of the base run", "builtin:arith (the arithmetic world's demonstrations) or a .jsonl of "
          "{\"messages\": [...]} or {\"prompt\", \"response\"} lines (default %(default)s)", cmd_sft)

    rw = stage_parser(sub, "reward", "a reward model on an SFT run's trunk, trained on rankings", "sft_run",
               "the --workdir of a `plutao sft` run", "builtin:arith (replies sampled from the SFT run, ranked by the "
               "world's labeler) or a .jsonl of pairs/ranked lists (default %(default)s)", cmd_reward)
    rw.add_argument("--k", default=None, metavar="MIN..MAX", help="builtin:arith: responses ranked per prompt "
                    "(default 4..9)")
    rw.add_argument("--labeler-noise", type=float, default=None, metavar="X",
                    help="builtin:arith: Bradley–Terry noise of the labeler (0 = gold; README gives agreement rates)")
