"""relaypipe.schemas: the problem-table contract and its Problem conversions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from relaypipe.io import SchemaViolation, read_table, write_table
from relaypipe.schemas import ProblemSchema, frame_to_problems, problems_to_frame
from relaypipe.tasks.base import Problem


def make_problems(n: int = 3) -> list[Problem]:
    return [
        Problem(
            problem_id=f"arith-d{i}-{i:06d}",
            task="arith",
            difficulty=i,
            question=f"What is {i} + {i}?",
            answer=str(2 * i),
            solution=f"{i} + {i} = {2 * i}\nAnswer: {2 * i}" if i % 2 else "",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip_problems_frame_file_problems(tmp_path: Path, suffix: str) -> None:
    problems = make_problems()
    path = tmp_path / f"problems{suffix}"
    write_table(problems_to_frame(problems, "train"), path, ProblemSchema)
    df = read_table(path, ProblemSchema)
    assert list(df["split"]) == ["train"] * 3
    back = frame_to_problems(df)
    assert back == problems
    assert all(type(p.difficulty) is int for p in back)


def test_empty_problem_list(tmp_path: Path) -> None:
    path = tmp_path / "problems.parquet"
    write_table(problems_to_frame([], "eval"), path, ProblemSchema)
    assert frame_to_problems(read_table(path, ProblemSchema)) == []


def test_duplicate_problem_id_detected(tmp_path: Path) -> None:
    a, b, _ = make_problems()
    dup = Problem(a.problem_id, b.task, b.difficulty, b.question, b.answer)
    with pytest.raises(SchemaViolation) as info:
        write_table(problems_to_frame([a, dup], "train"), tmp_path / "p.parquet", ProblemSchema)
    message = str(info.value)
    assert "'problem_id'" in message and "field_uniqueness" in message
    assert "row 0" in message and "row 1" in message
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize(
    ("column", "value", "check"),
    [
        ("difficulty", -1, "greater_than_or_equal_to(0)"),
        ("question", "   ", "not_blank"),
        ("answer", "", "not_blank"),
        ("split", "test", "isin"),
        ("task", "", "str_length"),
        ("answer", None, "not_nullable"),
        # Issue 15: nothing is converted to fit (difficulty 1.5 used to become 1).
        ("difficulty", 1.5, "type int (found float, not converted)"),
        ("difficulty", 2.0, "type int (found float, not converted)"),
        ("difficulty", "3", "type int (found str, not converted)"),
        ("difficulty", True, "type int (found bool, not converted)"),
        ("difficulty", None, "not_nullable"),
        ("question", 5, "type str (found int, not converted)"),
        ("split", None, "not_nullable"),
    ],
)
def test_invalid_values_rejected(column: str, value: object, check: str) -> None:
    df = problems_to_frame(make_problems(2), "train")
    df[column] = df[column].astype(object)
    df.loc[1, column] = value
    with pytest.raises(SchemaViolation) as info:
        write_table(df, Path("/nonexistent/never-written.parquet"), ProblemSchema)
    message = str(info.value)
    assert f"'{column}'" in message and check in message and "row 1" in message
    assert f"row 1: {value!r}" in message


def test_empty_solution_allowed_and_extra_column_rejected() -> None:
    df = problems_to_frame(make_problems(2), "benchmark")
    assert (df["solution"] == "").any()
    ProblemSchema.validate(df)
    df["teacher_pass_rate"] = 0.5
    with pytest.raises(SchemaViolation, match="column_in_schema"):
        write_table(df, Path("/nonexistent/x.parquet"), ProblemSchema)


def test_float_difficulty_in_file_is_refused(tmp_path: Path) -> None:
    """A hand-edited table with difficulty as floats is refused, not truncated on the way in."""
    path = tmp_path / "p.parquet"
    df = problems_to_frame(make_problems(3), "train")
    df["difficulty"] = [0.0, 1.5, 2.0]
    df.to_parquet(path)
    with pytest.raises(SchemaViolation) as info:
        read_table(path, ProblemSchema)
    message = str(info.value)
    assert str(path) in message
    assert "column 'difficulty': type int (found float64, not converted) failed at" in message
    assert "row 1: 1.5" in message


def test_problems_to_frame_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        problems_to_frame(make_problems(1), "test")


def test_frame_to_problems_ignores_extra_columns() -> None:
    problems = make_problems(2)
    df = problems_to_frame(problems, "train").assign(teacher_pass_rate=[0.0, 1.0])
    assert frame_to_problems(df) == problems
    with pytest.raises(ValueError, match="missing column"):
        frame_to_problems(pd.DataFrame({"problem_id": ["x"]}))
