"""Stage prepare: train/eval unchanged by benchmarks; arith and dataset benchmark tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from relaypipe.stages.prepare import BenchmarkSpec, PrepareParams, run
from relaypipe.tasks.arith import ArithSpec, make_problem


def test_benchmarks_are_disjoint_and_leave_train_and_eval_untouched(tmp_path):
    plain = PrepareParams(n_train=200, n_eval=20, out_dir=str(tmp_path / "plain"))
    run(plain)
    train_q = make_problem(ArithSpec(1, 6), 0, "train", 0).question
    fixture = tmp_path / "qa.jsonl"
    lines = [
        {"question": "What is 6 times 7?", "answer": "#### 42"},
        {"question": train_q, "answer": "1"},  # a train question: dropped
        {"question": "What is 6 times 7?", "answer": "42"},  # a repeat: dropped
        {"question": "Half of 10?", "answer": "5"},
    ]
    fixture.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with_bench = PrepareParams(
        n_train=200,
        n_eval=20,
        benchmarks=[
            BenchmarkSpec(name="arith-d1t6", difficulty=1, terms=6, n=30),
            BenchmarkSpec(name="arith-d1t8", difficulty=1, terms=8, n=10),
            BenchmarkSpec(name="qa", source=str(fixture)),
        ],
        out_dir=str(tmp_path / "bench"),
    )
    counts = run(with_bench)
    assert counts["benchmark/arith-d1t6"] == 30 and counts["benchmark/qa"] == 2
    for name in ("train", "eval"):  # byte-identical to a run without benchmarks
        assert (tmp_path / "plain" / f"{name}.parquet").read_bytes() == (
            tmp_path / "bench" / f"{name}.parquet"
        ).read_bytes()
    train = pd.read_parquet(tmp_path / "bench" / "train.parquet")
    evaluation = pd.read_parquet(tmp_path / "bench" / "eval.parquet")
    seen = set(train.question) | set(evaluation.question)
    for name in ("arith-d1t6", "arith-d1t8", "qa"):
        table = pd.read_parquet(tmp_path / "bench" / "benchmarks" / f"{name}.parquet")
        assert set(table.split) == {"benchmark"} and table.question.is_unique
        assert not set(table.question) & seen
    qa = pd.read_parquet(tmp_path / "bench" / "benchmarks" / "qa.parquet")
    assert list(qa.answer) == ["42", "5"] and set(qa.task) == {"qa"}

    # a benchmark dropped from params does not linger in the folder
    run(
        PrepareParams(
            n_train=200,
            n_eval=20,
            benchmarks=with_bench.benchmarks[:1],
            out_dir=str(tmp_path / "bench"),
        )
    )
    assert [p.name for p in (tmp_path / "bench" / "benchmarks").iterdir()] == ["arith-d1t6.parquet"]


def test_bad_benchmark_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="needs n"):
        BenchmarkSpec(name="x")
    with pytest.raises(ValueError, match="terms"):
        BenchmarkSpec(name="x", terms=9, n=5)
    with pytest.raises(ValueError, match="plain file name"):
        BenchmarkSpec(name="../x", n=5)
    with pytest.raises(ValueError, match="unique"):
        PrepareParams(benchmarks=[BenchmarkSpec(name="a", n=1), BenchmarkSpec(name="a", n=1)])
    # one-digit pairs: only 100 questions exist
    tiny = PrepareParams(
        n_train=5,
        n_eval=5,
        out_dir=str(tmp_path),
        benchmarks=[BenchmarkSpec(name="t", terms=2, n=101)],
    )
    with pytest.raises(ValueError, match="too few distinct questions"):
        run(tiny)


def test_a_list_of_term_counts_mixes_lengths_reproducibly_and_one_count_changes_nothing(tmp_path):
    mixed = PrepareParams(n_train=300, n_eval=60, terms=[4, 6, 8], out_dir=str(tmp_path / "a"))
    run(mixed)
    train = pd.read_parquet(tmp_path / "a" / "train.parquet")
    evaluation = pd.read_parquet(tmp_path / "a" / "eval.parquet")
    for table in (train, evaluation):
        counts = table.question.str.count(r"\+") + 1
        assert set(counts) == {4, 6, 8}  # every length occurs, no other
    assert not set(train.question) & set(evaluation.question)
    run(PrepareParams(n_train=300, n_eval=60, terms=[4, 6, 8], out_dir=str(tmp_path / "b")))
    for name in ("train", "eval"):  # seeded: a second run writes the same bytes
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (
            tmp_path / "b" / f"{name}.parquet"
        ).read_bytes()
    run(PrepareParams(n_train=50, n_eval=10, terms=6, out_dir=str(tmp_path / "int")))
    run(PrepareParams(n_train=50, n_eval=10, terms=[6], out_dir=str(tmp_path / "list")))
    for name in ("train", "eval"):  # a one-count list is the plain count
        assert (tmp_path / "int" / f"{name}.parquet").read_bytes() == (
            tmp_path / "list" / f"{name}.parquet"
        ).read_bytes()


@pytest.mark.parametrize("terms", [[], [4, 9], 1])
def test_bad_term_counts_are_refused(terms):
    with pytest.raises(ValueError):
        PrepareParams(terms=terms)


def test_calibration_sets_are_held_out_per_benchmark_and_change_nothing_else(tmp_path):
    """calibration_n: problems of each benchmark's kind in data/problems/calibration, in no
    benchmark nor train/eval; adding them leaves every other table byte-identical."""
    fixture = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    fixture.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def params(calibration_n: int, qa_calibration: int, out: str) -> PrepareParams:
        return PrepareParams(
            n_train=200,
            n_eval=20,
            terms=[4, 8],
            benchmarks=[
                BenchmarkSpec(name="arith-d1t4", terms=4, n=30, calibration_n=calibration_n),
                BenchmarkSpec(name="arith-d1t8", terms=8, n=10, calibration_n=calibration_n),
                BenchmarkSpec(name="qa", source=str(fixture), n=4, calibration_n=qa_calibration),
            ],
            out_dir=str(tmp_path / out),
        )

    run(params(0, 0, "plain"))
    counts = run(params(25, 2, "held"))
    assert counts["calibration/arith-d1t4"] == 25 and counts["calibration/qa"] == 2
    for name in (
        "train.parquet",
        "eval.parquet",
        *(f"benchmarks/{b}.parquet" for b in ("arith-d1t4", "arith-d1t8", "qa")),
    ):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "held" / name).read_bytes()
    assert list((tmp_path / "plain" / "calibration").iterdir()) == []  # written, empty

    out = tmp_path / "held"
    taken = set()
    for name in ("train", "eval"):
        taken |= set(pd.read_parquet(out / f"{name}.parquet").question)
    for path in (out / "benchmarks").iterdir():
        taken |= set(pd.read_parquet(path).question)
    for name, terms in (("arith-d1t4", 4), ("arith-d1t8", 8)):
        table = pd.read_parquet(out / "calibration" / f"{name}.parquet")
        assert len(table) == 25 and set(table.split) == {"calibration"}
        assert table.question.is_unique and not set(table.question) & taken
        assert {q.count("+") + 1 for q in table.question} == {terms}  # the benchmark's kind
    qa = pd.read_parquet(out / "calibration" / "qa.parquet")
    assert list(qa.answer) == ["8", "10"]  # the rows after the benchmark's four

    with pytest.raises(ValueError, match=r"qa: calibration_n 3, but .* has only 2 usable rows"):
        run(params(0, 3, "short"))
    assert not (tmp_path / "short").exists()  # nothing half-written
    with pytest.raises(ValueError, match="calibration_n must be >= 0"):
        BenchmarkSpec(name="x", n=1, calibration_n=-1)
