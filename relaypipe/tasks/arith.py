"""The micro task: chained multi-digit addition with explicit intermediate steps.

A problem adds ``terms`` numbers of ``difficulty`` digits each; the worked solution writes one
partial sum per line and ends with the answer line::

    Q: 47+85+29
    A: 47+85=132
    132+29=161
    Answer: 161

Every partial sum depends on carries that a very small transformer gets wrong now and then,
while a larger one learns them reliably: exactly the "few hard tokens" a student should borrow
from a teacher. Generation is seeded and independent of the other problems asked for, so the
same (seed, split, index) always yields the same problem.

With ``letters`` > 0 the operands are *codes*: the first ``letters`` lowercase letters, each
standing for one fixed digit (:data:`CODE_VALUES`, the same in every run and preset). The
question names the letters and the worked solution adds their values::

    Q: q+v+c
    A: 4+7=11
    11+2=13
    Answer: 13

This is the knowledge gap for *pretrained* models. A pretrained student already knows every
one-digit sum, so leaving sums out of its training (the micro preset's ``withhold``) teaches it
nothing it lacks (measured on SmolLM2-135M: 0.83 on the withheld steps). An arbitrary letter
value is a fact no pretraining holds: a student never shown ``v`` cannot know ``v=7``; a
teacher trained on every letter does. The hard tokens are exactly the withheld letters' values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from relaypipe.tasks.base import ANSWER_PREFIX, Problem

TASK_NAME = "arith"
# Each letter's digit: fixed for good (a seeded shuffle of 0-9, 0-9, 0-5), never re-drawn, so a
# model trained on one run's codes knows them in the next.
CODE_LETTERS = "abcdefghijklmnopqrstuvwxyz"
CODE_VALUES: dict[str, int] = dict(
    zip(CODE_LETTERS, random.Random("relaypipe-codes").sample(list(range(10)) * 3, 26), strict=True)
)


@dataclass(frozen=True)
class ArithSpec:
    """How to draw problems; ``difficulty`` is the number of digits per operand."""

    difficulty: int = 2  # digits per operand
    terms: int = 3  # numbers added per problem
    letters: int = 0  # > 0: operands are the first `letters` code letters (one-digit values)

    def __post_init__(self) -> None:
        if not 1 <= self.difficulty <= 12:
            raise ValueError(f"arith difficulty must be 1..12 digits, got {self.difficulty}")
        if not 2 <= self.terms <= 8:
            raise ValueError(f"arith terms must be 2..8, got {self.terms}")
        if not 0 <= self.letters <= len(CODE_LETTERS):
            raise ValueError(f"arith letters must be 0..{len(CODE_LETTERS)}, got {self.letters}")
        if self.letters and self.difficulty != 1:
            raise ValueError("arith letters stand for one-digit values: difficulty must be 1")

    @property
    def name(self) -> str:
        codes = f"l{self.letters}" if self.letters else ""
        return f"{TASK_NAME}-d{self.difficulty}t{self.terms}{codes}"


def worked_solution(operands: list[int]) -> tuple[str, str]:
    """The canonical step-by-step solution and the final answer for a list of operands."""
    lines = []
    total = operands[0]
    for x in operands[1:]:
        lines.append(f"{total}+{x}={total + x}")
        total += x
    lines.append(f"{ANSWER_PREFIX}{total}")
    return "\n".join(lines), str(total)


def make_problem(spec: ArithSpec, seed: int, split: str, index: int) -> Problem:
    # A string seed keeps problems independent of how many others were drawn before them.
    rng = random.Random(f"{seed}/{split}/{spec.name}/{index}")
    if spec.letters:
        names = [rng.choice(CODE_LETTERS[: spec.letters]) for _ in range(spec.terms)]
        operands = [CODE_VALUES[c] for c in names]
    else:
        low = 10 ** (spec.difficulty - 1) if spec.difficulty > 1 else 0
        operands = [rng.randint(low, 10**spec.difficulty - 1) for _ in range(spec.terms)]
        names = [str(x) for x in operands]
    solution, answer = worked_solution(operands)
    return Problem(
        problem_id=f"{spec.name}-{split}-{index:06d}",
        task=TASK_NAME,
        difficulty=spec.difficulty,
        question="+".join(names),
        answer=answer,
        solution=solution,
    )


def generate(spec: ArithSpec, n: int, seed: int, split: str) -> list[Problem]:
    """``n`` seeded problems for ``split``; train and eval splits never share a question."""
    return [make_problem(spec, seed, split, i) for i in range(n)]
