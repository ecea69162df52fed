"""relaypipe.io: atomic writes, schema-checked tables, params sections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
from pandera.typing import Series

from relaypipe.io import (
    ParamsError,
    SchemaViolation,
    atomic_path,
    load_yaml_section,
    read_json,
    read_table,
    write_json,
    write_table,
)


class Boom(Exception):
    pass


class PairSchema(pa.DataFrameModel):
    """A tiny schema so these tests do not depend on relaypipe.schemas."""

    key: Series[str] = pa.Field(unique=True)
    score: Series[float] = pa.Field(ge=0, le=1)

    class Config:
        strict = True
        coerce = False


def leftovers(directory: Path) -> list[str]:
    """Hidden temporaries (or moved-aside old versions) that an atomic write left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- atomic_path -----------------------------------------------------------------------------


def test_atomic_file_write_creates_parents_and_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".out.txt.tmp-")
        assert not target.exists()  # nothing visible until the block finishes
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert leftovers(target.parent) == []


def test_atomic_file_write_survives_exception(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise Boom
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_file_write_exception_without_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("x")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replace(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir()
        (tmp / "weights.bin").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
        # Readers still see the complete old directory while the new one is being written.
        assert (target / "old.bin").read_text() == "old"
    assert sorted(p.name for p in target.iterdir()) == ["sub", "weights.bin"]
    assert (target / "weights.bin").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_directory_failure_keeps_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(Boom), atomic_path(target, directory=True) as tmp:
        (tmp / "weights.bin").write_text("partial")
        raise Boom
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    assert leftovers(tmp_path) == []


def test_atomic_directory_new_target(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "model"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "w").write_text("1")
    assert (target / "w").read_text() == "1"


# --- JSON ------------------------------------------------------------------------------------


def test_write_json_is_stable_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"b": np.int64(2), "a": [np.float64(0.5)], "p": Path("x/y")})
    assert path.read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 2,\n  "p": "x/y"\n}\n'
    assert read_json(path) == {"a": [0.5], "b": 2, "p": "x/y"}


def test_write_json_refuses_nan_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"ok": 1}\n')
    with pytest.raises(ValueError):
        write_json(path, {"acc": float("nan")})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert leftovers(tmp_path) == []


def test_read_json_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_json(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        read_json(tmp_path / "missing.json")


# --- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_table_round_trip(tmp_path: Path, suffix: str) -> None:
    df = pd.DataFrame({"key": ["007", "b"], "score": [0, 0.25]}, index=[5, 9])
    path = tmp_path / f"t{suffix}"
    write_table(df, path, PairSchema)
    back = read_table(path, PairSchema)
    # Index is reset; "007" stays a string; the int 0 is the float 0.0 (exactly: not a coercion).
    expected = pd.DataFrame({"key": ["007", "b"], "score": [0.0, 0.25]})
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back["score"].dtype == np.float64


def test_empty_jsonl_table_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_table(pd.DataFrame({"key": [], "score": []}), path, PairSchema)
    assert list(read_table(path, PairSchema).columns) == ["key", "score"]


def test_write_table_refuses_violation_and_writes_nothing(tmp_path: Path) -> None:
    bad = pd.DataFrame({"key": ["a", "b"], "score": [0.5, 1.5]})
    path = tmp_path / "sub" / "t.parquet"
    with pytest.raises(SchemaViolation) as info:
        write_table(bad, path, PairSchema)
    assert not path.exists()
    assert "nothing was written" in str(info.value)

    good = pd.DataFrame({"key": ["a"], "score": [0.5]})
    write_table(good, path, PairSchema)
    before = path.read_bytes()
    with pytest.raises(SchemaViolation):
        write_table(bad, path, PairSchema)
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


def test_read_table_violation_names_file_column_and_row(tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    # Written behind the schema's back, as a stale or hand-edited artifact would be.
    pd.DataFrame({"key": ["a", "b", "c"], "score": [0.1, 0.2, 7.0]}).to_parquet(path)
    with pytest.raises(SchemaViolation) as info:
        read_table(path, PairSchema)
    message = str(info.value)
    assert str(path) in message
    assert "PairSchema" in message
    assert "'score'" in message
    assert "less_than_or_equal_to(1)" in message
    assert "row 2: 7.0" in message
    assert "hint:" in message
    err = info.value
    assert err.path == path and err.schema_name == "PairSchema"
    assert err.failure_cases is not None and len(err.failure_cases) == 1


def test_violation_lists_every_failure(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    pd.DataFrame({"key": ["a", "a"], "score": [-1.0, 0.5], "extra": [1, 2]}).to_json(
        path, orient="records", lines=True
    )
    with pytest.raises(SchemaViolation) as info:
        read_table(path, PairSchema)
    message = str(info.value)
    assert "column 'key'" in message and "row 0: 'a'; row 1: 'a'" in message
    assert "column 'score'" in message and "row 0: -1.0" in message
    assert "column_in_schema" in message and "'extra'" in message


def test_violation_message_is_truncated(tmp_path: Path) -> None:
    n = 50
    df = pd.DataFrame({"key": ["k"] * n, "score": [2.0] * n})
    with pytest.raises(SchemaViolation) as info:
        write_table(df, tmp_path / "t.parquet", PairSchema)
    assert "more)" in str(info.value)
    assert len(str(info.value)) < 2000


@pytest.mark.parametrize(
    ("key", "score", "line"),
    [
        (
            ["a", "b"],
            [0.5, "0.5"],
            "column 'score': type float (found str, not converted) failed at row 1: '0.5'",
        ),
        (["a", "b"], [0.5, None], "column 'score': not_nullable failed at row 1: None"),
        (
            ["a", "b"],
            [True, 0.5],
            "column 'score': type float (found bool, not converted) failed at row 0: True",
        ),
        (
            ["a", 7],
            [0.5, 0.5],
            "column 'key': type str (found int, not converted) failed at row 1: 7",
        ),
        (["a", None], [0.5, 0.5], "column 'key': not_nullable failed at row 1: None"),
    ],
)
@pytest.mark.parametrize("via", ["write", "read"])
def test_values_are_not_converted(
    tmp_path: Path, key: list, score: list, line: str, via: str
) -> None:
    path = tmp_path / "t.jsonl"
    df = pd.DataFrame({"key": key, "score": score}, dtype=object)
    with pytest.raises(SchemaViolation) as info:
        if via == "write":
            write_table(df, path, PairSchema)
        else:
            path.write_text("".join(json.dumps(row) + "\n" for row in df.to_dict("records")))
            read_table(path, PairSchema)
    assert f"  - {line}" in str(info.value).splitlines()
    assert str(path) in str(info.value)
    assert path.exists() == (via == "read")


def test_lossless_representations_are_normalized(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "key": pd.Series(["a", "b", "c"], dtype="category"),
            "score": pd.Series([0, 1, 0.5], dtype=object),  # ints are exact floats
        }
    )
    path = tmp_path / "t.parquet"
    write_table(df, path, PairSchema)
    back = read_table(path, PairSchema)
    assert back["key"].tolist() == ["a", "b", "c"]
    assert back["score"].dtype == np.float64 and back["score"].tolist() == [0.0, 1.0, 0.5]
    assert df["score"].dtype == object  # the caller's frame is left as it was


def test_read_table_jsonl_keeps_each_value_as_json_typed_it(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    # "007" and "1e3" stay strings; a JSON null is not read as NaN-then-float for the column
    path.write_text('{"key": "007", "score": 0}\n\n{"key": "1e3", "score": 1}\n')
    back = read_table(path, PairSchema)
    assert back["key"].tolist() == ["007", "1e3"]
    assert back["score"].tolist() == [0.0, 1.0]


def test_read_table_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"key": "a", "score": 0.5}\n{"key": "b", \n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not valid JSON"):
        read_table(path, PairSchema)
    path.write_text('{"key": "a", "score": 0.5}\n[1, 2]\n')
    with pytest.raises(
        ValueError, match=r"t\.jsonl:2: expected one JSON object per line, got list"
    ):
        read_table(path, PairSchema)


def test_write_table_jsonl_floats_round_trip_exactly(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    scores = [0.1 + 0.2, 1 / 3, 2**-40]
    write_table(pd.DataFrame({"key": ["a", "b", "c"], "score": scores}), path, PairSchema)
    assert read_table(path, PairSchema)["score"].tolist() == scores


def test_read_table_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        read_table(tmp_path / "nope.parquet", PairSchema)
    with pytest.raises(ValueError, match="unknown table format"):
        write_table(pd.DataFrame({"key": ["a"], "score": [0.1]}), tmp_path / "t.csv", PairSchema)


# --- params sections -------------------------------------------------------------------------


def test_load_yaml_section(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.001\n  steps: 10\nempty:\nlisty: [1, 2]\n")
    assert load_yaml_section(params, "train") == {"lr": 0.001, "steps": 10}

    with pytest.raises(ParamsError, match=r"params\.yaml.*'eval'.*present: empty, listy, train"):
        load_yaml_section(params, "eval")
    with pytest.raises(ParamsError, match="'listy' must be a mapping"):
        load_yaml_section(params, "listy")
    with pytest.raises(ParamsError, match="'empty' must be a mapping"):
        load_yaml_section(params, "empty")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml.*'train'"):
        load_yaml_section(tmp_path / "missing.yaml", "train")

    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match=r"scalar\.yaml.*'train'"):
        load_yaml_section(scalar, "train")
