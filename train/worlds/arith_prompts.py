"""Prompts that measure a model of the arithmetic world and never train it: GPT-3's few-shot prompt
for a base model (direct or worked examples), and questions in phrasings no stream of the world
writes (the report card's robustness check). The world itself is arith.py."""

from __future__ import annotations

from plutao.train.worlds.arith import (
    FEWSHOT,
    UNSEEN_STREAM,
    Problem,
    World,
    draw_digits,
    problem,
    question,
    training_problem,
    worked_text,
)

UNSEEN = {  # phrasings no stream of the world ever writes (the report card's robustness check)
    "+": ["Add {a} and {b}.", "If I have {a} and get {b} more, how many do I have?", "Sum {a} with {b}, please.",
          "{a} and {b} together make how much?", "Tell me the total of {a} and {b}."],
    "-": ["Subtract {b} from {a}.", "If I have {a} and give away {b}, how many are left?", "Take {b} away from {a}.",
          "By how much is {a} larger than {b}?", "Tell me {a} take away {b}."],
}


def unseen_phrasing_problems(world: World, n: int = 100) -> list[tuple[list[dict], int]]:
    """(messages, answer) for n problems of the training range asked in phrasings the world never
    produces (UNSEEN): whether what RL taught survives a change of wording."""
    out = []
    for i in range(n):
        rng = world.rng(UNSEEN_STREAM, i)
        p = problem(rng, draw_digits(rng, world.digit_weights))
        forms = UNSEEN[p.op]
        out.append(([{"role": "user", "content": forms[i % len(forms)].format(a=p.a, b=p.b)}], p.answer))
    return out


def few_shot_prompt(world: World, p: Problem, shots: int = 4, *, worked_form: bool = False) -> str:
    """GPT-3's protocol for a base model: a few solved examples (direct or worked), then the question,
    as plain text."""
    rng = world.rng(FEWSHOT, 0)
    lines = []
    for _ in range(shots):
        q = training_problem(world, rng)
        lines.append(f"Q: {question(q, 'en', 0)}\nA: {worked_text(q) if worked_form else q.answer}")
    lines.append(f"Q: {question(p, 'en', 0)}\nA:")
    return "\n".join(lines)
