"""The micro task: determinism, worked solutions, grading through the shared grader."""

from __future__ import annotations

import pytest

from relaypipe.tasks.arith import ArithSpec, generate, make_problem, worked_solution
from relaypipe.tasks.base import format_prompt
from relaypipe.tasks.grading import extract_answer, is_correct


def test_worked_solution_by_hand():
    solution, answer = worked_solution([7, 5, 9])
    assert solution == "7+5=12\n12+9=21\nAnswer: 21"
    assert answer == "21"


def test_generation_is_deterministic_and_independent_of_count():
    spec = ArithSpec(difficulty=2, terms=3)
    a = generate(spec, 50, seed=3, split="train")
    b = generate(spec, 10, seed=3, split="train")
    assert a[:10] == b
    assert make_problem(spec, 3, "train", 7) == a[7]
    assert generate(spec, 10, seed=4, split="train") != b
    assert len({p.problem_id for p in a}) == 50


def test_splits_and_difficulty_change_problems():
    spec = ArithSpec(difficulty=1, terms=6)
    train = generate(spec, 20, 0, "train")
    assert [p.question for p in train] != [p.question for p in generate(spec, 20, 0, "eval")]
    for p in generate(ArithSpec(difficulty=3, terms=2), 20, 0, "eval"):
        a, b = (int(x) for x in p.question.split("+"))
        assert 100 <= a <= 999 and 100 <= b <= 999 and p.answer == str(a + b)


def test_answers_are_consistent_with_the_grader():
    for p in generate(ArithSpec(difficulty=1, terms=6), 30, 0, "eval"):
        assert extract_answer(p.solution) == p.answer
        assert is_correct(p.solution, p.answer)
        assert format_prompt(p.question).startswith("Q: ")


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("7+5=12\n12+9=21\nAnswer: 21", True),
        ("Answer: 22", False),
        ("7+5=12\n12+9=21", False),  # no answer line
        ("Answer: twenty-one", False),
        ("", False),
    ],
)
def test_grader_on_right_wrong_and_ill_formed(completion, ok):
    assert is_correct(completion, "21") is ok


def test_spec_rejects_bad_knobs():
    with pytest.raises(ValueError, match="difficulty"):
        ArithSpec(difficulty=0)
    with pytest.raises(ValueError, match="terms"):
        ArithSpec(terms=1)
