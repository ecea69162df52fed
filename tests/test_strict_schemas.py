"""Strict schemas (issue 15): no value is converted to fit its column.

Coercion used to turn a null into False, "True"/"False" into True, 2.7 teacher tokens into 2 and
difficulty 1.5 into 1, after which the stage overwrote its outputs. For every contract in
``relaypipe.schemas.SCHEMAS`` and every column of it, each kind of bad value is put in row 1 of
an otherwise valid table and must be refused, naming file, column, row and value:

* by ``write_table`` (the frame a stage built), leaving the previous file byte-identical;
* by ``read_table`` of a Parquet file a user corrupted with pandas (a column of one type, since
  Parquet columns have one: 2.7 among 5.0s, "True" among "False"s);
* by ``read_table`` of a .jsonl file (each value with its own JSON type).

Lossless representations (int32, object ints, float32, categorical text, empty columns, ...) are
still accepted and handed on in the schema's dtypes.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
from pandera.typing import Series

import relaypipe.schemas as schemas_module
from relaypipe.io import SchemaViolation, read_table, write_table
from relaypipe.schemas import (
    SCHEMAS,
    EvalRequestSchema,
    FilteredProblemSchema,
    ProblemSchema,
    SFTExampleSchema,
)

# ---------------------------------------------------------------------------------------------
# Valid tables, one per contract
# ---------------------------------------------------------------------------------------------


def _problems() -> dict[str, list[Any]]:
    return {
        "problem_id": ["arith-0", "arith-1", "arith-2"],
        "task": ["arith", "arith", "gsm8k"],
        "difficulty": [0, 3, 7],
        "question": ["What is 1 + 1?", "What is 2 + 3?", "How many?"],
        "answer": ["2", "5", "12"],
        "solution": ["1 + 1 = 2\nAnswer: 2", "", "Answer: 12"],
        "split": ["train", "train", "train"],
    }


def _valid(schema: type[pa.DataFrameModel]) -> pd.DataFrame:
    if schema is ProblemSchema:
        return pd.DataFrame(_problems())
    if schema is FilteredProblemSchema:
        return pd.DataFrame({**_problems(), "teacher_pass_rate": [0.5, 1.0, 0.25]})
    if schema is SFTExampleSchema:
        return pd.DataFrame(
            {
                "problem_id": ["arith-0", "arith-1", "arith-1"],
                "prompt": ["Q: 1 + 1?", "Q: 2 + 3?", "Q: 2 + 3?"],
                "completion": ["2", "<call>4</call>5", "5"],
                "n_commands": [0, 1, 0],
                "policy": ["random", "random", "mistakes"],
            }
        )
    if schema is EvalRequestSchema:
        return pd.DataFrame(
            {
                "benchmark": ["arith-d1", "arith-d1", "gsm8k"],
                "mode": ["relay", "random_router", "teacher"],
                "router_p": [-1.0, 0.25, -1.0],
                "call_bias": [1.5, 0.0, 0.0],
                "oracle_tau": [-1.0, -1.0, -1.0],
                "problem_id": ["p0", "p1", "p2"],
                "correct": [True, False, True],
                "student_tokens": [12, 30, 0],
                "teacher_tokens": [4, 9, 40],
                "command_tokens": [2, 3, 0],
                "calls": [1, 2, 0],
                "teacher_prefill_tokens": [10, 20, 15],
                "teacher_context_tokens": [10, 25, 15],
                "student_prefill_tokens": [8, 8, 0],
                "latency_s": [0.5, 1.25, 2.0],
            }
        )
    raise AssertionError(f"no valid table for {schema.__name__}: add one")


def _family(schema: type[pa.DataFrameModel], column: str) -> str:
    dtype = str(schema.to_schema().columns[column].dtype)
    for family, names in {
        "str": ("str", "string"),
        "int": ("int64",),
        "float": ("float64",),
        "bool": ("bool",),
    }.items():
        if dtype in names or dtype.startswith(names):
            return family
    raise AssertionError(f"{schema.__name__}.{column}: unexpected dtype {dtype}")


# ---------------------------------------------------------------------------------------------
# The bad values, by the type of column they are put in
# ---------------------------------------------------------------------------------------------

NULLS = ("None", "nan", "<NA>")


@dataclass(frozen=True)
class Bad:
    name: str
    value: Any
    check: str  # what the report must name
    json_ok: bool = True  # representable in a .jsonl file (JSON has no NaN, inf, bytes)

    def shown(self) -> tuple[str, ...]:
        """How the report may print the value (a null may come back as None, nan or <NA>)."""
        if self.check == "not_nullable":
            return NULLS
        return (repr(self.value),)


BAD_VALUES: dict[str, list[Bad]] = {
    "str": [
        Bad("null", None, "not_nullable"),
        Bad("nan", float("nan"), "not_nullable", json_ok=False),
        Bad("int", 42, "type str (found"),
        Bad("float", 1.5, "type str (found"),
        Bad("bool", True, "type str (found"),
        Bad("bytes", b"arith-9", "type str (found", json_ok=False),
    ],
    "int": [
        Bad("null", None, "not_nullable"),
        Bad("nan", float("nan"), "not_nullable", json_ok=False),
        Bad("float_2.7", 2.7, "type int (found"),
        Bad("float_1.5", 1.5, "type int (found"),
        Bad("float_integral", 2.0, "type int (found"),
        Bad("float_inf", float("inf"), "type int (found", json_ok=False),
        Bad("str_digit", "3", "type int (found str"),
        Bad("str_word", "two", "type int (found str"),
        Bad("bool_true", True, "type int (found bool"),
        Bad("bool_false", False, "type int (found bool"),
        Bad("too_big", 2**63, "within int64 range"),
    ],
    "float": [
        Bad("null", None, "not_nullable"),
        Bad("nan", float("nan"), "not_nullable", json_ok=False),
        Bad("inf", float("inf"), "finite", json_ok=False),
        Bad("minus_inf", float("-inf"), "finite", json_ok=False),
        Bad("str_number", "0.5", "type float (found str"),
        Bad("bool", True, "type float (found bool"),
        Bad("inexact_int", 2**60 + 1, "exact as float64"),
    ],
    "bool": [
        Bad("null", None, "not_nullable"),
        Bad("nan", float("nan"), "not_nullable", json_ok=False),
        Bad("str_True", "True", "type bool (found str"),
        Bad("str_False", "False", "type bool (found str"),
        Bad("str_1", "1", "type bool (found str"),
        Bad("str_yes", "yes", "type bool (found str"),
        Bad("int_1", 1, "type bool (found int"),
        Bad("int_0", 0, "type bool (found int"),
        Bad("float_1", 1.0, "type bool (found float"),
    ],
}


def _cases(*, jsonl: bool = False) -> list[Any]:
    cases = []
    for schema in SCHEMAS:
        for column in schema.to_schema().columns:
            for bad in BAD_VALUES[_family(schema, column)]:
                if jsonl and not bad.json_ok:
                    continue
                cases.append(
                    pytest.param(schema, column, bad, id=f"{schema.__name__}-{column}-{bad.name}")
                )
    return cases


WRITE_CASES = _cases()
PARQUET_CASES = _cases()
JSONL_CASES = _cases(jsonl=True)


def _with_bad(df: pd.DataFrame, column: str, value: Any) -> pd.DataFrame:
    """``df`` with ``value`` in row 1 of ``column`` (the column made object to hold it)."""
    out = df.copy()
    values = out[column].astype(object).tolist()
    values[1] = value
    out[column] = pd.Series(values, index=out.index, dtype=object)
    return out


def _one_type(df: pd.DataFrame, column: str, value: Any) -> pd.DataFrame:
    """``df`` with ``value`` in row 1 and the rest of ``column`` turned into ``value``'s type,
    as a user editing a Parquet file with pandas would leave it (a Parquet column has one type).

    A null goes with any type; values that do not convert (a problem id as an int) are
    replaced by ``value`` itself.
    """
    out = df.copy()
    values = out[column].tolist()
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        converted = []
        for v in values:
            try:
                converted.append(type(value)(v))
            except (TypeError, ValueError):
                converted.append(value)
        values = converted
    values[1] = value
    out[column] = pd.Series(values, index=out.index)
    return out


def _assert_reports(err: SchemaViolation, path: Path, schema: type, column: str, bad: Bad) -> None:
    message = str(err)
    assert str(path) in message, message
    assert schema.__name__ in message, message
    lines = [line for line in message.splitlines() if f"column {column!r}:" in line]
    assert lines, message
    wanted = [f"row 1: {shown}" for shown in bad.shown()]
    assert any(bad.check in line and any(w in line for w in wanted) for line in lines), (
        f"expected {bad.check!r} at one of {wanted} in:\n{message}"
    )
    assert err.path == path and err.schema_name == schema.__name__
    assert err.failure_cases is not None
    rows = err.failure_cases[err.failure_cases["column"] == column]
    assert 1 in set(rows["index"].dropna()), err.failure_cases


def _write_jsonl(df: pd.DataFrame, path: Path) -> None:
    """Each row as one JSON object, every value with its own JSON type."""
    with path.open("w", encoding="utf-8") as fh:
        for row in df.astype(object).to_dict(orient="records"):
            fh.write(json.dumps(row, default=lambda o: o.item()) + "\n")


# ---------------------------------------------------------------------------------------------
# Bad values are refused, wherever they come from
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "column", "bad"), WRITE_CASES)
def test_write_table_refuses_and_keeps_previous_file(
    tmp_path: Path, schema: type[pa.DataFrameModel], column: str, bad: Bad
) -> None:
    path = tmp_path / "table.parquet"
    write_table(_valid(schema), path, schema)
    before = path.read_bytes()
    frame = _with_bad(_valid(schema), column, bad.value)
    snapshot = frame.copy()
    with pytest.raises(SchemaViolation) as info:
        write_table(frame, path, schema)
    _assert_reports(info.value, path, schema, column, bad)
    assert "nothing was written" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]  # no temporaries
    pd.testing.assert_frame_equal(frame, snapshot)  # the caller's frame is not touched


@pytest.mark.parametrize(("schema", "column", "bad"), PARQUET_CASES)
def test_read_table_refuses_corrupted_parquet(
    tmp_path: Path, schema: type[pa.DataFrameModel], column: str, bad: Bad
) -> None:
    path = tmp_path / "table.parquet"
    _one_type(_valid(schema), column, bad.value).to_parquet(path)
    with pytest.raises(SchemaViolation) as info:
        read_table(path, schema)
    _assert_reports(info.value, path, schema, column, bad)


@pytest.mark.parametrize(("schema", "column", "bad"), JSONL_CASES)
def test_read_table_refuses_corrupted_jsonl(
    tmp_path: Path, schema: type[pa.DataFrameModel], column: str, bad: Bad
) -> None:
    path = tmp_path / "table.jsonl"
    _write_jsonl(_with_bad(_valid(schema), column, bad.value), path)
    with pytest.raises(SchemaViolation) as info:
        read_table(path, schema)
    _assert_reports(info.value, path, schema, column, bad)


def test_the_issue_examples_are_refused(tmp_path: Path) -> None:
    """The four conversions of issue 15, as one hand-edited requests table and problem table."""
    requests = _valid(EvalRequestSchema)
    requests["correct"] = pd.Series([None, "True", "False"], dtype=object)
    requests["teacher_tokens"] = [4.0, 2.7, 40.0]
    path = tmp_path / "requests.parquet"
    requests.to_parquet(path)
    with pytest.raises(SchemaViolation) as info:
        read_table(path, EvalRequestSchema)
    message = str(info.value)
    # pandas reads a text column with a null as str dtype, the null as nan
    assert "column 'correct': not_nullable failed at row 0: nan" in message
    assert "column 'correct': type bool (found str, not converted) failed at" in message
    assert "row 1: 'True'; row 2: 'False'" in message
    assert "column 'teacher_tokens': type int (found float64, not converted)" in message
    assert "row 1: 2.7" in message

    problems = _valid(ProblemSchema)
    problems["difficulty"] = [0.0, 1.5, 7.0]
    path = tmp_path / "train.parquet"
    problems.to_parquet(path)
    with pytest.raises(SchemaViolation, match=r"'difficulty'.*row 1: 1\.5"):
        read_table(path, ProblemSchema)


def test_every_bad_cell_is_listed_once_per_column_and_check(tmp_path: Path) -> None:
    df = _valid(EvalRequestSchema)
    df["calls"] = pd.Series([1, "2", 2.5], dtype=object)
    df["latency_s"] = [0.5, float("inf"), float("nan")]
    with pytest.raises(SchemaViolation) as info:
        write_table(df, tmp_path / "r.parquet", EvalRequestSchema)
    message = str(info.value)
    assert "column 'calls': type int (found str, not converted) failed at row 1: '2'" in message
    assert "column 'calls': type int (found float, not converted) failed at row 2: 2.5" in message
    assert "column 'latency_s': finite failed at row 1: inf" in message
    assert "column 'latency_s': not_nullable failed at row 2: nan" in message
    # pandera's own dtype complaint about the same columns would only repeat this
    assert "dtype('int64')" not in message


def test_table_level_failures_name_rows_and_checks(tmp_path: Path) -> None:
    valid = _valid(EvalRequestSchema)
    duplicate = pd.concat([valid, valid.iloc[[0]]], ignore_index=True)
    with pytest.raises(SchemaViolation) as info:
        write_table(duplicate, tmp_path / "r.parquet", EvalRequestSchema)
    assert (
        "table: multiple_fields_uniqueness failed at row 0: (benchmark='arith-d1', mode='relay', "
        "router_p=-1.0, call_bias=1.5, oracle_tau=-1.0, problem_id='p0'); row 3: "
        "(benchmark='arith-d1'"
    ) in str(info.value)

    crossed = valid.assign(command_tokens=[20, 3, 0])  # row 0: more commands than tokens
    with pytest.raises(SchemaViolation) as info:
        write_table(crossed, tmp_path / "r.parquet", EvalRequestSchema)
    assert "  - table: command_tokens <= student_tokens failed\n" in str(info.value)

    mistyped = _with_bad(valid, "command_tokens", "3")
    with pytest.raises(SchemaViolation) as info:
        write_table(mistyped, tmp_path / "r.parquet", EvalRequestSchema)
    lines = str(info.value).splitlines()
    # table-level lines first, then the columns in schema order
    assert lines[1].startswith("  - table: command_tokens <= student_tokens failed: TypeError")
    assert lines[2].startswith("  - column 'command_tokens': type int (found str")
    assert not (tmp_path / "r.parquet").exists()


# ---------------------------------------------------------------------------------------------
# Lossless representations are accepted, and handed on in the schema's dtypes
# ---------------------------------------------------------------------------------------------

EXPECTED_DTYPES = {"int": np.dtype(np.int64), "float": np.dtype(np.float64), "bool": np.dtype(bool)}


def _representations(family: str, values: list[Any]) -> dict[str, pd.Series]:
    if family == "int":
        return {
            "int32": pd.Series(values, dtype=np.int32),
            "uint16": pd.Series(values, dtype=np.uint16),
            "object": pd.Series(values, dtype=object),
            "numpy_ints_in_object": pd.Series([np.int16(v) for v in values], dtype=object),
            "nullable_Int64": pd.Series(values, dtype="Int64"),
            "arrow_int64": pd.Series(values, dtype="int64[pyarrow]"),
        }
    if family == "float":
        return {
            "float32": pd.Series(values, dtype=np.float32),  # the valid values are exact in it
            "object": pd.Series(values, dtype=object),
            "nullable_Float64": pd.Series(values, dtype="Float64"),
        }
    if family == "bool":
        return {
            "object": pd.Series(values, dtype=object),
            "nullable_boolean": pd.Series(values, dtype="boolean"),
            "numpy_bools_in_object": pd.Series([np.bool_(v) for v in values], dtype=object),
        }
    return {
        "object": pd.Series(values, dtype=object),
        "category": pd.Series(values, dtype="category"),
        "nullable_string": pd.Series(values, dtype="string"),
    }


def _representation_cases() -> list[Any]:
    cases = []
    for schema in SCHEMAS:
        valid = _valid(schema)
        for column in valid.columns:
            family = _family(schema, column)
            for name in _representations(family, valid[column].tolist()):
                cases.append(
                    pytest.param(schema, column, name, id=f"{schema.__name__}-{column}-{name}")
                )
    return cases


REPRESENTATION_CASES = _representation_cases()


@pytest.mark.parametrize(("schema", "column", "representation"), REPRESENTATION_CASES)
def test_lossless_representations_are_accepted(
    tmp_path: Path, schema: type[pa.DataFrameModel], column: str, representation: str
) -> None:
    valid = _valid(schema)
    family = _family(schema, column)
    df = valid.copy()
    df[column] = _representations(family, valid[column].tolist())[representation]
    path = tmp_path / "t.parquet"
    write_table(df, path, schema)
    back = read_table(path, schema)
    if family in EXPECTED_DTYPES:
        assert back[column].dtype == EXPECTED_DTYPES[family]
    assert back[column].tolist() == valid[column].tolist()
    assert all(type(v) is type(w) for v, w in zip(back[column], valid[column], strict=True))
    # read_table accepts what a user's pandas wrote in that representation, too
    df.to_parquet(tmp_path / "by_hand.parquet")
    assert (
        read_table(tmp_path / "by_hand.parquet", schema)[column].tolist() == valid[column].tolist()
    )


def test_float32_and_ints_in_float_columns_keep_their_values(tmp_path: Path) -> None:
    df = _valid(EvalRequestSchema)
    df["latency_s"] = np.array([0.1, 1.25, 3.0], dtype=np.float32)
    df["router_p"] = pd.Series([-1, 0, -1], dtype=object)  # the int 0 is the float 0.0
    path = tmp_path / "r.parquet"
    write_table(df, path, EvalRequestSchema)
    back = read_table(path, EvalRequestSchema)
    assert back["latency_s"].tolist() == [float(np.float32(0.1)), 1.25, 3.0]
    assert back["router_p"].tolist() == [-1.0, 0.0, -1.0]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_valid_tables_round_trip_unchanged(
    tmp_path: Path, schema: type[pa.DataFrameModel], suffix: str
) -> None:
    valid = _valid(schema)
    path = tmp_path / f"t{suffix}"
    write_table(valid, path, schema)
    back = read_table(path, schema)
    assert list(back.columns) == list(valid.columns)
    for column in valid.columns:
        assert back[column].tolist() == valid[column].tolist(), column
        assert [type(v) for v in back[column]] == [type(v) for v in valid[column]], column


def test_jsonl_floats_are_written_exactly(tmp_path: Path) -> None:
    df = _valid(EvalRequestSchema)
    df["latency_s"] = [0.1 + 0.2, 1 / 3, 123456.78901234567]
    path = tmp_path / "r.jsonl"
    write_table(df, path, EvalRequestSchema)
    assert read_table(path, EvalRequestSchema)["latency_s"].tolist() == df["latency_s"].tolist()


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("empty", ["object", "float64", "no_rows_of_valid"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_empty_tables(
    tmp_path: Path, schema: type[pa.DataFrameModel], empty: str, suffix: str
) -> None:
    columns = list(_valid(schema).columns)
    if empty == "object":  # pd.DataFrame([], columns=...), what an empty list of rows gives
        df = pd.DataFrame([], columns=columns)
    elif empty == "float64":  # pd.DataFrame({c: []}), what an empty .jsonl used to read as
        df = pd.DataFrame({column: np.array([], dtype=np.float64) for column in columns})
    else:
        df = _valid(schema).iloc[:0]
    path = tmp_path / f"t{suffix}"
    write_table(df, path, schema)
    back = read_table(path, schema)
    assert back.empty and list(back.columns) == columns
    for column in columns:
        family = _family(schema, column)
        if family in EXPECTED_DTYPES:
            assert back[column].dtype == EXPECTED_DTYPES[family], column


# ---------------------------------------------------------------------------------------------
# Columns: missing, extra, duplicated
# ---------------------------------------------------------------------------------------------


def _column_cases() -> list[Any]:
    cases = []
    for schema in SCHEMAS:
        for column in schema.to_schema().columns:
            cases.append(pytest.param(schema, column, id=f"{schema.__name__}-{column}"))
    return cases


COLUMN_CASES = _column_cases()


@pytest.mark.parametrize(("schema", "column"), COLUMN_CASES)
def test_missing_column_is_refused(
    tmp_path: Path, schema: type[pa.DataFrameModel], column: str
) -> None:
    df = _valid(schema).drop(columns=[column])
    path = tmp_path / "t.parquet"
    if not schema.to_schema().columns[column].required:
        # an optional column (EvalRequestSchema.call_bias, oracle_tau: older tables have none)
        # may be absent
        write_table(df, path, schema)
        assert column not in read_table(path, schema).columns
        return
    with pytest.raises(SchemaViolation, match=rf"column_in_dataframe.*'{column}'"):
        write_table(df, path, schema)
    df.to_parquet(path)
    with pytest.raises(SchemaViolation, match=rf"column_in_dataframe.*'{column}'") as info:
        read_table(path, schema)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_extra_column_is_refused(
    tmp_path: Path, schema: type[pa.DataFrameModel], suffix: str
) -> None:
    df = _valid(schema).assign(note=["a", "b", "c"])
    path = tmp_path / f"t{suffix}"
    with pytest.raises(SchemaViolation, match=r"column_in_schema.*'note'"):
        write_table(df, path, schema)
    if suffix == ".parquet":
        df.to_parquet(path)
    else:
        _write_jsonl(df, path)
    with pytest.raises(SchemaViolation, match=r"column_in_schema.*'note'"):
        read_table(path, schema)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_duplicated_column_is_refused(tmp_path: Path, schema: type[pa.DataFrameModel]) -> None:
    df = _valid(schema)
    first = df.columns[0]
    df = pd.concat([df, df[[first]]], axis=1)
    with pytest.raises(SchemaViolation, match=rf"{first}"):
        write_table(df, tmp_path / "t.parquet", schema)
    assert not (tmp_path / "t.parquet").exists()


def test_jsonl_row_missing_a_key_is_a_null(tmp_path: Path) -> None:
    rows = _valid(SFTExampleSchema).to_dict(orient="records")
    del rows[1]["n_commands"]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row, default=lambda o: o.item()) + "\n" for row in rows))
    with pytest.raises(SchemaViolation, match=r"'n_commands': not_nullable failed at row 1"):
        read_table(path, SFTExampleSchema)


# ---------------------------------------------------------------------------------------------
# The contracts themselves
# ---------------------------------------------------------------------------------------------


def test_schemas_lists_every_contract() -> None:
    models = {
        obj
        for obj in vars(schemas_module).values()
        if inspect.isclass(obj)
        and issubclass(obj, pa.DataFrameModel)
        and obj.__module__ == schemas_module.__name__
    }
    assert models == set(SCHEMAS)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_contracts_do_not_coerce_and_hold_no_nulls(schema: type[pa.DataFrameModel]) -> None:
    pandera_schema = schema.to_schema()
    assert pandera_schema.strict is True
    assert pandera_schema.unique_column_names is True
    assert not pandera_schema.coerce
    for name, column in pandera_schema.columns.items():
        assert not column.coerce, name
        # No column is meant to hold nulls today; one that is must be listed here, with why.
        assert not column.nullable, name


def test_a_coercing_schema_is_refused(tmp_path: Path) -> None:
    class Coercing(pa.DataFrameModel):
        n: Series[int]

        class Config:
            coerce = True

    class CoercingField(pa.DataFrameModel):
        n: Series[int] = pa.Field(coerce=True)

    path = tmp_path / "t.parquet"
    pd.DataFrame({"n": [1]}).to_parquet(path)
    for schema in (Coercing, CoercingField):
        with pytest.raises(TypeError, match=rf"{schema.__name__} coerces"):
            write_table(pd.DataFrame({"n": [1.5]}), tmp_path / "new.parquet", schema)
        with pytest.raises(TypeError, match="coerce"):
            read_table(path, schema)
    assert not (tmp_path / "new.parquet").exists()


def test_case_counts() -> None:
    """The parametrized matrices above cover every contract's every column (a guard against a
    schema gaining a column of a type nothing here corrupts)."""
    n_columns = sum(len(schema.to_schema().columns) for schema in SCHEMAS)
    assert len(COLUMN_CASES) == n_columns
    assert len(WRITE_CASES) == len(PARQUET_CASES) > 3 * n_columns
    assert len(JSONL_CASES) > 2 * n_columns
