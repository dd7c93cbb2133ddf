"""The arithmetic chat world: every stage of turning a base model into an assistant, measurable.

Everything here is a pure function of (world settings, index): the same seed gives the same
documents, demonstrations, prompts and rankings on every machine.

- `pretraining_documents`: "internet-like" text with sums and differences of 1–5 digit numbers in
  many surface forms (`347+589=936`, "347 plus 589 is 936", tables, word problems, English and
  Portuguese), a share of them wrong (the noisy internet), and run-on pseudo-dialogue that never
  stops where an assistant would. Mixed with prose (the docstrings corpus) by the `arith-base` preset.
- `demonstration`: a chat (OpenAI-style `messages`) answered by a *fallible* demonstrator: 1–3 digit
  problems only, a carry error at `demo_error_rate`, now and then a verbose answer.
- `comparison_prompt`: fresh 1–4 digit questions for the reward model's rankings.
- `gold_key` / `gold_order`: the hidden labeler, also the judge of the report card:
  exact correctness ≻ digit-level partial credit ≻ shorter ≻ properly ended.
  `labeler_order` adds Bradley–Terry noise: P(i above j) = σ((u_i − u_j)/noise) for gold utilities u.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

# Purposes folded into every generator's seed: each stream of the world is independent of the others.
EQUATIONS, DIALOGUE, DEMOS, DEMOS_VAL, COMPARE, COMPARE_VAL, PROBLEMS, LABELER, K_DRAW, FEWSHOT, RL_PROMPTS = range(11)
MAX_DIGITS = 5
NUMBER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class World:
    seed: int = 0
    wrong_share: float = 0.1  # pretraining equations with a wrong result
    demo_error_rate: float = 0.08  # demonstrations with a carry error
    verbose_rate: float = 0.1  # demonstrations answered in a sentence
    labeler_noise: float = 0.0  # Bradley–Terry temperature of the labeler (0 = the gold order)
    documents: int = 12000  # pretraining documents of equations and of dialogue (each)
    demonstrations: int = 12000
    comparisons: int = 2000  # prompts ranked for the reward model (plus a held-out tenth)
    k_min: int = 4
    k_max: int = 9

    def rng(self, purpose: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, purpose, index])


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


def problem(rng: np.random.Generator, digits: int, op: str | None = None) -> Problem:
    """Both operands have `digits` digits (as in GPT-3's n-digit arithmetic); a difference is never negative."""
    op = op or ("+" if rng.random() < 0.6 else "-")
    a, b = number(rng, digits), number(rng, digits)
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, b, op)


def carry_error(p: Problem, rng: np.random.Generator) -> int:
    """The answer with one carry (or borrow) forgotten, or a digit off by one when there is none."""
    a, b, result = str(p.a), str(p.b), str(p.answer)
    n = max(len(a), len(b))
    a, b = a.zfill(n), b.zfill(n)
    carries = [i for i in range(n - 1) if (int(a[-1 - i]) + int(b[-1 - i]) >= 10 if p.op == "+"
                                           else int(a[-1 - i]) < int(b[-1 - i]))]
    if carries:
        i = int(rng.choice(carries))
        wrong = p.answer - 10 ** (i + 1) if p.op == "+" else p.answer + 10 ** (i + 1)
    else:
        i = int(rng.integers(len(result)))
        wrong = p.answer + (10 ** i if rng.random() < 0.5 or p.answer < 10 ** i else -10 ** i)
    return wrong if wrong != p.answer and wrong >= 0 else p.answer + 1


# --- surface forms ---------------------------------------------------------------------------------

WORDS = {"en": {"+": "plus", "-": "minus"}, "pt": {"+": "mais", "-": "menos"}}
NAMES = ["Ana", "Bruno", "Carla", "David", "Emma", "Felipe", "Grace", "Hugo", "Iris", "João", "Kate", "Luís"]
THINGS = {"en": ["apples", "books", "coins", "stamps", "marbles"], "pt": ["maçãs", "livros", "moedas", "selos"]}


def _equation_line(p: Problem, result: int, rng: np.random.Generator) -> str:
    lang = "pt" if rng.random() < 0.3 else "en"
    w = WORDS[lang][p.op]
    form = int(rng.integers(8))
    if form == 0:
        return f"{p.a}{p.op}{p.b}={result}"
    if form == 1:
        return f"{p.a} {p.op} {p.b} = {result}"
    if form == 2:
        return f"{p.a} {w} {p.b} is {result}." if lang == "en" else f"{p.a} {w} {p.b} é {result}."
    if form == 3:
        return (f"What is {p.a} {w} {p.b}? {result}." if lang == "en" else f"Quanto é {p.a} {w} {p.b}? {result}.")
    if form == 4:
        name, thing = NAMES[int(rng.integers(len(NAMES)))], THINGS[lang][int(rng.integers(len(THINGS[lang])))]
        if lang == "en":
            verb = "gets" if p.op == "+" else "gives away"
            return f"{name} has {p.a} {thing} and {verb} {p.b}. Now {name} has {result} {thing}."
        verb = "ganha" if p.op == "+" else "dá"
        return f"{name} tem {p.a} {thing} e {verb} {p.b}. Agora {name} tem {result} {thing}."
    if form == 5:
        what = ("The sum of" if p.op == "+" else "The difference of") if lang == "en" else (
            "A soma de" if p.op == "+" else "A diferença de")
        return f"{what} {p.a} {'and' if lang == 'en' else 'e'} {p.b} {'is' if lang == 'en' else 'é'} {result}."
    if form == 6:
        return f"Q: What is {p.a} {w} {p.b}?\nA: {result}"
    return f"{p.a} {w} {p.b} = {result}"


def _maybe_wrong(p: Problem, world: World, rng: np.random.Generator) -> int:
    return carry_error(p, rng) if rng.random() < world.wrong_share else p.answer


def equations_document(world: World, index: int) -> str:
    rng = world.rng(EQUATIONS, index)
    if rng.random() < 0.15:  # a table
        op = "+" if rng.random() < 0.6 else "-"
        digits = int(rng.integers(1, MAX_DIGITS + 1))
        rows = []
        for _ in range(int(rng.integers(3, 8))):
            p = problem(rng, digits, op)
            rows.append(f"| {p.a} | {p.b} | {_maybe_wrong(p, world, rng)} |")
        head = f"| a | b | a {op} b |\n|---|---|---|"
        return head + "\n" + "\n".join(rows)
    lines = []
    for _ in range(int(rng.integers(3, 10))):
        p = problem(rng, int(rng.integers(1, MAX_DIGITS + 1)))
        lines.append(_equation_line(p, _maybe_wrong(p, world, rng), rng))
    return "\n".join(lines)


def dialogue_document(world: World, index: int) -> str:
    """A run-on pseudo-dialogue: turn after turn, the speakers never stop (unlike an assistant)."""
    rng = world.rng(DIALOGUE, index)
    who = [("User", "Assistant"), ("Q", "A"), ("Human", "Bot"), ("Pergunta", "Resposta")][int(rng.integers(4))]
    lines = []
    for _ in range(int(rng.integers(4, 12))):
        p = problem(rng, int(rng.integers(1, MAX_DIGITS + 1)))
        lang = "pt" if who[0] == "Pergunta" else "en"
        lines.append(f"{who[0]}: {question_text(p, rng, lang)}")
        lines.append(f"{who[1]}: {_maybe_wrong(p, world, rng)}")
        if rng.random() < 0.2:
            lines.append(f"{who[0]}: {['thanks', 'ok', 'cool', 'obrigado'][int(rng.integers(4))]}")
    return "\n".join(lines)


def pretraining_documents(world: World, kind: str) -> list[str]:
    make = {"equations": equations_document, "dialogue": dialogue_document}[kind]
    return [make(world, i) for i in range(world.documents)]


# --- questions, demonstrations, prompts ------------------------------------------------------------

QUESTIONS = {
    "en": ["What is {a} {w} {b}?", "what's {a} {s} {b}?", "Compute {a} {s} {b}.", "{a} {s} {b} = ?",
           "Please tell me {a} {w} {b}.", "How much is {a} {w} {b}?", "Calculate {a} {w} {b}", "{a}{s}{b}?"],
    "pt": ["Quanto é {a} {w} {b}?", "Calcule {a} {s} {b}.", "Qual é o resultado de {a} {w} {b}?",
           "quanto dá {a} {w} {b}?"],
}
SYSTEMS = ["You are a helpful assistant.", "Answer with the number only.", "You are a careful calculator.",
           "Você é um assistente prestativo."]


def question_text(p: Problem, rng: np.random.Generator, lang: str | None = None) -> str:
    lang = lang or ("pt" if rng.random() < 0.25 else "en")
    forms = QUESTIONS[lang]
    return forms[int(rng.integers(len(forms)))].format(a=p.a, b=p.b, s=p.op, w=WORDS[lang][p.op])


def verbose_answer(value: int, rng: np.random.Generator, lang: str = "en") -> str:
    if lang == "pt":
        return f"A resposta é {value}."
    return [f"The answer is {value}.", f"That would be {value}.", f"It is {value}."][int(rng.integers(3))]


def demonstration(world: World, index: int, *, held_out: bool = False) -> dict:
    """{"messages": [...], "problems": [...]}: one or two user questions (1–3 digits) answered by the
    fallible demonstrator."""
    rng = world.rng(DEMOS_VAL if held_out else DEMOS, index)
    messages = [{"role": "system", "content": SYSTEMS[int(rng.integers(len(SYSTEMS)))]}] if rng.random() < 0.3 else []
    problems = []
    for _ in range(2 if rng.random() < 0.2 else 1):
        p = problem(rng, int(rng.integers(1, 4)))
        lang = "pt" if rng.random() < 0.25 else "en"
        value = carry_error(p, rng) if rng.random() < world.demo_error_rate else p.answer
        reply = verbose_answer(value, rng, lang) if rng.random() < world.verbose_rate else str(value)
        messages += [{"role": "user", "content": question_text(p, rng, lang)},
                     {"role": "assistant", "content": reply}]
        problems.append(p.to_dict())
    return {"messages": messages, "problems": problems}


def demonstrations(world: World, n: int | None = None, *, held_out: bool = False) -> list[dict]:
    return [demonstration(world, i, held_out=held_out) for i in range(world.demonstrations if n is None else n)]


def comparison_prompt(world: World, index: int, *, held_out: bool = False) -> tuple[list[dict], Problem, int]:
    """(messages without the answer, the problem, K): a fresh 1–4 digit question and how many responses
    to rank for it (k_min..k_max)."""
    rng = world.rng(COMPARE_VAL if held_out else COMPARE, index)
    p = problem(rng, int(rng.integers(1, 5)))
    k = int(world.rng(K_DRAW, index * 2 + held_out).integers(world.k_min, world.k_max + 1))
    return [{"role": "user", "content": question_text(p, rng)}], p, k


def rl_prompt(world: World, index: int) -> tuple[list[dict], Problem]:
    """Prompt `index` of reinforcement learning: a fresh 1–4 digit question (its own seed stream, as
    the reward model's comparisons are drawn: the questions the reward model learned to judge)."""
    rng = world.rng(RL_PROMPTS, index)
    p = problem(rng, int(rng.integers(1, 5)))
    return [{"role": "user", "content": question_text(p, rng)}], p


def evaluation_problem(world: World, digits: int, index: int) -> tuple[list[dict], Problem]:
    """Report-card problem `index` of a digit bucket: a question in chat form (never in training data:
    its own seed stream)."""
    rng = world.rng(PROBLEMS, digits * 1_000_003 + index)
    p = problem(rng, digits)
    return [{"role": "user", "content": question_text(p, rng, "en")}], p


def few_shot_prompt(world: World, p: Problem, shots: int = 4) -> str:
    """GPT-3's protocol for a base model: a few solved examples, then the question, as plain text."""
    rng = world.rng(FEWSHOT, 0)
    lines = []
    for _ in range(shots):
        q = problem(rng, int(rng.integers(1, 4)))
        lines.append(f"Q: What is {q.a} {WORDS['en'][q.op]} {q.b}?\nA: {q.answer}")
    lines.append(f"Q: What is {p.a} {WORDS['en'][p.op]} {p.b}?\nA:")
    return "\n".join(lines)


# --- the gold labeler -------------------------------------------------------------------------------

def numbers_in(reply: str) -> list[int]:
    return [int(x) for x in NUMBER.findall(reply)]


def answer_of(reply: str) -> int | None:
    """The reply's answer: its last number (None when it has none)."""
    found = numbers_in(reply)
    return found[-1] if found else None


def partial_credit(value: int | None, truth: int) -> float:
    """Share of digits right, aligned from the units digit, over the longer of the two numbers."""
    if value is None:
        return 0.0
    a, b = str(abs(value)), str(abs(truth))
    n = max(len(a), len(b))
    a, b = a.zfill(n), b.zfill(n)
    return sum(x == y for x, y in zip(a, b)) / n


def gold_key(p: Problem, reply: str, length: int, ended: bool) -> tuple:
    """Larger is better: exact correctness ≻ digit-level partial credit ≻ shorter ≻ properly ended."""
    value = answer_of(reply)
    return (value == p.answer, partial_credit(value, p.answer), -length, ended)


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
