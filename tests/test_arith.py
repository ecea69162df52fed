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


def test_code_letters_stand_for_fixed_digits():
    from relaypipe.tasks.arith import CODE_VALUES

    # Fixed for good: models trained in one run must find the same values in the next.
    assert (CODE_VALUES["a"], CODE_VALUES["q"], CODE_VALUES["v"], CODE_VALUES["z"]) == (2, 0, 3, 8)
    assert sorted(set(CODE_VALUES.values())) == list(range(10))
    spec = ArithSpec(difficulty=1, terms=3, letters=26)
    assert spec.name == "arith-d1t3l26"
    for p in generate(spec, 50, seed=0, split="train"):
        names = p.question.split("+")
        assert len(names) == 3 and all(n.isalpha() and len(n) == 1 for n in names)
        assert (p.solution, p.answer) == worked_solution([CODE_VALUES[n] for n in names])
        assert is_correct(p.solution, p.answer)
    assert generate(spec, 5, seed=0, split="train") == generate(spec, 5, seed=0, split="train")
    few = generate(ArithSpec(difficulty=1, terms=3, letters=3), 30, seed=0, split="t")
    assert {c for p in few for c in p.question.split("+")} <= {"a", "b", "c"}


def test_code_letters_are_one_digit_values_of_a_known_alphabet():
    with pytest.raises(ValueError, match="difficulty must be 1"):
        ArithSpec(difficulty=2, terms=3, letters=5)
    with pytest.raises(ValueError, match=r"letters must be 0\.\.26"):
        ArithSpec(difficulty=1, terms=3, letters=27)
