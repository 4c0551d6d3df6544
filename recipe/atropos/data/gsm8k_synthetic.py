"""GSM8K-format word problems made offline, deterministic for a seed.

Each problem is ``{"question", "answer"}`` with the answer in GSM8K's own shape:
worked steps with ``<<a+b=c>>`` calculator notes, then ``#### <number>``.
``steps`` sets the difficulty: 1 is one addition or subtraction, which a
135M-parameter model can partly solve; GSM8K itself needs 2 to 8.
"""

from __future__ import annotations

import random

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lena", "Milo", "Nora"]
THINGS = ["apples", "books", "stickers", "marbles", "cookies", "pencils", "shells", "coins", "cards", "stamps"]


def _step(rng: random.Random, name: str, thing: str, have: int) -> tuple[str, str, int]:
    """One more event in the story: (sentence, worked step, new total)."""
    kind = rng.choice(["gain", "lose", "times"] if have <= 12 else ["gain", "lose"])
    if kind == "gain":
        more = rng.randint(1, 20)
        total = have + more
        return f"{name} gets {more} more {thing}.", f"{have} + {more} = <<{have}+{more}={total}>>{total}", total
    if kind == "lose" and have > 1:
        less = rng.randint(1, have - 1)
        left = have - less
        return f"{name} gives away {less} {thing}.", f"{have} - {less} = <<{have}-{less}={left}>>{left}", left
    factor = rng.randint(2, 4)
    return (
        f"Then the number of {thing} {name} has becomes {factor} times as many.",
        f"{have} * {factor} = <<{have}*{factor}={have * factor}>>{have * factor}",
        have * factor,
    )


def make_problem(rng: random.Random, steps: int) -> dict[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    have = rng.randint(2, 30)
    sentences, work = [f"{name} has {have} {thing}."], []
    for _ in range(steps):
        sentence, worked, have = _step(rng, name, thing, have)
        sentences.append(sentence)
        work.append(worked)
    question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    answer = "\n".join(f"{name} now has {w} {thing}." for w in work) + f"\n#### {have}"
    return {"question": question, "answer": answer}


def make_problems(count: int, steps: int = 1, seed: int = 0, max_answer: int | None = None) -> list[dict[str, str]]:
    """``count`` problems; with ``max_answer``, only those whose answer is at most that."""
    if count < 0 or steps < 1:
        raise ValueError(f"need count >= 0 and steps >= 1, got count={count}, steps={steps}")
    if max_answer is not None and max_answer < 1:
        raise ValueError(f"max_answer must be >= 1, got {max_answer}")
    rng = random.Random(seed)
    problems: list[dict[str, str]] = []
    while len(problems) < count:
        problem = make_problem(rng, steps)
        if max_answer is None or int(problem["answer"].rsplit("#### ", 1)[1]) <= max_answer:
            problems.append(problem)
    return problems
