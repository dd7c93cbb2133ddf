"""The arithmetic chat world (version 2): every stage of turning a base model into an assistant, measurable.

Everything here is a pure function of (world settings, index): the same seed gives the same
documents, demonstrations, prompts and rankings on every machine.

- Problems: sums and differences of 1 to `max_digits` digit numbers, the digit count drawn by
  `digit_weights`, one operand sometimes shorter; a difference is never negative. A fixed
  slice of problems, defined by a hash of the problem alone (`held_out`), never appears in any
  training stream, so the report card can measure it apart from anything memorised.
- Two answer forms: direct (`347+589=936`) and **worked**, column by column from the units digit
  with its carry or borrow, then the answer (`347+589: 7+9=16, 4+8+1=13, 3+5+1=9, so 936`). In a
  difference a borrowed column shows the ten it borrowed and the next column the one it paid
  (`912-589: 12-9=3, 11-8-1=2, 9-5-1=3, so 323`).
- `pretraining_documents`: "internet-like" text of equations in a few surface forms (a share of them
  worked), English with a Portuguese minority, a few percent wrong (one wrong step, or a result off
  by ±10^k), and run-on pseudo-dialogue that never stops where an assistant would.
- `demonstration`: a chat (OpenAI-style `messages`) answered by a *fallible* demonstrator: worked
  replies at `worked_rate` (always when the system prompt asks to think step by step, never when it
  asks for the number only); an error is one wrong step, carried through consistently, so it is
  visible where it happens.
- `comparison_prompt`, `rl_prompt`: questions drawn by `prompt_digit_weights` (where an SFT model is
  partly right, so ranked replies differ in correctness).
- `gold_key` / `gold_order`: the hidden labeler, also the judge of the report card:
  correct ≻ ended ≻ share of correct steps (worked) or of correct digits (direct); no length term.
  `labeler_ranks` adds Bradley–Terry noise: P(i above j) = σ((u_i − u_j)/noise) for gold utilities u.

Prompts that measure a model of the world without training it (few-shot, unseen phrasings): arith_prompts.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from collections.abc import Sequence

import numpy as np

# Purposes folded into every generator's seed: each stream of the world is independent of the others.
(EQUATIONS, DIALOGUE, DEMOS, DEMOS_VAL, COMPARE, COMPARE_VAL, PROBLEMS, LABELER, K_DRAW, FEWSHOT, RL_PROMPTS,
 HELD_OUT, UNSEEN_STREAM) = range(13)
MAX_DIGITS = 5  # the report card's digit buckets: 1..5 (beyond world.max_digits: out of distribution)
VERSION = 2
NUMBER = re.compile(r"-?\d+")
STEP = re.compile(r"\d+[+-]\d+(?:[+-]1)?=\d+")
WORKED = re.compile(r"^(\d+)([+-])(\d+): (\d+[+-]\d+(?:[+-]1)?=\d+(?:, \d+[+-]\d+(?:[+-]1)?=\d+)*), so (\d+)$")


@dataclasses.dataclass(frozen=True)
class World:
    seed: int = 0
    version: int = VERSION  # the generator's version; a run of another version cannot regenerate its data
    max_digits: int = 3  # the training range: 1..max_digits digit problems
    digit_weights: list[float] = dataclasses.field(default_factory=lambda: [1.0, 3.0, 4.0])  # per digit count
    prompt_digit_weights: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 2.0])  # comparisons, RL
    shorter_operand: float = 0.25  # problems with one operand of fewer digits
    portuguese: float = 0.15  # share of Portuguese text in every stream
    worked_share: float = 0.4  # pretraining equations written worked
    wrong_share: float = 0.03  # pretraining equations with a wrong result
    demo_error_rate: float = 0.08  # demonstrations with one wrong step
    worked_rate: float = 0.5  # demonstrations answered worked (unless the system prompt decides)
    verbose_rate: float = 0.1  # direct demonstrations answered in a sentence
    tool_rate: float = 0.0  # demonstrations answered with the calculator (tool_demo_reply)
    tool_digit_weights: list[float] = dataclasses.field(default_factory=lambda: [1.0] * MAX_DIGITS)  # theirs, 1..5
    held_out_permille: int = 20  # problems (by hash) kept out of every training stream
    labeler_noise: float = 0.0  # Bradley–Terry temperature of the labeler (0 = the gold order)
    documents: int = 16000  # pretraining documents of equations and of dialogue (each)
    demonstrations: int = 12000
    comparisons: int = 2000  # prompts ranked for the reward model (plus a held-out tenth)
    k_min: int = 4
    k_max: int = 9

    def rng(self, purpose: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, purpose, index])


def version_problem(world: World) -> str | None:
    """Why a world's data cannot be generated again (a run recorded with another version), or None."""
    if world.version == VERSION:
        return None
    return (f"world.version={world.version}: this plutao generates the arithmetic world version {VERSION} only; "
            "train the stages on builtin:arith again (plutao pipeline arith) rather than continue this run")


def problems_in_config(world: World) -> list[str]:
    """What is wrong with a world's settings, as one-line messages (the version: `version_problem`)."""
    problems = []
    if not 1 <= world.max_digits <= MAX_DIGITS:
        problems.append(f"world.max_digits must be in 1..{MAX_DIGITS}, got {world.max_digits}")
    for key, n in (("digit_weights", world.max_digits), ("prompt_digit_weights", world.max_digits),
                   ("tool_digit_weights", MAX_DIGITS)):
        weights = getattr(world, key)
        if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
            problems.append(f"world.{key} needs one non-negative weight per digit count 1..{n}, not all zero; got {weights}")
    for key in ("shorter_operand", "portuguese", "worked_share", "wrong_share", "demo_error_rate", "worked_rate",
                "verbose_rate", "tool_rate"):
        if not 0.0 <= getattr(world, key) <= 1.0:
            problems.append(f"world.{key} must be in [0, 1], got {getattr(world, key)}")
    if not 0 <= world.held_out_permille < 1000:
        problems.append(f"world.held_out_permille must be in 0..999, got {world.held_out_permille}")
    if world.labeler_noise < 0:
        problems.append(f"world.labeler_noise must be ≥ 0 (0 = the gold labeler), got {world.labeler_noise}")
    if not 2 <= world.k_min <= world.k_max <= 16:
        problems.append(f"world.k_min..world.k_max must satisfy 2 ≤ k_min ≤ k_max ≤ 16, got {world.k_min}..{world.k_max}")
    for key in ("documents", "demonstrations", "comparisons"):
        if getattr(world, key) < 1:
            problems.append(f"world.{key} must be ≥ 1, got {getattr(world, key)}")
    return problems


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def digits(self) -> int:
        return max(len(str(self.a)), len(str(self.b)))

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "op": self.op}


def number(rng: np.random.Generator, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(lo, 10 ** digits))


def problem(rng: np.random.Generator, digits: int, op: str | None = None, shorter: float = 0.0) -> Problem:
    """A `digits`-digit problem: both operands that long (GPT-3's n-digit arithmetic), or with
    probability `shorter` one of them shorter; a difference is never negative."""
    op = op or ("+" if rng.random() < 0.6 else "-")
    a = number(rng, digits)
    b = number(rng, int(rng.integers(1, digits)) if digits > 1 and rng.random() < shorter else digits)
    if rng.random() < 0.5:
        a, b = b, a
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, b, op)


def held_out(world: World, p: Problem) -> bool:
    """Whether a problem is in the held-out slice: a hash of the problem alone (the same in every seed
    and stream), so no training stream ever shows it. Only problems whose operands both have two digits
    or more: a one-digit problem is a column step of many worked answers, so it cannot be kept out. A
    sum is hashed with its operands in order (347+589 and 589+347 are one problem, held out together)."""
    a, b = (min(p.a, p.b), max(p.a, p.b)) if p.op == "+" else (p.a, p.b)
    return min(a, b) >= 10 and zlib.crc32(f"{a}{p.op}{b}".encode()) % 1000 < world.held_out_permille


def draw_digits(rng: np.random.Generator, weights: Sequence[float]) -> int:
    w = np.asarray(weights, np.float64)
    return int(rng.choice(len(w), p=w / w.sum())) + 1


def training_problem(world: World, rng: np.random.Generator, weights: Sequence[float] | None = None) -> Problem:
    """A problem of the training range (digit count by `weights`, default world.digit_weights), never
    one of the held-out slice."""
    while True:
        p = problem(rng, draw_digits(rng, world.digit_weights if weights is None else weights),
                    shorter=world.shorter_operand)
        if not held_out(world, p):
            return p


# --- worked answers ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Slip:
    """One wrong step: in column `column` (0 = units) the result is off by `delta`."""

    column: int
    delta: int


def worked(p: Problem, slip: Slip | None = None) -> tuple[list[str], int]:
    """(the column steps from the units digit up, the answer they spell out). With a slip, that step's
    result is wrong and everything after follows from it (carries read off the written results)."""
    a, b = str(p.a), str(p.b)
    n = max(len(a), len(b))
    a, b = a.zfill(n), b.zfill(n)
    steps, digits, carry = [], [], 0
    for i in range(n):
        x, y = int(a[-1 - i]), int(b[-1 - i])
        if p.op == "+":
            value = x + y + carry
            left = f"{x}+{y}" + ("+1" if carry else "")
            if slip is not None and slip.column == i:
                value = min(max(value + slip.delta, 0), 19)
            digits.append(value % 10)
            carry = value // 10
        else:
            borrow = x - y - carry < 0
            value = x + 10 * borrow - y - carry
            left = f"{x + 10 * borrow}-{y}" + ("-1" if carry else "")
            if slip is not None and slip.column == i:
                value = min(max(value + slip.delta, 0), 9)
            digits.append(value)
            carry = int(borrow)
        steps.append(f"{left}={value}")
    if p.op == "+" and carry:
        digits.append(carry)
    return steps, int("".join(map(str, reversed(digits))))


def worked_text(p: Problem, slip: Slip | None = None) -> str:
    steps, answer = worked(p, slip)
    return f"{p.a}{p.op}{p.b}: {', '.join(steps)}, so {answer}"


def slip_for(p: Problem, rng: np.random.Generator) -> Slip:
    """A single wrong step that changes the answer: a column's result off by one (a forgotten carry or
    borrow where the column had one)."""
    n = p.digits
    for _ in range(20):
        slip = Slip(int(rng.integers(n)), -1 if rng.random() < 0.5 else 1)
        if worked(p, slip)[1] != p.answer:
            return slip
    return Slip(0, 1 if worked(p, Slip(0, 1))[1] != p.answer else -1)


def off_by_power(p: Problem, rng: np.random.Generator) -> int:
    """A wrong result of a direct answer, uniform in kind: ±10^k for k in 0..(digits of the answer − 1)."""
    k = int(rng.integers(len(str(p.answer))))
    wrong = p.answer + (10 ** k if rng.random() < 0.5 or p.answer < 10 ** k else -10 ** k)
    return wrong if wrong >= 0 else p.answer + 1


# --- surface forms ---------------------------------------------------------------------------------

WORDS = {"en": {"+": "plus", "-": "minus"}, "pt": {"+": "mais", "-": "menos"}}


def language(world: World, rng: np.random.Generator) -> str:
    return "pt" if rng.random() < world.portuguese else "en"


def answer_text(p: Problem, world: World, rng: np.random.Generator, worked_form: bool, wrong: bool) -> str:
    """The answer to p as the text shows it: worked (its own restatement and steps) or the bare result."""
    if worked_form:
        return worked_text(p, slip_for(p, rng) if wrong else None)
    return str(off_by_power(p, rng) if wrong else p.answer)


def _equation_line(p: Problem, world: World, rng: np.random.Generator) -> str:
    lang = language(world, rng)
    wrong = rng.random() < world.wrong_share
    if rng.random() < world.worked_share:
        answer = answer_text(p, world, rng, True, wrong)
        form = int(rng.integers(2))
        return answer if form == 0 else f"Q: {question(p, lang, 0)}\nA: {answer}"
    answer = answer_text(p, world, rng, False, wrong)
    form = int(rng.integers(4))
    if form == 0:
        return f"{p.a}{p.op}{p.b}={answer}"
    if form == 1:
        return f"{p.a} {p.op} {p.b} = {answer}"
    if form == 2:
        return f"{p.a} {WORDS[lang][p.op]} {p.b} {'is' if lang == 'en' else 'é'} {answer}."
    return f"Q: {question(p, lang, 0)}\nA: {answer}"


def equations_document(world: World, index: int) -> str:
    rng = world.rng(EQUATIONS, index)
    return "\n".join(_equation_line(training_problem(world, rng), world, rng) for _ in range(int(rng.integers(3, 10))))


def dialogue_document(world: World, index: int) -> str:
    """A run-on pseudo-dialogue: turn after turn, the speakers never stop (unlike an assistant)."""
    rng = world.rng(DIALOGUE, index)
    lang = language(world, rng)
    who = [("User", "Assistant"), ("Q", "A"), ("Human", "Bot")][int(rng.integers(3))] if lang == "en" else (
        "Pergunta", "Resposta")
    lines = []
    for _ in range(int(rng.integers(4, 12))):
        p = training_problem(world, rng)
        lines.append(f"{who[0]}: {question_text(p, rng, lang)}")
        lines.append(f"{who[1]}: {answer_text(p, world, rng, rng.random() < world.worked_share, rng.random() < world.wrong_share)}")
        if rng.random() < 0.2:
            lines.append(f"{who[0]}: {['thanks', 'ok', 'cool'][int(rng.integers(3))] if lang == 'en' else 'obrigado'}")
    return "\n".join(lines)


def pretraining_documents(world: World, kind: str) -> list[str]:
    make = {"equations": equations_document, "dialogue": dialogue_document}[kind]
    return [make(world, i) for i in range(world.documents)]


# --- questions, demonstrations, prompts ------------------------------------------------------------

QUESTIONS = {
    "en": ["What is {a} {w} {b}?", "{a} {s} {b} = ?", "Compute {a} {s} {b}.", "How much is {a} {w} {b}?"],
    "pt": ["Quanto é {a} {w} {b}?", "Calcule {a} {s} {b}."],
}
STEP_BY_STEP = "Think step by step."
NUMBER_ONLY = "Answer with the number only."
SYSTEMS = ["You are a helpful assistant.", STEP_BY_STEP, NUMBER_ONLY, "Você é um assistente prestativo."]


def question(p: Problem, lang: str, form: int) -> str:
    return QUESTIONS[lang][form].format(a=p.a, b=p.b, s=p.op, w=WORDS[lang][p.op])


def question_text(p: Problem, rng: np.random.Generator, lang: str) -> str:
    return question(p, lang, int(rng.integers(len(QUESTIONS[lang]))))


def verbose_answer(value: int, rng: np.random.Generator, lang: str = "en") -> str:
    if lang == "pt":
        return f"A resposta é {value}."
    return [f"The answer is {value}.", f"That would be {value}.", f"It is {value}."][int(rng.integers(3))]


def demonstration(world: World, index: int, *, held_out_stream: bool = False) -> dict:
    """{"messages": [...], "problems": [...]}: one or two user questions (the training range) answered
    by the fallible demonstrator."""
    rng = world.rng(DEMOS_VAL if held_out_stream else DEMOS, index)
    system = SYSTEMS[int(rng.integers(len(SYSTEMS)))] if rng.random() < 0.4 else None
    messages = [{"role": "system", "content": system}] if system else []
    problems = []
    for _ in range(2 if rng.random() < 0.2 else 1):
        if world.tool_rate and system != STEP_BY_STEP and rng.random() < world.tool_rate:
            p = training_problem(world, rng, world.tool_digit_weights)  # (beyond the training range too)
            messages += [{"role": "user", "content": question_text(p, rng, language(world, rng))},
                         *tool_demo_reply(p, len(problems))]
        else:
            p = training_problem(world, rng)
            lang = language(world, rng)
            wrong = rng.random() < world.demo_error_rate
            worked_form = system == STEP_BY_STEP or (system != NUMBER_ONLY and rng.random() < world.worked_rate)
            reply = answer_text(p, world, rng, worked_form, wrong)
            if not worked_form and rng.random() < world.verbose_rate:
                reply = verbose_answer(int(reply), rng, lang)
            messages += [{"role": "user", "content": question_text(p, rng, lang)},
                         {"role": "assistant", "content": reply}]
        problems.append(p.to_dict())
    return {"messages": messages, "problems": problems}


def tool_demo_reply(p: Problem, k: int) -> list[dict]:
    """The demonstrator's reply with the calculator, as OpenAI messages: the call, its result, the answer."""
    call = {"id": f"call_{k}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{p.a}{p.op}{p.b}"})}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": str(p.answer)},
            {"role": "assistant", "content": str(p.answer)}]


def demonstrations(world: World, n: int | None = None, *, held_out: bool = False) -> list[dict]:
    return [demonstration(world, i, held_out_stream=held_out) for i in range(world.demonstrations if n is None else n)]


def longest_reply(world: World, digits: int | None = None) -> int:
    """Characters in the longest reply the demonstrator writes for `digits`-digit problems (default the
    training range): a worked sum whose every column carries."""
    d = digits or world.max_digits
    p = Problem(10 ** d - 1, 10 ** d - 1, "+")
    return max(len(worked_text(p)), len(verbose_answer(p.answer, np.random.default_rng(0), "en")) + 4)


REPLY_MARGIN = 8


def reply_budget(world: World, context: int | None = None) -> int:
    """The one reply budget (in tokens, at most one per character) of comparisons, rollouts and the report
    card: the longest reply the demonstrator's form gives a MAX_DIGITS-digit problem, plus a margin, so
    a worked reply to the report card's longest problems fits too; with `context`, at most half of it
    less one (the prompt keeps the other half)."""
    budget = longest_reply(world, MAX_DIGITS) + REPLY_MARGIN
    return budget if context is None else max(min(budget, context // 2 - 1), 1)


def comparison_prompt(world: World, index: int, *, held_out: bool = False) -> tuple[list[dict], Problem, int]:
    """(messages without the answer, the problem, K): a fresh question (world.prompt_digit_weights) and
    how many responses to rank for it (k_min..k_max)."""
    rng = world.rng(COMPARE_VAL if held_out else COMPARE, index)
    p = training_problem(world, rng, world.prompt_digit_weights)
    k = int(world.rng(K_DRAW, index * 2 + held_out).integers(world.k_min, world.k_max + 1))
    return [{"role": "user", "content": question_text(p, rng, language(world, rng))}], p, k


def rl_prompt(world: World, index: int) -> tuple[list[dict], Problem]:
    """Prompt `index` of reinforcement learning: a fresh question drawn as the reward model's
    comparisons are (world.prompt_digit_weights; its own seed stream)."""
    rng = world.rng(RL_PROMPTS, index)
    p = training_problem(world, rng, world.prompt_digit_weights)
    return [{"role": "user", "content": question_text(p, rng, language(world, rng))}], p


def evaluation_problem(world: World, digits: int, index: int, system: str | None = None) -> tuple[list[dict], Problem]:
    """Report-card problem `index` of a digit bucket: an English question in chat form, both operands
    `digits` long (its own seed stream; `system`: an optional system prompt)."""
    rng = world.rng(PROBLEMS, digits * 1_000_003 + index)
    p = problem(rng, digits)
    return _chat(system, question(p, "en", 0)), p


def held_out_problem(world: World, index: int, system: str | None = None) -> tuple[list[dict], Problem]:
    """Problem `index` of the held-out slice (the training range's digit weights, never trained on);
    None-free: with world.held_out_permille = 0 the slice is empty and this raises ValueError."""
    if not has_held_out_slice(world):
        raise ValueError("this world has no held-out slice (world.held_out_permille is 0, or no problems of 2+ digits)")
    rng = world.rng(HELD_OUT, index)
    while True:
        p = problem(rng, draw_digits(rng, world.digit_weights), shorter=world.shorter_operand)
        if held_out(world, p):
            return _chat(system, question(p, "en", 0)), p


def has_held_out_slice(world: World) -> bool:
    """Whether the training range has a held-out slice: problems of two digits or more, and a share kept."""
    return world.held_out_permille > 0 and any(w > 0 for w in world.digit_weights[1:])


def _chat(system: str | None, text: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# --- the gold labeler -------------------------------------------------------------------------------

def numbers_in(reply: str) -> list[int]:
    return [int(x) for x in NUMBER.findall(reply)]


def answer_of(reply: str) -> int | None:
    """The reply's answer: its last number (None when it has none)."""
    found = numbers_in(reply)
    return found[-1] if found else None


def reply_form(reply: str) -> str | None:
    """"worked" for a well-formed worked reply, "direct" for one holding a single number, else None."""
    if WORKED.match(reply.strip()):
        return "worked"
    return "direct" if len(numbers_in(reply)) == 1 else None


def partial_credit(value: int | None, truth: int) -> float:
    """Share of digits right, aligned from the units digit, over the longer of the two numbers."""
    if value is None:
        return 0.0
    a, b = str(abs(value)), str(abs(truth))
    n = max(len(a), len(b))
    a, b = a.zfill(n), b.zfill(n)
    return sum(x == y for x, y in zip(a, b)) / n


def step_credit(p: Problem, reply: str) -> float:
    """Share of the true column steps the reply writes, in place, over the longer of the two lists."""
    truth, written = worked(p)[0], STEP.findall(reply)
    return sum(x == y for x, y in zip(truth, written)) / max(len(truth), len(written))


def credit(p: Problem, reply: str) -> float:
    """Partial credit: for a well-formed worked reply the mean of its share of correct steps and its
    answer's share of correct digits (right steps with a wrong answer are not full credit); for any
    other reply the answer's share of correct digits."""
    digits = partial_credit(answer_of(reply), p.answer)
    return (step_credit(p, reply) + digits) / 2 if reply_form(reply) == "worked" else digits


def gold_key(p: Problem, reply: str, ended: bool) -> tuple:
    """Larger is better: correct ≻ properly ended ≻ partial credit. No length term: a worked reply and a
    direct one that are both right and ended tie."""
    return (answer_of(reply) == p.answer, ended, credit(p, reply))


def correct(p: Problem, reply: str) -> bool:
    return answer_of(reply) == p.answer


def gold_ranks(keys: Sequence[tuple]) -> list[int]:
    """Rank of each response (0 = best; equal keys share a rank)."""
    distinct = sorted(set(keys), reverse=True)
    return [distinct.index(k) for k in keys]


def labeler_ranks(keys: Sequence[tuple], noise: float, rng: np.random.Generator) -> list[int]:
    """The labeler's ranks: the gold ranks, or with noise > 0 a Bradley–Terry/Plackett–Luce draw in
    which response i lands above j with probability σ((u_i − u_j)/noise), u = minus the gold rank."""
    gold = gold_ranks(keys)
    if noise <= 0:
        return gold
    # One draw per distinct reply quality: identical replies stay tied (a pair of them teaches nothing).
    levels = sorted(set(gold))
    u = -np.asarray(levels, np.float64) + noise * rng.gumbel(size=len(levels))
    place = {level: int(r) for level, r in zip(levels, np.argsort(np.argsort(-u, kind="stable")))}
    return [place[g] for g in gold]


def pair_agreement(noise: float) -> float:
    """Expected share of pairs a noisy labeler orders as gold does, for responses one gold rank apart."""
    return 1.0 if noise <= 0 else 1.0 / (1.0 + math.exp(-1.0 / noise))
