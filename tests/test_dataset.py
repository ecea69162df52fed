"""Loading question/answer tables through HuggingFace `datasets` (fixtures written to tmp_path)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relaypipe.tasks.dataset import DatasetSpec, DatasetUnavailableError, load_problems
from relaypipe.tasks.grading import is_correct

GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop sells 1,000 pens a day. How many in 2 days?",
        "answer": "1,000 * 2 = 2,000\n#### 2,000",
    },
    {"question": "What is 6 times 7?", "answer": 42},
]

MATH_ROWS = [
    {
        "problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?",
        "solution": "Adding, $\\frac{1}{4} + \\frac{1}{4} = \\boxed{\\frac{1}{2}}$.",
        "unique_id": "algebra/1.json",
    },
    {
        "problem": "Find the set of roots of $x^2 - 3x + 2$.",
        "solution": "It factors as $(x-1)(x-2)$, so the roots are $\\boxed{\\{1, 2\\}}$.",
        "unique_id": "algebra/2.json",
    },
]


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `datasets`' Arrow cache in tmp_path and forbid any network access.

    Both libraries read the offline switches once at import, so the module constants are
    patched as well as the environment.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)
    problems = load_problems(DatasetSpec(source=str(source)))

    assert [p.problem_id for p in problems] == [
        "gsm8k-test-000000",
        "gsm8k-test-000001",
        "gsm8k-test-000002",
    ]
    assert {p.task for p in problems} == {"gsm8k-test"}
    assert [p.answer for p in problems] == ["72", "2000", "42"]
    assert all(p.difficulty == 0 for p in problems)
    assert problems[0].question.startswith("Natalia sold clips")

    first = problems[0].solution
    assert "####" not in first
    assert first.startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    assert first.endswith("altogether in April and May.\nAnswer: 72")
    assert problems[1].solution == "1,000 * 2 = 2,000\nAnswer: 2000"
    # A bare answer cell carries no worked solution.
    assert problems[2].solution == ""
    # The solution written for warm-up must grade as correct with the shared grader.
    assert all(is_correct(p.solution, p.answer) for p in problems[:2])


def test_math_parquet_with_column_mapping(tmp_path: Path) -> None:
    source = write_parquet(tmp_path / "math500.parquet", MATH_ROWS)
    spec = DatasetSpec(
        source=str(source),
        question_column="problem",
        answer_column="solution",
        id_column="unique_id",
        name="math",
    )
    problems = load_problems(spec)

    assert [p.problem_id for p in problems] == ["math-algebra/1.json", "math-algebra/2.json"]
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "\\{1, 2\\}"]
    assert problems[0].question == "What is $\\frac{1}{4} + \\frac{1}{4}$?"
    assert problems[0].solution == (
        "Adding, $\\frac{1}{4} + \\frac{1}{4} = \\boxed{\\frac{1}{2}}$.\nAnswer: \\frac{1}{2}"
    )
    assert is_correct("so it is 0.5\nAnswer: 0.5", problems[0].answer)


def test_separate_solution_column(tmp_path: Path) -> None:
    rows = [{"q": "1+1?", "a": "2", "worked": "One plus one is two.\n#### 2"}]
    source = write_jsonl(tmp_path / "tiny.jsonl", rows)
    spec = DatasetSpec(
        source=str(source), question_column="q", answer_column="a", solution_column="worked"
    )
    (problem,) = load_problems(spec)
    assert problem.answer == "2"
    assert problem.solution == "One plus one is two.\nAnswer: 2"


def test_integer_ids_and_limit(tmp_path: Path) -> None:
    rows = [{"idx": 10 + i, "question": f"What is {i}+1?", "answer": i + 1} for i in range(5)]
    source = write_jsonl(tmp_path / "plus.jsonl", rows)
    problems = load_problems(DatasetSpec(source=str(source), id_column="idx", limit=2))
    assert [p.problem_id for p in problems] == ["plus-000010", "plus-000011"]
    assert [p.answer for p in problems] == ["1", "2"]


def test_limit_skips_bad_rows_beyond_it(tmp_path: Path) -> None:
    rows = [{"question": "ok?", "answer": "1"}, {"question": "", "answer": "2"}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert len(load_problems(DatasetSpec(source=str(source), limit=1))) == 1


def test_file_url(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS[:1])
    (problem,) = load_problems(DatasetSpec(source=source.as_uri()))
    assert problem.problem_id == "gsm8k-000000"
    assert problem.answer == "72"


def test_missing_column_names_source_and_columns(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    with pytest.raises(ValueError, match="no column 'question'") as excinfo:
        load_problems(DatasetSpec(source=str(source)))
    message = str(excinfo.value)
    assert str(source) in message
    assert "'problem'" in message and "'solution'" in message


def test_empty_question_names_the_row(tmp_path: Path) -> None:
    rows = [*GSM8K_ROWS[:2], {"question": "   ", "answer": "#### 3"}]
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 2 has an empty 'question'") as excinfo:
        load_problems(DatasetSpec(source=str(source)))
    assert str(source) in str(excinfo.value)


def test_null_answer_names_the_row(tmp_path: Path) -> None:
    rows = [{"question": "a?", "answer": "1"}, {"question": "b?", "answer": None}]
    source = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=r"row 1 has an empty 'answer'"):
        load_problems(DatasetSpec(source=str(source)))


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "question": "x?", "answer": "1"},
        {"id": "a", "question": "y?", "answer": 2},
    ]
    source = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(ValueError, match="rows 0 and 1 share the id"):
        load_problems(DatasetSpec(source=str(source), id_column="id"))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_problems(DatasetSpec(source=str(missing)))


def test_unsupported_local_file(tmp_path: Path) -> None:
    source = tmp_path / "rows.tsv"
    source.write_text("question\tanswer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_problems(DatasetSpec(source=str(source)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": ""}, "source is empty"),
        ({"source": "x.jsonl", "limit": 0}, "limit must be a positive"),
        ({"source": "x.jsonl", "question_column": ""}, "question_column is empty"),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**kwargs)


def test_default_names() -> None:
    assert DatasetSpec(source="data/GSM8K test.jsonl.gz").task_name == "gsm8k-test"
    assert DatasetSpec(source="s3://bucket/sets/math500.parquet").task_name == "math500"
    assert DatasetSpec(source="openai/gsm8k", config="main").task_name == "gsm8k"
    assert DatasetSpec(source="openai/gsm8k", config="socratic").task_name == "gsm8k-socratic"


def test_hub_dataset_fails_fast_offline() -> None:
    spec = DatasetSpec(source="openai/gsm8k", config="main", split="test")
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as excinfo:
        load_problems(spec)
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "'openai/gsm8k'" in message
    assert "'test'" in message
    assert "HF_DATASETS_OFFLINE" in message
    assert "local" in message


def test_list_answer_cells_are_joined_not_repr(tmp_path: Path) -> None:
    # OlympiadBench's final_answer is a list of strings (paper preset)
    rows = [
        {"question": "Half of one?", "final_answer": ["$\\frac{1}{2}$"]},
        {"question": "Roots of x^2-3x+2?", "final_answer": ["1", "2"]},
    ]
    source = write_parquet(tmp_path / "olympiad.parquet", rows)
    problems = load_problems(DatasetSpec(source=str(source), answer_column="final_answer"))
    assert [p.answer for p in problems][1] == "1, 2"
    assert "[" not in problems[0].answer and "frac{1}{2}" in problems[0].answer
