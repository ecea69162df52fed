"""Reading and writing stage artifacts: atomically, and checked against the stage contracts.

Every DVC stage writes its outputs through this module so that:

* an interrupted or failing stage never leaves a half-written file or model directory where the
  next stage (or DVC's cache) would pick it up: writes go to a hidden sibling and are renamed
  into place only when complete;
* a table that breaks its schema (``relaypipe.schemas``) is refused *before* anything touches
  the disk, and a table that a reader finds broken is reported with the file, the column, the
  check and the offending rows, instead of a KeyError three stages later;
* no value is ever converted to fit a schema (no ``coerce``): a null does not become False, the
  string "True" does not become True, 2.7 tokens do not become 2. Only the *representation* of
  values that already have the column's type may change, losslessly (an int32 or object column
  of ints is stored as int64, a float32 column as float64, an empty column of any dtype takes
  the column's dtype). ``_strict_types`` implements the rule; ``relaypipe.schemas`` states it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.dtypes as pa_dtypes
import pandera.errors as pa_errors
import yaml

from relaypipe.errors import InputError

__all__ = [
    "ParamsError",
    "SchemaViolation",
    "atomic_path",
    "load_yaml_section",
    "read_json",
    "read_table",
    "write_json",
    "write_table",
]

# A schema is either a pandera DataFrameModel subclass (what relaypipe.schemas defines) or a
# DataFrameSchema object; both expose ``validate(df, lazy=...)``.
Schema = Any

_TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
# How much of a failure report to print: enough to see the pattern, short enough to read.
_MAX_FAILURE_GROUPS = 10
_MAX_ROWS_PER_GROUP = 5
_MAX_VALUE_CHARS = 60


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _reserve_sibling(path: Path, tag: str, *, directory: bool) -> Path:
    """Create (exclusively) a hidden, uniquely named sibling of ``path`` and return it.

    Created with the default modes (0o666/0o777 minus umask), not tempfile's 0o600/0o700, so
    the final artifact gets the same permissions a plain ``open`` or ``mkdir`` would give it.
    """
    while True:
        candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
        try:
            if directory:
                candidate.mkdir(mode=0o777)
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return candidate


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree; a path that is already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    # Without this, a crash right after the rename can leave a zero-length file under the
    # final name on some filesystems (the rename is journaled before the data).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Best effort: not every filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` onto ``target``."""
    tmp_is_dir = tmp.is_dir() and not tmp.is_symlink()
    target_is_dir = target.is_dir() and not target.is_symlink()
    if not tmp_is_dir:
        _fsync_file(tmp)
    if not tmp_is_dir and not target_is_dir:
        # The common case: one atomic rename; readers see the old file or the new one.
        os.replace(tmp, target)
    else:
        # rename(2) cannot replace a non-empty directory (nor swap a file and a directory), so
        # move the old one aside first. Readers may briefly find nothing at ``target``, but
        # never a half-written directory.
        old: Path | None = None
        if os.path.lexists(target):
            # The placeholder has the target's kind: rename(2) may replace an empty
            # directory with a directory, and a file with a file.
            old = _reserve_sibling(target, "old", directory=target_is_dir)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous version back rather than lose it
                os.replace(old, target)
            raise
        if old is not None:
            _remove(old)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    The temporary path (``.<name>.tmp-XXXXXXXX`` in the same directory, so the final rename
    stays on one filesystem and is atomic) is created before it is yielded: an empty file, or
    an empty directory when ``directory=True`` (e.g. for ``model.save_pretrained(tmp)``).
    Whatever the block leaves there, file or directory, replaces ``path``; if the block raises,
    the temporary is deleted and ``path`` is left exactly as it was. Parent directories are
    created as needed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_sibling(target, "tmp", directory=directory)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(
                f"atomic write to {target}: the block removed its temporary path {tmp}, "
                "so there is nothing to move into place"
            )
        _commit(tmp, target)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write must not leave hidden temporaries behind.
        _remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    # Metrics are often numpy scalars (df["x"].mean()) or paths; write them as plain JSON.
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and numpy scalars
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline), atomically.

    Sorted keys and a fixed layout keep the bytes, and so DVC's hashes, stable across runs.
    NaN and infinity are refused (they are not JSON, and DVC's metric readers reject them);
    serialization happens before the file is opened, so a refused object writes nothing.
    """
    text = json.dumps(
        obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_json_default
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a parse error names the file."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


class SchemaViolation(InputError):
    """A table does not match its schema; the message says where and how.

    Attributes: ``path`` (the file read or about to be written), ``schema_name``, and
    ``failure_cases`` (pandera's failure-case frame, or None when pandera gave none).
    """

    def __init__(
        self,
        message: str,
        *,
        path: Path,
        schema_name: str,
        failure_cases: pd.DataFrame | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.schema_name = schema_name
        self.failure_cases = failure_cases


def _schema_name(schema: Schema) -> str:
    if isinstance(schema, type):
        return schema.__name__
    return getattr(schema, "name", None) or type(schema).__name__


def _pandera_schema(schema: Schema) -> Any:
    """The DataFrameSchema behind ``schema`` (a DataFrameModel subclass or a DataFrameSchema)."""
    return schema.to_schema() if isinstance(schema, type) else schema


def _schema_columns(schema: Schema) -> list[str]:
    return list(_pandera_schema(schema).columns)


def _table_format(path: Path) -> str:
    try:
        return _TABLE_FORMATS[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(_TABLE_FORMATS))
        raise ValueError(f"{path}: unknown table format {path.suffix!r} (use {known})") from None


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _short(value: Any) -> str:
    return _clip(repr(value))


# Table-level checks whose failure cases are column names (a missing, unexpected or repeated one).
_COLUMN_SET_CHECKS = frozenset(
    {"column_in_schema", "column_in_dataframe", "dataframe_column_labels_unique"}
)


def _describe_failures(failure_cases: pd.DataFrame) -> tuple[list[str], int]:
    """One line per (column, check) pair, with the offending rows; and how many were left out.

    Table-level failures get one line per check: the columns a column-set check names, the
    rows (with each column's value) a multi-column uniqueness check names, or the outcome of a
    cross-column check (nothing when it simply returned False, the error when it crashed).
    """
    groups: dict[tuple[str, str, str], list[tuple[Any, Any, Any]]] = {}
    for row in failure_cases.itertuples(index=False):
        context, check = str(row.schema_context), str(row.check)
        # Table-level cases that point at rows name one cell each; they group by check alone.
        per_cell = context == "DataFrameSchema" and not _is_missing(row.index)
        key = (context, "" if per_cell else str(row.column), check)
        groups.setdefault(key, []).append((row.index, row.column, row.failure_case))

    lines = []
    for (context, column, check), cases in list(groups.items())[:_MAX_FAILURE_GROUPS]:
        if context == "DataFrameSchema":
            lines.append(_describe_table_failure(check, cases))
            continue
        shown = [
            f"row {index}: {_short(value)}" if not _is_missing(index) else _short(value)
            for index, _, value in cases[:_MAX_ROWS_PER_GROUP]
        ]
        more = len(cases) - len(shown)
        suffix = f" (+{more} more)" if more else ""
        lines.append(f"  - column {column!r}: {check} failed at {'; '.join(shown)}{suffix}")
    return lines, max(0, len(groups) - _MAX_FAILURE_GROUPS)


def _describe_table_failure(check: str, cases: list[tuple[Any, Any, Any]]) -> str:
    if check in _COLUMN_SET_CHECKS:
        names = ", ".join(_short(value) for _, _, value in cases)
        return f"  - table: {check} failed for column(s) {names}"
    rows: dict[Any, list[str]] = {}
    for index, column, value in cases:
        if not _is_missing(index):
            rows.setdefault(index, []).append(f"{column}={_short(value)}")
    if rows:
        shown = [f"row {index}: ({', '.join(cells)})" for index, cells in rows.items()]
        more = len(shown) - _MAX_ROWS_PER_GROUP
        suffix = f" (+{more} more)" if more > 0 else ""
        return f"  - table: {check} failed at {'; '.join(shown[:_MAX_ROWS_PER_GROUP])}{suffix}"
    # A cross-column check: False when it ran and failed, an error's text when it crashed
    # (e.g. on a column of the wrong type, reported on its own line).
    errors = [_clip(str(value)) for _, _, value in cases if not isinstance(value, (bool, np.bool_))]
    return f"  - table: {check} failed" + (f": {'; '.join(errors)}" if errors else "")


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # pd.isna of a list-like is not a single bool
        return False


# ---------------------------------------------------------------------------------------------
# Strict types: values are checked, never converted
# ---------------------------------------------------------------------------------------------

# Integers above this magnitude are not all representable as float64.
_FLOAT64_EXACT_INT = 2**53
_INT64 = np.iinfo(np.int64)
# The columns of pandera's failure-case frame, which the type pass's failures join.
_FAILURE_COLUMNS = ["schema_context", "column", "check", "check_number", "failure_case", "index"]
# The representation a column of each type family is handed on in (pandas' default for str).
_TARGET_DTYPES: dict[str, Any] = {
    "int": np.dtype(np.int64),
    "float": np.dtype(np.float64),
    "bool": np.dtype(bool),
    "str": "str",
}


def _type_family(dtype: Any) -> str | None:
    """The type family of a pandera column dtype: str, int (int64), float (float64) or bool.

    None for any other dtype, which is left to pandera's own (equally coercion-free) dtype check.
    """
    if pa_dtypes.is_string(dtype):
        return "str"
    try:
        numpy_dtype = np.dtype(getattr(dtype, "type", None))
    except TypeError:
        return None
    families = {np.dtype(np.int64): "int", np.dtype(np.float64): "float", np.dtype(bool): "bool"}
    return families.get(numpy_dtype)


def _refuse_coercion(pandera_schema: Any, name: str) -> None:
    """A schema that coerces would convert values (null to False, 2.7 to 2) before checking."""
    coercing = [str(col) for col, column in pandera_schema.columns.items() if column.coerce]
    if getattr(pandera_schema, "coerce", False) or coercing:
        where = f"column(s) {', '.join(coercing)}" if coercing else "every column"
        raise TypeError(
            f"{name} coerces {where} (coerce=True): relaypipe tables are validated without "
            "coercion, so that a bad value is reported instead of converted. Set coerce = False."
        )


@dataclass
class _CheckedColumn:
    """What the type pass found in one column."""

    # The column in its target representation (same values), or None when it is left as it
    # was: it holds a value of the wrong type or a null, reported by the pass or by pandera.
    series: pd.Series | None
    failures: list[tuple[Any, Any, str]]  # (row label, value, check), in row order


def _element_problem(family: str, value: Any, found: str | None) -> str | None:
    """Why a non-null ``value`` does not belong in a ``family`` column (None: it does).

    ``found`` names the column's dtype when it has a specific one (``float64``); for object
    columns each value's own type is named.
    """
    is_bool = isinstance(value, (bool, np.bool_))
    is_int = isinstance(value, (int, np.integer)) and not is_bool
    if family == "str" and isinstance(value, str):
        return None
    if family == "bool" and is_bool:
        return None
    if family == "int" and is_int:
        return None if _INT64.min <= int(value) <= _INT64.max else "within int64 range"
    if family == "float":
        if is_int:
            # An int is a float's value too (as in Python), if float64 holds it exactly.
            return None if abs(int(value)) <= _FLOAT64_EXACT_INT else "exact as float64"
        if isinstance(value, (float, np.floating)):
            if float(value) != value:  # e.g. a longdouble that float64 would round
                return "exact as float64"
            return "finite" if np.isinf(value) else None
    kind = found or type(value).__name__
    return f"type {family} (found {kind}, not converted)"


def _flagged(
    series: pd.Series, values: np.ndarray, mask: np.ndarray, check: str
) -> list[tuple[Any, Any, str]]:
    """(row label, value, check) for the rows of ``series`` where ``mask`` is set."""
    return [
        (label, value.item(), check)
        for label, value in zip(series.index[mask], values[mask], strict=True)
    ]


def _check_column(series: pd.Series, family: str) -> _CheckedColumn:
    """Check every value of ``series`` against ``family``; convert it only if that is lossless."""
    target = _TARGET_DTYPES[family]
    if len(series) == 0:  # no values, nothing to lose: an empty column takes any dtype
        return _CheckedColumn(pd.Series([], index=series.index, dtype=target), [])
    dtype = series.dtype

    # Fast paths for the representations Parquet and pandas produce.
    if isinstance(dtype, np.dtype) and (family, dtype.kind) in {
        ("bool", "b"),
        ("int", "i"),
        ("int", "u"),
        ("float", "f"),
        ("float", "i"),
        ("float", "u"),
    }:
        values = series.to_numpy()
        if family == "bool":
            return _CheckedColumn(series, [])
        if dtype.kind == "f":
            if dtype.itemsize <= 8:  # float16/32 widen exactly; float64 is the target
                bad = np.isinf(values)
                failures = _flagged(series, values, bad, "finite")
                # NaN stays NaN in float64; pandera's not_nullable check reports it.
                return _CheckedColumn(None if failures else series.astype(target), failures)
        else:
            limit = _INT64.max if family == "int" else _FLOAT64_EXACT_INT
            check = "within int64 range" if family == "int" else "exact as float64"
            too_big = values > limit
            if dtype.kind == "i" and family == "float":
                too_big |= values < -limit
            failures = _flagged(series, values, too_big, check)
            return _CheckedColumn(None if failures else series.astype(target), failures)
    if family == "str" and isinstance(dtype, pd.StringDtype):
        has_nulls = bool(series.isna().any())  # reported by pandera's not_nullable check
        return _CheckedColumn(None if has_nulls else series.astype(target), [])

    # Everything else (object, categorical, nullable extension and Arrow dtypes, and numeric
    # dtypes of the wrong kind): value by value.
    generic = getattr(dtype, "kind", None) == "O" or isinstance(dtype, pd.CategoricalDtype)
    found = None if generic else str(dtype)
    values = series.to_numpy(dtype=object)
    failures, has_nulls = [], False
    for label, value in zip(series.index, values, strict=True):
        if _is_missing(value):
            has_nulls = True  # pandera's not_nullable check reports it
            continue
        problem = _element_problem(family, value, found)
        if problem is not None:
            failures.append((label, value, problem))
    if failures or has_nulls:
        return _CheckedColumn(None, failures)
    converted = pd.Series(list(values), index=series.index, dtype=target, name=series.name)
    return _CheckedColumn(converted, [])


def _strict_types(
    df: pd.DataFrame, pandera_schema: Any
) -> tuple[pd.DataFrame, pd.DataFrame, set[str], set[str]]:
    """Check the type of every value in the schema's str/int/float/bool columns, converting none.

    The rule (also in relaypipe/schemas.py's docstring): a value is accepted only if it already
    has the column's type -- a str for str, an int (not a bool) for int, a bool for bool, a
    finite float or an exactly representable int for float. Strings are not parsed, floats are
    not truncated (not even 2.0), nulls are not filled. Values that pass are handed on in the
    column's dtype (int64, float64, bool, str), which changes their container, not their value.

    Returns the frame to validate with pandera (passing columns converted, others untouched),
    the failures as a pandera-style failure-case frame, the columns whose pandera dtype failure
    is already explained (they hold a mistyped value or a null), and the mistyped columns.
    """
    converted: dict[str, pd.Series] = {}
    cases: list[dict[str, Any]] = []
    explained: set[str] = set()
    mistyped: set[str] = set()
    duplicated = set(df.columns[df.columns.duplicated()])  # pandera reports these
    for name, column in pandera_schema.columns.items():
        family = _type_family(column.dtype)
        if family is None or name not in df.columns or name in duplicated:
            continue
        series = df[name]
        checked = _check_column(series, family)
        for label, value, check in checked.failures:
            cases.append(
                {
                    "schema_context": "Column",
                    "column": name,
                    "check": check,
                    "check_number": None,
                    "failure_case": value,
                    "index": label,
                }
            )
        if checked.failures:
            mistyped.add(name)
        if checked.series is None:
            explained.add(name)
        elif checked.series.dtype != series.dtype:
            converted[name] = checked.series
    if converted:
        df = df.assign(**converted)
    return df, pd.DataFrame(cases, columns=_FAILURE_COLUMNS), explained, mistyped


def _without_explained(
    failure_cases: pd.DataFrame, explained: set[str], mistyped: set[str]
) -> pd.DataFrame:
    """Pandera's failures, less those the type pass already reported more precisely.

    In a column the type pass left as it was, pandera's dtype check fails ("dtype('int64')
    failed at object"); in a mistyped column, value checks may also crash on the wrong type
    (a TypeError with no row). Neither says more than the type pass's row-by-row report.
    """
    column = failure_cases["column"].astype(object)
    check = failure_cases["check"].astype(str)
    is_dtype = column.isin(explained) & check.str.startswith("dtype(")
    crashed = column.isin(mistyped) & failure_cases["index"].isna()
    return failure_cases[~(is_dtype | crashed)]


def _in_schema_order(failure_cases: pd.DataFrame, pandera_schema: Any) -> pd.DataFrame:
    """Table-level failures first, then each column's, in the schema's column order (stable)."""
    position = {name: i for i, name in enumerate(pandera_schema.columns, start=1)}
    rank = [
        0 if context == "DataFrameSchema" else position.get(column, len(position) + 1)
        for context, column in zip(
            failure_cases["schema_context"], failure_cases["column"], strict=True
        )
    ]
    return failure_cases.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)


def _violation(
    failure_cases: pd.DataFrame | None,
    *,
    path: Path,
    schema: Schema,
    hint: str,
    detail: str | None = None,
) -> SchemaViolation:
    name = _schema_name(schema)
    lines = []
    if failure_cases is not None and len(failure_cases):
        lines, left_out = _describe_failures(failure_cases)
        header = f"{path}: does not match {name} ({len(failure_cases)} failure case(s)):"
        if left_out:
            lines.append(f"  ... and {left_out} more column/check pair(s)")
    else:
        header = f"{path}: does not match {name}:"
        failure_cases = None
    if detail is not None:
        # A single SchemaError (non-lazy paths inside pandera); its own message is the best
        # description there is.
        lines.append(f"  - {detail}")
    body = "\n".join(lines)
    return SchemaViolation(
        f"{header}\n{body}\nhint: {hint}",
        path=path,
        schema_name=name,
        failure_cases=failure_cases,
    )


def _validate(df: pd.DataFrame, schema: Schema, *, path: Path, hint: str) -> pd.DataFrame:
    """Type pass (``_strict_types``), then pandera without coercion; all failures in one report."""
    pandera_schema = _pandera_schema(schema)
    _refuse_coercion(pandera_schema, _schema_name(schema))
    df, type_cases, explained, mistyped = _strict_types(df, pandera_schema)
    try:
        # lazy=True collects every failure, so one run shows all that is wrong, not the first.
        valid = schema.validate(df, lazy=True)
    except pa_errors.SchemaErrors as exc:
        cases = exc.failure_cases
        if isinstance(cases, pd.DataFrame):
            cases = _without_explained(cases, explained, mistyped)
            frames = [frame for frame in (type_cases, cases) if len(frame)]
            if frames:
                combined = _in_schema_order(pd.concat(frames, ignore_index=True), pandera_schema)
                raise _violation(combined, path=path, schema=schema, hint=hint) from exc
        raise _violation(type_cases, path=path, schema=schema, hint=hint, detail=str(exc)) from exc
    except pa_errors.SchemaError as exc:
        raise _violation(type_cases, path=path, schema=schema, hint=hint, detail=str(exc)) from exc
    if len(type_cases):
        raise _violation(type_cases, path=path, schema=schema, hint=hint)
    return valid


def _write_jsonl(df: pd.DataFrame, path: Path) -> None:
    """One JSON object per row, values as Python's json writes them.

    Not ``DataFrame.to_json``: that rounds floats to 10 significant digits by default (and to
    15 at most), which would change a value on the way to disk; ``json.dumps`` writes the
    shortest text that reads back as the same float.
    """
    names = [str(column) for column in df.columns]
    columns = [df[column].tolist() for column in df.columns]  # numpy scalars -> Python values
    with path.open("w", encoding="utf-8") as fh:
        for row in zip(*columns, strict=True):
            record = {
                name: None if _is_missing(value) else value
                for name, value in zip(names, row, strict=True)
            }
            text = json.dumps(
                record,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
                default=_json_default,
            )
            fh.write(text + "\n")


def _read_jsonl(path: Path, schema: Schema) -> pd.DataFrame:
    """The rows of a .jsonl table, every value as JSON typed it: an object column per key.

    Not ``pd.read_json``: that guesses dtypes per column, so a column of ints with one null
    comes back as floats (5 -> 5.0) and "2024-01-01" may become a date. Here 5 stays the int 5,
    2.7 the float 2.7, "True" the string "True" and null None; the type pass in ``_validate``
    then accepts or reports each value as it is.
    """
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{number}: expected one JSON object per line, got "
                    f"{type(record).__name__}: {_short(record)}"
                )
            records.append(record)
    if not records:
        # An empty table is written as a blank .jsonl file, which carries no column names.
        empty = {column: pd.Series([], dtype=object) for column in _schema_columns(schema)}
        return pd.DataFrame(empty)
    # A key missing from some rows leaves NaN there, which not_nullable reports.
    return pd.DataFrame(records, dtype=object)


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], schema: Schema) -> None:
    """Validate ``df`` against ``schema``, then write it to ``path`` (Parquet or .jsonl) atomically.

    Validation comes first, so a violating frame writes nothing and leaves any existing file
    untouched. No value is converted to fit (see the module docstring); what is written is the
    validated frame, its columns in the schema's dtypes (int64, float64, bool, str), with a
    fresh 0..n-1 index: the row index is not part of any contract, and dropping it keeps
    readers' row numbers equal to positions in the file.
    """
    p = Path(path)
    fmt = _table_format(p)
    hint = (
        "nothing was written. The frame this stage built breaks the contract in "
        "relaypipe/schemas.py: fix the stage (or, if the contract itself changed, the schema "
        "and every stage that reads it)."
    )
    valid = _validate(df, schema, path=p, hint=hint).reset_index(drop=True)
    with atomic_path(p) as tmp:
        if fmt == "parquet":
            valid.to_parquet(tmp, index=False)
        else:
            _write_jsonl(valid, tmp)


def read_table(path: str | os.PathLike[str], schema: Schema) -> pd.DataFrame:
    """Read a Parquet or .jsonl table and return it validated by ``schema``.

    Values are never converted to fit (a file whose ``correct`` column holds the string "True",
    or whose token counts are floats, is refused with the rows named); columns come back in the
    schema's dtypes. Raises SchemaViolation for a table that breaks the schema.
    """
    p = Path(path)
    fmt = _table_format(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: table not found")
    df = pd.read_parquet(p) if fmt == "parquet" else _read_jsonl(p, schema)
    hint = (
        "the file does not match what the reader expects: re-run the stage that produces it "
        "(dvc repro) if it predates a schema change, otherwise fix that stage's output."
    )
    return _validate(df, schema, path=p, hint=hint)


# ---------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------


class ParamsError(InputError):
    """params.yaml (or another YAML config) lacks a section or has the wrong shape."""


def load_yaml_section(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """Return one top-level mapping of a YAML file (e.g. the ``train`` section of params.yaml).

    Raises FileNotFoundError when the file is missing and ParamsError when the file is not a
    mapping or the section is missing or not a mapping; each message names file and section.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: YAML file not found (wanted section {section!r})")
    with p.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, Mapping):
        raise ParamsError(
            f"{p}: expected a mapping of sections at the top level, got "
            f"{type(data).__name__} (wanted section {section!r})"
        )
    if section not in data:
        have = ", ".join(sorted(map(str, data))) or "none"
        raise ParamsError(f"{p}: no section {section!r} (sections present: {have})")
    value = data[section]
    if not isinstance(value, Mapping):
        raise ParamsError(
            f"{p}: section {section!r} must be a mapping of parameters, got "
            f"{type(value).__name__}: {_short(value)}"
        )
    return dict(value)
