"""`plutao report-card`: the stages of the arithmetic-world assistant (base model → SFT → reward model
→ later runs) side by side, on the same problems with the same sampling seeds.

Columns: one per run (named by its directory), and with `--reward RM_RUN --best-of N` a column
`NAME+best-of-N` per chat run: N temperature-1 replies per problem sampled in one batch, the one the
reward model scores highest kept. Rows:

- exact-match accuracy on 1–5 digit sums and differences (`arith.evaluation_problem`: questions of
  their own seed stream, never trained on), greedy and temperature-1 pass@1, as in GPT-3's arithmetic
  table. A base run is asked through the chat template like every run, and also GPT-3's way: a
  few-shot plain-text prompt, its continuation cut at the first newline;
- format compliance: the share of greedy chat replies that end with <|end|> within the token budget,
  hold exactly one number, and do not run on into a <|user|> turn of their own;
- the gold win rate of every column against every other (the world's hidden labeler,
  `arith.gold_key`, on the same prompts; a tie counts ½) with a bootstrap 95% interval over
  problems, and with --reward the reward model's verdict beside it;
- the mean log-probability of each problem's gold answer by digit count (the direct reply with
  <|end|>, or " ANSWER\n" after a base run's few-shot prompt: experiments/report_card_likelihood.py),
  and KL to the first SFT column with the entropy of each column's temperature-1 replies;
- mean reply length, distinct answers per prompt at temperature 1, and bits per byte on the
  held-out pretraining mixture of the run's base ancestor (what the later stages cost the base skill);
- with --problems-file: the accuracy on the user's own problems.

The metrics are pure functions of the replies (experiments/report_card_stats.py); `evaluate`
does the sampling, every column in fixed-size batched calls so one compiled program serves them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from plutao.experiments.report_card_files import ColumnCache, checkpoint_stamp
from plutao.experiments.report_card_likelihood import gold_logprobs, kl_and_entropy
from plutao.experiments.report_card_stats import (
    BEST_OF,
    BEST_OF_DISTINCT,
    DIGITS,
    DISTINCT,
    DISTINCT_SAMPLES,
    FILE_BEST_OF,
    T1,
    Reply,
    combined_bits_per_byte,
    mean_by_digits,
    window_cap,
)
from plutao.experiments.report_card_summary import summarize
from plutao.experiments.report_card_tools import tool_replies
from plutao.model.decode import complete
from plutao.tokenizer.chat import prompt_ids, reply_stop_ids
from plutao.tools import ToolError, tools_named
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config
from plutao.train.eval.likelihood import stream_metrics
from plutao.train.run.lineage import load_run
from plutao.train.run.rundir import existing_run_config, parse_init_from, read_run_config
from plutao.train.worlds import arith, arith_prompts

ROWS_PER_CALL = 256  # rows of every sampling call (the last one padded): one compiled program
DISTINCT_PROBLEMS = 50  # problems the diversity and pass@8 rows sample (spread over the digit counts)


def pretraining_ancestor(run_dir: Path) -> Path | None:
    """The base run (train.task "") a run descends from, following config.json's lineage.parent (or
    train.init_from); the run itself when it is one; None when the chain breaks."""

    seen = set()
    run_dir = Path(run_dir)
    while run_dir.absolute() not in seen:
        seen.add(run_dir.absolute())
        try:
            saved = read_run_config(run_dir)
        except UserError:
            return None
        if saved is None:
            return None
        if not saved.get("train", {}).get("task", ""):
            return run_dir
        parent = saved.get("lineage", {}).get("parent")
        init_from = saved.get("train", {}).get("init_from")
        if not parent and not init_from:
            return None
        run_dir = Path(parent) if parent else parse_init_from(str(init_from))[0]
    return None


# --- sampling ----------------------------------------------------------------------------------------

def stream_seeds(seed: int, purpose: int, n: int) -> list[int]:
    return np.random.default_rng([seed, purpose]).integers(0, 2 ** 31, size=n).tolist()


def fit(ids: Sequence[int], context: int, budget: int) -> list[int]:
    """A prompt's last tokens, leaving room for the reply (the sampler handles any overflow after)."""
    return list(ids)[-max(context - budget, context // 2, 1):]


def sample(model, tokenizer, prompts: Sequence[Sequence[int]], *, temperature: float, seeds: Sequence[int],
           stop_ids: Sequence[int], budget: int, rows_per_call: int = ROWS_PER_CALL) -> list[Reply]:
    """Each prompt's reply, in calls of exactly `rows_per_call` rows (the last one padded)."""
    from plutao.model.sampling import SamplingConfig

    out = []
    for lo in range(0, len(prompts), rows_per_call):
        part, part_seeds = list(prompts[lo:lo + rows_per_call]), list(seeds[lo:lo + rows_per_call])
        n = len(part)
        part += [part[-1]] * (rows_per_call - n)
        part_seeds += [0] * (rows_per_call - n)
        samplings = [SamplingConfig(temperature=temperature, max_new_tokens=budget, seed=s, stop_ids=tuple(stop_ids))
                     for s in part_seeds]
        for c in complete(model, part, samplings, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)[:n]:
            out.append(Reply(tokenizer.decode(c.content), len(c.content), c.stop_token, tuple(c.tokens)))
    return out


SYSTEMS = {"step_by_step": arith.STEP_BY_STEP, "direct": arith.NUMBER_ONLY}  # "ask for precision" rows


@dataclasses.dataclass
class Problems:
    """The digit-bucket problems every column answers, in bucket order, and the held-out slice."""

    world: arith.World
    messages: list[list[dict]]
    problems: list[arith.Problem]
    distinct: list[int]  # indices of the problems the diversity row samples
    held_out: list[tuple[list[dict], arith.Problem]]  # the world's held-out slice (never trained on)
    budget: int  # reply tokens (arith.reply_budget)

    @property
    def digits_P(self) -> np.ndarray:
        return np.array([p.digits for p in self.problems])

    def reply_tokens(self, run) -> int:
        """A run's reply budget: the world's, at most half its context less one (as Config.reply_tokens)."""
        return arith.reply_budget(self.world, run.cfg.model.context_length)

    def with_system(self, system: str) -> list[list[dict]]:
        return [[{"role": "system", "content": system}] + m for m in self.messages]


def evaluation_problems(world: arith.World, per_digit: int) -> Problems:
    messages, problems, distinct = [], [], []
    per_bucket = max(DISTINCT_PROBLEMS // len(DIGITS), 1)
    for d in DIGITS:
        for i in range(per_digit):
            m, p = arith.evaluation_problem(world, d, i)
            if i < per_bucket:
                distinct.append(len(problems))
            messages.append(m)
            problems.append(p)
    held = [arith.held_out_problem(world, i) for i in range(per_digit)] if arith.has_held_out_slice(world) else []
    return Problems(world, messages, problems, distinct, held, arith.reply_budget(world))


def few_shot_ids(tok, world: arith.World, p: arith.Problem, limit: int, worked: bool) -> tuple[list[int], int]:
    """(GPT-3's plain-text prompt after <|endoftext|>, the number of solved examples in it): as many of
    the 4 examples as fit `limit` tokens, never a cut-off one (with none fitting, the question's last
    `limit` tokens)."""
    for shots in range(4, -1, -1):
        ids = [tok.eot_id] + tok.encode_unseen(arith_prompts.few_shot_prompt(world, p, shots, worked_form=worked)).tolist()
        if len(ids) <= limit or shots == 0:
            return ids[-limit:], shots
    raise AssertionError("unreachable")


@dataclasses.dataclass
class Column:
    """One column's replies: greedy (chat template), temperature 1, few-shot (base runs), the diversity
    groups, the problems file's replies, and with --reward the reward of each greedy reply."""

    name: str
    run_dir: Path
    step: int
    kind: str  # "base", "chat" or "best-of"
    greedy: list[Reply]
    t1: list[Reply]
    distinct: list[list[str]]
    few_shot: list[Reply] | None = None
    file_replies: list[Reply] | None = None
    rewards: np.ndarray | None = None
    best_of: int = 0
    # Further greedy replies by name: "few_shot_worked" (a base run), "step_by_step" and "direct" (a chat
    # run asked with a system prompt), "held_out" (the world's held-out slice); and the few-shot
    # examples that fit each prompt ("shots", "shots_worked").
    extra: dict[str, list[Reply]] = dataclasses.field(default_factory=dict)
    shots: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # Per-reply counts of the "tools" replies: "tool_calls", "tool_errors" (experiments/report_card_tools.py).
    counts: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def _chat_ids(tokenizer, messages: Sequence[list[dict]], context: int, budget: int) -> list[list[int]]:
    return [fit(prompt_ids(m, tokenizer), context, budget) for m in messages]


def _rewards(scorer, messages: Sequence[list[dict]], replies: Sequence[Reply]) -> np.ndarray:
    """Rewards of the replies as they ended (one without <|end|> is scored without it)."""
    end_id = scorer.tokenizer.end_id
    return scorer.score([m + [{"role": "assistant", "content": r.text}] for m, r in zip(messages, replies)],
                        ended=[r.stop == end_id for r in replies])


def run_column(run, problems: Problems, file_messages: list[list[dict]] | None, seed: int, log,
               tools: Sequence[str] = ()) -> Column:
    """Every reply a run's column needs, each kind in one batched sampling pass."""

    tok, model, context, budget = run.tokenizer, run.model, run.cfg.model.context_length, problems.reply_tokens(run)
    name, stops = run.run_dir.name, reply_stop_ids(tok)

    def greedy_on(messages):
        return sample(model, tok, _chat_ids(tok, messages, context, budget), temperature=0.0, seeds=[0] * len(messages),
                      stop_ids=stops, budget=budget)

    ids = _chat_ids(tok, problems.messages, context, budget)
    n = len(ids)
    log(f"report-card: {name}: {n} greedy and {n} temperature-1 replies")
    greedy = sample(model, tok, ids, temperature=0.0, seeds=[0] * n, stop_ids=stops, budget=budget)
    t1 = sample(model, tok, ids, temperature=1.0, seeds=stream_seeds(seed, T1, n), stop_ids=stops, budget=budget)
    rows = [ids[i] for i in problems.distinct for _ in range(DISTINCT_SAMPLES)]
    log(f"report-card: {name}: {len(rows)} temperature-1 replies for the diversity row")
    many = sample(model, tok, rows, temperature=1.0, seeds=stream_seeds(seed, DISTINCT, len(rows)), stop_ids=stops,
                  budget=budget)
    distinct = [[r.text for r in many[k:k + DISTINCT_SAMPLES]] for k in range(0, len(many), DISTINCT_SAMPLES)]
    column = Column(name, run.run_dir, run.step, "chat" if run.task.chat else "base", greedy, t1, distinct)
    if problems.held_out:
        log(f"report-card: {name}: {len(problems.held_out)} greedy replies on the held-out slice")
        column.extra["held_out"] = greedy_on([m for m, _ in problems.held_out])
    if run.task.chat:
        for row, system in SYSTEMS.items():
            log(f"report-card: {name}: {n} greedy replies with the system prompt {system!r}")
            column.extra[row] = greedy_on(problems.with_system(system))
    else:
        newline = tok.encode_unseen("\n").tolist()
        for row, worked in (("few_shot", False), ("few_shot_worked", True)):
            log(f"report-card: {name}: {n} greedy few-shot replies (base model, GPT-3's prompt, "
                f"{'worked' if worked else 'direct'} examples)")
            limit = max(context - budget, context // 2, 1)  # (as `fit` leaves room for the reply)
            plain, shots = zip(*(few_shot_ids(tok, problems.world, p, limit, worked) for p in problems.problems))
            replies = sample(model, tok, list(plain), temperature=0.0, seeds=[0] * n, budget=budget,
                             stop_ids=newline if len(newline) == 1 else ())
            column.shots["shots_worked" if worked else "shots"] = list(shots)
            if worked:
                column.extra[row] = replies
            else:
                column.few_shot = replies
    if tools and run.task.chat and tok.has_tools:
        column.extra["tools"], column.counts["tool_calls"], column.counts["tool_errors"] = tool_replies(
            run, ids, tools, budget, ROWS_PER_CALL, log)
    if file_messages:
        log(f"report-card: {name}: {len(file_messages)} greedy replies to the problems file")
        column.file_replies = greedy_on(file_messages)
    return column


def best_of_column(run, scorer, n_best: int, problems: Problems, file_messages: list[list[dict]] | None, seed: int,
                   log) -> Column:
    """`NAME+best-of-N`: for each prompt N temperature-1 replies (one batch), the highest-reward one kept."""

    tok, model, context, budget = run.tokenizer, run.model, run.cfg.model.context_length, problems.reply_tokens(run)
    name = f"{run.run_dir.name}+best-of-{n_best}"

    def pick(messages, ids, purpose, what):
        rows = [x for x in ids for _ in range(n_best)]
        log(f"report-card: {name}: {len(rows)} temperature-1 replies ({what}), scored by the reward model")
        replies = sample(model, tok, rows, temperature=1.0, seeds=stream_seeds(seed, purpose, len(rows)),
                         stop_ids=reply_stop_ids(tok), budget=budget)
        rewards_PN = _rewards(scorer, [m for m in messages for _ in range(n_best)], replies).reshape(-1, n_best)
        best_P = np.argmax(rewards_PN, axis=1)  # (the first of equal rewards)
        kept = [replies[i * n_best + int(b)] for i, b in enumerate(best_P)]
        return kept, rewards_PN[np.arange(len(best_P)), best_P]

    ids = _chat_ids(tok, problems.messages, context, budget)
    kept, rewards = pick(problems.messages, ids, BEST_OF, "the digit problems")
    subset = [problems.messages[i] for i in problems.distinct for _ in range(DISTINCT_SAMPLES)]
    again, _ = pick(subset, _chat_ids(tok, subset, context, budget), BEST_OF_DISTINCT, "the diversity row")
    distinct = [[r.text for r in again[k:k + DISTINCT_SAMPLES]] for k in range(0, len(again), DISTINCT_SAMPLES)]
    column = Column(name, run.run_dir, run.step, "best-of", kept, kept, distinct, rewards=rewards, best_of=n_best)
    if file_messages:
        column.file_replies, _ = pick(file_messages, _chat_ids(tok, file_messages, context, budget), FILE_BEST_OF,
                                      "the problems file")
    return column


def bits_per_byte(run, cache: dict, log) -> tuple[float | None, str | None]:
    """(bits per byte on the held-out mixture of the run's pretraining ancestor, or None; a note)."""
    from plutao.train.data import sources as data_lib
    from plutao.train.run.rundir import existing_run_config

    name = run.run_dir.name
    base = pretraining_ancestor(run.run_dir)
    if base is None:
        return None, f"bits_per_byte of {name} is null: its pretraining run could not be found through config.json"
    key = (str(base.absolute()), run.tokenizer.fingerprint)
    if key not in cache:
        try:
            cfg = Config.from_dict(existing_run_config(base))
            cache[key] = data_lib.held_out_tokens(cfg.data, run.tokenizer, cfg.world)
        except UserError as e:
            cache[key] = str(e)
    sources = cache[key]
    if isinstance(sources, str):
        return None, f"bits_per_byte of {name} is null: the held-out data of {base} cannot be read ({sources})"
    context = run.cfg.model.context_length
    log(f"report-card: {name}: bits per byte on {len(sources)} held-out source(s) of {base.name}")
    metrics = [stream_metrics(run.trainer.graphdef, run.params, window_cap(np.asarray(tokens), context), context,
                              run.tokenizer) for _, tokens in sources if len(tokens) >= 2]
    if not metrics:
        return None, f"bits_per_byte of {name} is null: {base} has no held-out tokens"
    return combined_bits_per_byte(metrics), None


# --- checking the arguments, then the whole report ---------------------------------------------------

@dataclasses.dataclass
class Plan:
    runs: list[Path]
    names: list[str]
    chat: list[bool]  # per run: trained on the chat template
    reward: Path | None
    best_of: int
    problems: int
    file_problems: list[tuple[list[dict], str]] | None
    match: str
    seed: int
    out: Path | None = None  # the card's folder: finished columns are kept in OUT/columns/ while measuring
    tools: tuple[str, ...] = ()  # chat runs with the tool tokens also answer with these tools


def check(runs: Sequence[str], *, reward: str | None, best_of: int, problems: int, problems_file: str | None,
          match: str = "last-number", seed: int = 0, out: str | None = None, tools: str = "") -> Plan:
    """Everything that can be wrong with the arguments, as one-line UserErrors, before any model loads."""
    from plutao.train.data.conversations import read_problems
    from plutao.train.tasks import task_class

    if best_of < 0:
        raise UserError(f"--best-of must be ≥ 0 (0 = no best-of-N columns), got {best_of}")
    if best_of and not reward:
        raise UserError("--best-of N needs --reward RM_RUN to judge the N replies")
    if problems < 1:
        raise UserError(f"--problems must be ≥ 1 per digit count, got {problems}")
    if match not in ("last-number", "exact"):
        raise UserError(f"--match must be last-number or exact, got {match!r}")
    try:
        tool_names = tuple(tools_named(tools)) if tools else ()
    except ToolError as e:
        raise UserError(f"--tools: {e}") from None
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for report.md, report.json and the charts")
    file_problems = read_problems(problems_file) if problems_file else None
    paths, chat, supervised = [Path(r) for r in runs], [], []
    for path in paths:
        cfg = Config.from_dict(existing_run_config(path))
        kind = task_class(cfg)
        if kind.judges:
            raise UserError(f"{path} is a reward-model run; it scores replies rather than writing them: give it as "
                            "--reward RM_RUN, not as a column")
        if not kind.trained_by_gradient or "sample" not in kind.commands:
            raise UserError(f"{path} is a {kind.name} run; the report card compares language "
                            "models that write replies (base, SFT and later runs)")
        chat.append(kind.chat)
        supervised.append(kind.name == "sft")
    if reward:
        judge = task_class(Config.from_dict(existing_run_config(Path(reward))))
        if not judge.judges:
            raise UserError(f"--reward {reward} is not a reward-model run (it is a {judge.label} run); give the "
                            "--workdir of a `plutao reward` run")
    if best_of and not any(supervised):
        raise UserError("--best-of N adds a column per SFT run (the sampling-time alternative to RL), and none of the "
                        "runs is one")
    names = [p.name for p in paths] + [f"{p.name}+best-of-{best_of}" for p, c in zip(paths, supervised) if c and best_of]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two columns would be named {name!r}; columns are named by the run directory's name, so "
                            "give runs whose directories have different names")
    return Plan(paths, names, chat, Path(reward) if reward else None, best_of, problems, file_problems, match, seed,
                Path(out) if out is not None else None, tool_names)


def gold_sequences(run, problems: Problems) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt, gold answer) token ids per problem: a chat run's prompt through the template and the
    demonstrator's direct reply with <|end|>; a base run's direct few-shot prompt and " ANSWER\n" (the
    prompts cut to fit the context as the sampled ones are)."""
    tok, context, budget = run.tokenizer, run.cfg.model.context_length, problems.reply_tokens(run)
    if run.task.chat:
        answers = [tok.encode_unseen(str(p.answer)).tolist() + [tok.end_id] for p in problems.problems]
        return _chat_ids(tok, problems.messages, context, budget), answers
    limit = max(context - budget, context // 2, 1)
    prompts = [few_shot_ids(tok, problems.world, p, limit, False)[0] for p in problems.problems]
    return prompts, [tok.encode_unseen(f" {p.answer}\n").tolist() for p in problems.problems]


def reference_run(loaded) -> object | None:
    """The run KL is measured against: the first SFT run among the columns (the policy RL starts from)."""
    return next((r for r in loaded if r.task.name == "sft" and not r.cfg.lora.rank), None)


def column_key(run, plan: Plan, scorer, budget: int) -> dict:
    """What defines a run's column: the run and its checkpoint (and the pretraining ancestor's, whose
    held-out text gives bits per byte), the problems, the seed, and the reward model that scores it; a
    column kept under another key is measured again."""
    files = plan.file_problems
    ancestor = pretraining_ancestor(run.run_dir)
    return {"run": str(run.run_dir.absolute()), "step": run.step,
            "checkpoint": checkpoint_stamp(run.run_dir, run.step),
            "ancestor": None if ancestor is None else [str(ancestor.absolute()), checkpoint_stamp(ancestor)],
            "problems": plan.problems, "seed": plan.seed, "world": dataclasses.asdict(run.cfg.world),
            "reply_tokens": budget, "rows": sorted(SYSTEMS), "problems_file": [m for m, _ in files] if files else None,
            "reward": None if scorer is None else [str(Path(plan.reward).absolute()),
                                                   checkpoint_stamp(plan.reward, scorer.run.step),
                                                   float(scorer.offset), float(scorer.scale)]
            } | ({"tools": list(plan.tools)} if plan.tools else {})


def evaluate(plan: Plan, log: Callable[[str], None] = lambda msg: None) -> dict:
    """The report card of a checked plan, as the JSON object report.json holds. Each finished column is
    kept in OUT/columns/ (plan.out), and one kept there under the same key is reused: an interrupted
    card resumes from its finished columns."""
    from plutao.train.rl.rewards import RewardScorer

    loaded = [load_run(p) for p in plan.runs]  # (every run opens before any sampling)
    scorer = RewardScorer.load(plan.reward) if plan.reward else None
    if scorer is not None:
        for run, chat in zip(loaded, plan.chat):
            if chat and scorer.tokenizer.fingerprint != run.tokenizer.fingerprint:
                raise UserError(f"--reward {plan.reward} speaks another tokenizer than {run.run_dir}; use a reward "
                                "model trained from this run's lineage")
    world, notes = loaded[0].cfg.world, []
    if world.version != arith.VERSION:  # (its runs trained on problems the slice of this version holds)
        world = dataclasses.replace(world, held_out_permille=0)
        notes.append(f"no held-out slice row: {loaded[0].run_dir} was trained on the arithmetic world version "
                     f"{loaded[0].cfg.world.version}, whose streams did not keep this version's slice out")
    problems = evaluation_problems(world, plan.problems)
    file_messages = [m for m, _ in plan.file_problems] if plan.file_problems else None
    cache = ColumnCache(plan.out, write=jax.process_index() == 0)
    bpb_cache = {}
    columns, bits, keys = [], {}, {}

    def kept(name, key):
        hit = cache.get(name, key, Column)
        if hit is not None:
            log(f"report-card: {name}: measured before, reused from {cache.folder / (name + '.json')}")
        return hit

    for run in loaded:
        key = keys[run.run_dir.name] = column_key(run, plan, scorer, problems.reply_tokens(run))
        hit = kept(run.run_dir.name, key)
        if hit is not None:
            column, bits[column.name], note = hit
        else:
            column = run_column(run, problems, file_messages, plan.seed, log, plan.tools)
            bits[column.name], note = bits_per_byte(run, bpb_cache, log)
            if scorer is not None:
                column.rewards = _rewards(scorer, problems.messages, column.greedy)
            cache.put(key, column, bits[column.name], note)
        notes += [note] if note else []
        columns.append(column)
        if plan.best_of and run.task.name == "sft":
            best_key = key | {"best_of": plan.best_of}
            name = f"{run.run_dir.name}+best-of-{plan.best_of}"
            hit = kept(name, best_key)
            best = hit[0] if hit is not None else best_of_column(run, scorer, plan.best_of, problems, file_messages,
                                                                 plan.seed, log)
            if hit is None:
                cache.put(best_key, best, bits[column.name], None)
            bits[best.name] = bits[column.name]
            columns.append(best)
    reference = reference_run(loaded)
    kl = {}
    if reference is not None:
        against = {"run": str(reference.run_dir.absolute()), "step": reference.step}
        for run, column in zip(loaded, [c for c in columns if c.kind != "best-of"]):
            if run.tokenizer.fingerprint == reference.tokenizer.fingerprint:
                kl[column.name] = cache.derived(column.name, keys[column.name], "kl", against)
                if kl[column.name] is None:
                    log(f"report-card: {column.name}: KL to {reference.run_dir.name} over its temperature-1 replies")
                    ids = _chat_ids(run.tokenizer, problems.messages, run.cfg.model.context_length,
                                    problems.reply_tokens(run))
                    kl[column.name] = [float(v) for v in kl_and_entropy(run, reference, ids, column.t1)]
                    cache.put_derived(column.name, keys[column.name], "kl", kl[column.name], against)
    gold = {}
    for run, column in zip(loaded, [c for c in columns if c.kind != "best-of"]):
        gold[column.name] = cache.derived(column.name, keys[column.name], "gold_logprob")
        if gold[column.name] is None:
            log(f"report-card: {column.name}: log-probability of each problem's gold answer")
            gold[column.name] = gold_logprobs(run, *gold_sequences(run, problems))
            cache.put_derived(column.name, keys[column.name], "gold_logprob", gold[column.name])
    tok = loaded[0].tokenizer
    report = summarize(columns, problems, plan, bits, notes, end_id=tok.end_id, user_id=tok.user_id)
    for name, (k, e) in kl.items():
        report["runs"][name] |= {"kl_to_reference": k, "entropy": e}
    for name, values in gold.items():
        report["runs"][name] |= {"gold_logprob": float(np.mean(values)),
                                 "gold_logprob_by_digits": mean_by_digits(values, problems.digits_P)}
    report["settings"]["reference"] = reference.run_dir.name if reference is not None else None
    return report
