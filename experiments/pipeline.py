"""`plutao pipeline arith --workdir DIR [--seeds S] [--scale X] [STAGE:key=value ...]`: every stage of the
assistant recipe on the arithmetic world, per seed, as resumable steps, then the report cards and
their summary over seeds.

Per seed s (DIR/seed{s}/, train.seed = s in every stage, world.seed = s in the base and so in every stage,
which inherits the base's world):
  base       plutao train arith-base
  sft        plutao sft base                   (with --tools: TOOL_SFT, demonstrations that call the tool)
  rm         plutao reward sft                 (with --tools: replies sampled with the tool, rl.tools)
  ppo        plutao ppo sft --reward rm        (with --tools: rollouts may call it)
  dpo        plutao dpo sft --data rm          (the comparisons the reward model learned from)
  grpo-gold  plutao grpo sft --reward gold     (verifiable rewards)
  grpo-rm    plutao grpo sft --reward rm       (learned preferences)
  report     plutao report-card base sft ppo dpo grpo-gold grpo-rm --reward rm --best-of N
             --problems-file unseen-phrasings.jsonl (100 problems in phrasings the world never writes)
             [--tools calculator: every chat run also answered with the tool]
A finished stage leaves DIR/seed{s}/STAGE.done (its summary); re-running skips it, and an interrupted
one resumes from its checkpoint; a stage (or the report card) stopped by SIGINT/SIGTERM stops the pipeline
too, with exit code 130/143. Then DIR/summary.json and DIR/summary.md: every report-card figure as mean ± std
over the seeds (with one seed, the value alone), each seed's bootstrap interval beside the win rates.

Overrides: `key=value` applies to every training stage; `STAGE:key=value` to one (e.g.
`base:train.steps=400`). --scale multiplies every stage's default step count (and the rankings drawn).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from plutao.experiments import cli
from plutao.train.config.errors import UserError

STAGES = ("base", "sft", "rm", "ppo", "dpo", "grpo-gold", "grpo-rm")
DEFAULT_STEPS = {"base": 1600, "sft": 600, "rm": 300, "ppo": 40, "dpo": 300, "grpo-gold": 40, "grpo-rm": 40}
COMPARISONS = 2000
COLUMNS = ("base", "sft", "ppo", "dpo", "grpo-gold", "grpo-rm")
# The SFT stage with tools: the demonstrator answers 15% of its problems — 4 and 5 digits, beyond the
# training range, where the model's own working fails — with a call; the vocabulary grows by the tool tokens.
TOOL_SFT = ['data.add_specials=["<|call|>","<|tool|>"]', "world.tool_rate=0.15", "world.tool_digit_weights=[0,0,0,1,1]"]


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        stage, sep, rest = item.partition(":")
        if sep and "=" not in stage:
            if stage not in STAGES:
                raise UserError(f"{item!r}: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            out[stage].append(rest)
        elif "=" in item:
            for s in STAGES:
                out[s].append(item)
        else:
            raise UserError(f"{item!r}: give key=value (every stage) or STAGE:key=value")
    return out


def commands(seed_dir: Path, seed: int, scale: float, overrides: dict[str, list[str]],
             tools: str = "") -> dict[str, list[str]]:
    """The plutao command line of each stage of one seed (`tools`: the SFT stage learns to call them and
    the stages that sample from its policy may)."""
    d = {s: str(seed_dir / s) for s in STAGES}

    def extra(stage):
        steps = max(1, round(DEFAULT_STEPS[stage] * scale))
        world = [f"world.seed={seed}"] if stage == "base" else []  # (later stages inherit the base's world)
        use = (TOOL_SFT if stage == "sft" else [f"rl.tools={tools}"] if stage in ("rm", "ppo", "grpo-gold", "grpo-rm")
               else []) if tools else []
        return [f"train.seed={seed}", f"train.steps={steps}", *world, *use] + (
            [f"world.comparisons={max(20, round(COMPARISONS * scale))}"] if stage == "rm" else []) + overrides[stage]

    return {
        "base": ["train", "arith-base", "--workdir", d["base"], *extra("base")],
        "sft": ["sft", d["base"], "--workdir", d["sft"], *extra("sft")],
        "rm": ["reward", d["sft"], "--workdir", d["rm"], *extra("rm")],
        "ppo": ["ppo", d["sft"], "--reward", d["rm"], "--workdir", d["ppo"], *extra("ppo")],
        "dpo": ["dpo", d["sft"], "--data", d["rm"], "--workdir", d["dpo"], *extra("dpo")],
        "grpo-gold": ["grpo", d["sft"], "--reward", "gold", "--workdir", d["grpo-gold"], *extra("grpo-gold")],
        "grpo-rm": ["grpo", d["sft"], "--reward", d["rm"], "--workdir", d["grpo-rm"], *extra("grpo-rm")],
    }


def run_seed(seed_dir: Path, seed: int, scale: float, overrides, *, problems: int, best_of: int, log,
             tools: str = "") -> dict:
    """Every stage of one seed (skipping finished ones), then its report card; returns report.json."""

    seed_dir.mkdir(parents=True, exist_ok=True)
    for stage, argv in commands(seed_dir, seed, scale, overrides, tools).items():
        done = seed_dir / f"{stage}.done"
        if done.is_file():
            log(f"pipeline: seed {seed} {stage}: done before, skipped")
            continue
        log(f"pipeline: seed {seed} {stage}: plutao {' '.join(argv)}")
        t0 = time.perf_counter()
        rc = cli.main([*argv, "--quiet"])
        if rc in (130, 143):  # stopped by a signal: its checkpoint is kept, the stage is not done
            raise cli.Interrupted(rc - 128, f"pipeline: seed {seed} stage {stage} was stopped (its last checkpoint is "
                                        "kept); run the same command again to resume it")
        if rc != 0:
            raise UserError(f"pipeline: seed {seed} stage {stage} failed (exit {rc}); fix it and run the same command "
                            "again (finished stages are kept)")
        if not finished(seed_dir / stage):  # (stopped by a signal or a time budget: resumable, not done)
            raise UserError(f"pipeline: seed {seed} stage {stage} stopped before its last step; run the same command "
                            "again to resume it")
        _write(done, json.dumps({"seconds": time.perf_counter() - t0, "command": argv}))
    report_dir = seed_dir / "report-card"
    if not (report_dir / "report.json").is_file():
        unseen = write_unseen_phrasings(seed_dir)
        argv = ["report-card", *(str(seed_dir / c) for c in COLUMNS), "--reward", str(seed_dir / "rm"),
                "--best-of", str(best_of), "--problems", str(problems), "--out", str(report_dir), "--seed", str(seed),
                "--problems-file", str(unseen)] + (["--tools", tools] if tools else [])
        log(f"pipeline: seed {seed} report card: plutao {' '.join(argv)}")
        rc = cli.main(argv)
        if rc in (130, 143):
            raise cli.Interrupted(rc - 128, f"pipeline: seed {seed}: the report card was stopped (its finished columns "
                                        "are kept); run the same command again to finish it")
        if rc != 0:
            raise UserError(f"pipeline: seed {seed}: the report card failed; run the same command again")
    return json.loads((report_dir / "report.json").read_text())


def write_unseen_phrasings(seed_dir: Path, n: int = 100) -> Path:
    """DIR/seed{s}/unseen-phrasings.jsonl: n problems of the base's world asked in phrasings the world
    never writes (`arith_prompts.unseen_phrasing_problems`), the report card's problems file."""
    from plutao.train.config.schema import Config
    from plutao.train.run.rundir import existing_run_config
    from plutao.train.worlds import arith_prompts

    world = Config.from_dict(existing_run_config(seed_dir / "base")).world
    path = seed_dir / "unseen-phrasings.jsonl"
    _write(path, "".join(json.dumps({"messages": m, "answer": str(a)}) + "\n"
                         for m, a in arith_prompts.unseen_phrasing_problems(world, n)))
    return path


def finished(run_dir: Path) -> bool:
    """Whether a stage's run reached its train.steps (its newest checkpoint is the last step)."""
    try:
        steps = json.loads((run_dir / "config.json").read_text())["train"]["steps"]
    except (OSError, KeyError, ValueError):
        return False
    saved = [int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit()] if (
        run_dir / "checkpoints").is_dir() else []
    return bool(saved) and max(saved) >= steps


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _mean_std(xs) -> dict | None:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(reports: dict[int, dict]) -> dict:
    """Every numeric report-card figure as mean ± std over seeds; win rates with each seed's interval."""
    names = list(next(iter(reports.values()))["runs"])
    runs = {}
    for name in names:
        rows = [r["runs"][name] for r in reports.values() if name in r["runs"]]
        out = {}
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                out[key] = _mean_std(row.get(key) for row in rows)
            elif isinstance(value, dict) and "_by_digits" in key:
                out[key] = {d: _mean_std(row.get(key, {}).get(d) for row in rows) for d in value}
        runs[name] = out
    def over_seeds(per_seed: dict[int, dict]) -> dict:  # {seed: {pair: {rate, low, high}}}
        pairs = {}
        for seed, table in per_seed.items():
            for pair, w in table.items():
                pairs.setdefault(pair, {"rates": [], "intervals": {}})
                pairs[pair]["rates"].append(w["rate"])
                pairs[pair]["intervals"][str(seed)] = [w["low"], w["high"]]
        return {pair: {**_mean_std(v["rates"]), "intervals": v["intervals"],
                       "all_above_half": all(lo > 0.5 for lo, _ in v["intervals"].values())}
                for pair, v in pairs.items()}

    wins = {key: over_seeds({seed: r.get(key, {}) for seed, r in reports.items()})
            for key in ("win_rates", "rm_win_rates")}
    buckets = sorted({d for r in reports.values() for w in r.get("correctness_win_rates", {}).values()
                      for d in w["by_digits"]}, key=int)
    wins["correctness_win_rates"] = {d: over_seeds({seed: {pair: w["by_digits"][d] for pair, w
                                                           in r.get("correctness_win_rates", {}).items()
                                                           if d in w["by_digits"]} for seed, r in reports.items()})
                                     for d in buckets}
    elo = {}
    for r in reports.values():
        for entry in r.get("leaderboard", []):
            elo.setdefault(entry["name"], []).append(entry["rating"])
    leaderboard = sorted(({"name": n, **_mean_std(v)} for n, v in elo.items()), key=lambda e: -e["mean"])
    return {"seeds": sorted(reports), "runs": runs, **wins, "leaderboard": leaderboard,
            "reports": {str(seed): r for seed, r in reports.items()}}


def _ms(x: dict | None, digits: int = 3) -> str:
    """mean ± std over seeds; with one seed the value alone (a spread of one value is no spread)."""
    if x is None:
        return "—"
    if x.get("n", 2) < 2:
        return f"{x['mean']:.{digits}f}"
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def markdown(summary: dict) -> str:
    runs = summary["runs"]
    names = list(runs)
    seeds = summary["seeds"]
    many = len(seeds) > 1
    title = (f"# Pipeline summary over seeds {', '.join(map(str, seeds))} (mean ± std)" if many
             else f"# Pipeline summary (1 seed: {seeds[0]})")
    lines = [title, "", "| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for key, label in (("accuracy_by_digits", "accuracy (greedy)"), ("step_by_step_accuracy_by_digits",
                       "accuracy (think step by step)"), ("direct_accuracy_by_digits", "accuracy (number only)"),
                       ("tool_accuracy_by_digits", "accuracy (with the tool)"),
                       ("tool_call_rate_by_digits", "share calling the tool"),
                       ("accuracy_by_digits_few_shot", "accuracy (few-shot, direct)"),
                       ("accuracy_by_digits_few_shot_worked", "accuracy (few-shot, worked)")):
        if any(key in runs[n] for n in names):
            for d in map(str, range(1, 6)):
                row(f"{d}-digit {label}", [_ms(runs[n].get(key, {}).get(d)) for n in names])
    for key, label in (("accuracy", "all digits (greedy)"), ("accuracy_t1", "all digits (T=1)"),
                       ("format_ok", "format ok"), ("mean_length", "mean reply length"),
                       ("distinct", "distinct answers per prompt"), ("entropy", "entropy per reply token (T=1)"),
                       ("kl_to_reference", "KL to SFT per reply (T=1)"), ("bits_per_byte", "bits per byte (pretraining)"),
                       ("mean_reward", "mean reward-model score"), ("pass_at_8", "pass@8 (T=1)"),
                       ("held_out_accuracy", "held-out slice accuracy (greedy)"),
                       ("problems_file_accuracy", "unseen phrasings accuracy (greedy)")):
        row(label, [_ms(runs[n].get(key)) for n in names])
    if summary.get("leaderboard"):
        lines += ["", "## Leaderboard (Elo, mean ± std over seeds)" if many else "## Leaderboard (Elo, 1 seed)", "",
                  "| run | Elo |", "|---|---|"]
        lines += [f"| `{e['name']}` | {_ms(e, 0)} |" for e in summary["leaderboard"]]
    tables = [(summary[key], title) for key, title in (("win_rates", "Gold labeler win rates"),
                                                      ("rm_win_rates", "Reward-model win rates"))]
    tables += [(table, f"Correctness win rates, {d}-digit problems")
               for d, table in summary.get("correctness_win_rates", {}).items()]
    for table, title in tables:
        if not table:
            continue
        lines += ["", f"## {title} (mean ± std over seeds; each seed's bootstrap 95% interval)" if many else
                  f"## {title} (1 seed; its bootstrap 95% interval)", "",
                  "| pair | rate | intervals | every interval above ½ |", "|---|---|---|---|"]
        for pair, w in table.items():
            a, _, b = pair.partition(" vs ")
            if a in names and b in names and names.index(a) < names.index(b):
                continue  # (each pair once: the later stage against the earlier)
            ivs = "; ".join(f"s{s} [{lo:.2f}, {hi:.2f}]" for s, (lo, hi) in w["intervals"].items())
            lines.append(f"| {pair} | {_ms(w)} | {ivs} | {'yes' if w['all_above_half'] else 'no'} |")
    return "\n".join(lines) + "\n"


def run(workdir: Path, seeds: int, scale: float, overrides: list[str], *, problems: int, best_of: int, log,
        tools: str = "") -> dict:
    if seeds < 1:
        raise UserError(f"--seeds must be ≥ 1, got {seeds}")
    if not scale > 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    if tools:
        from plutao.tools import ToolError, tools_named

        try:
            tools_named(tools)
        except ToolError as e:
            raise UserError(f"--tools {tools}: {e} (or none)") from None
    per_stage = split_overrides(overrides)
    reports = {}
    for s in range(seeds):
        reports[s] = run_seed(workdir / f"seed{s}", s, scale, per_stage, problems=problems, best_of=best_of, log=log,
                              tools=tools)
    summary = summarize(reports)
    _write(workdir / "summary.json", json.dumps(summary, indent=2))
    _write(workdir / "summary.md", markdown(summary))
    log(f"pipeline: {workdir / 'summary.md'}")
    return summary
