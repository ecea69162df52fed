"""Stage prepare with ``train_source``: train and eval from a question/answer table (the paper
preset names the MATH train split by hub id). A local Parquet/JSONL file goes through the same
loader as a hub id; a hub id offline fails with the loader's clear error."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relaypipe.config import ConfigError, build
from relaypipe.io import read_table
from relaypipe.schemas import ProblemSchema
from relaypipe.stages.prepare import BenchmarkSpec, PrepareParams, TrainSourceSpec, run
from relaypipe.tasks.dataset import DatasetUnavailableError


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network; `datasets`' cache in tmp_path (both libraries read the switches at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def math_rows(n: int) -> list[dict]:
    """MATH-shaped rows: the answer is the last \\boxed{} of the solution."""
    return [
        {
            "problem": f"What is ${i} + {i}$?",
            "solution": f"Doubling, ${i} + {i} = \\boxed{{{2 * i}}}$.",
            "level": "Level 1",
        }
        for i in range(n)
    ]


@pytest.fixture
def math_file(tmp_path: Path) -> Path:
    rows = math_rows(40)
    rows.append(dict(rows[3]))  # a repeated question: used once
    path = tmp_path / "math-train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def bench_file(tmp_path: Path) -> Path:
    """A benchmark holding two of the training set's questions (and one of its own)."""
    rows = [{"question": r["problem"], "answer": "x"} for r in math_rows(40)[5:7]]
    rows.append({"question": "What is $100 + 100$?", "answer": "200"})
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def params(out: Path, source: Path, *, seed: int = 0, n_train: int = 30, bench=None):
    return PrepareParams(
        seed=seed,
        n_train=n_train,
        n_eval=5,
        train_source=TrainSourceSpec(
            source=str(source),
            question_column="problem",
            answer_column="solution",
            solution_column="solution",
            name="math-train",
        ),
        benchmarks=[BenchmarkSpec(name="bench", source=str(bench))] if bench else [],
        out_dir=str(out),
    )


def test_train_and_eval_come_from_the_table_disjoint_and_seeded(tmp_path, math_file, bench_file):
    counts = run(params(tmp_path / "a", math_file, bench=bench_file))
    assert counts == {"n_train": 30, "n_eval": 5, "benchmark/bench": 3}
    train = read_table(tmp_path / "a" / "train.parquet", ProblemSchema)
    evaluation = read_table(tmp_path / "a" / "eval.parquet", ProblemSchema)
    assert set(train.split) == {"train"} and set(evaluation.split) == {"eval"}
    assert set(train.task) == set(evaluation.task) == {"math-train"}
    both = list(train.question) + list(evaluation.question)
    assert len(set(both)) == len(both) == 35  # disjoint, the repeated row used once
    bench = pd.read_parquet(tmp_path / "a" / "benchmarks" / "bench.parquet")
    assert len(bench) == 3 and not set(bench.question) & set(both)  # the benchmark stays whole
    row = evaluation.iloc[0]
    i = int(row.question.split("$")[1].split(" +")[0])
    assert row.answer == str(2 * i) and row.solution.endswith(f"Answer: {2 * i}")

    run(params(tmp_path / "b", math_file, bench=bench_file))
    for name in ("train", "eval"):  # the same seed: byte-identical tables
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (
            tmp_path / "b" / f"{name}.parquet"
        ).read_bytes()
    run(params(tmp_path / "c", math_file, seed=1, bench=bench_file))
    other = read_table(tmp_path / "c" / "eval.parquet", ProblemSchema)
    assert list(other.question) != list(evaluation.question)  # another seed: another split


def test_too_few_rows_fail_saying_how_many_there_are(tmp_path, math_file, bench_file):
    # 41 rows, one repeat, two in the benchmark: 38 usable, 5 of them for eval
    with pytest.raises(ValueError, match=r"38 usable questions .* lower prepare.n_train to at "):
        run(params(tmp_path, math_file, n_train=34, bench=bench_file))
    assert not (tmp_path / "train.parquet").exists()
    assert run(params(tmp_path, math_file, n_train=33, bench=bench_file))["n_train"] == 33


def test_the_section_builds_from_yaml_with_train_as_the_default_split(math_file):
    section = {"train_source": {"source": str(math_file), "question_column": "problem"}}
    prepare = build(PrepareParams, section, "params.yaml:prepare")
    assert prepare.train_source is not None and prepare.train_source.split == "train"
    with pytest.raises(ConfigError, match=r"prepare\.train_source: unknown key\(s\) n"):
        build(PrepareParams, {"train_source": {"source": "x", "n": 3}}, "params.yaml:prepare")


def test_a_hub_id_offline_fails_with_the_loaders_error(tmp_path):
    hub = PrepareParams(
        n_train=10,
        n_eval=2,
        train_source=TrainSourceSpec(source="openai/gsm8k", config="main"),
        out_dir=str(tmp_path),
    )
    with pytest.raises(DatasetUnavailableError, match=r"'openai/gsm8k'.*split 'train'.*offline"):
        run(hub)
    assert not (tmp_path / "train.parquet").exists()
