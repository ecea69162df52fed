"""Reading and writing stage artifacts: atomically, and checked against the stage contracts.

Every DVC stage writes its outputs through this module so that:

* an interrupted or failing stage never leaves a half-written file or model directory where the
  next stage (or DVC's cache) would pick it up: writes go to a hidden sibling and are renamed
  into place only when complete;
* a table that breaks its schema (``relaypipe.schemas``) is refused *before* anything touches
  the disk, and a table that a reader finds broken is reported with the file, the column, the
  check and the offending rows, instead of a KeyError three stages later.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.errors as pa_errors
import yaml

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


class SchemaViolation(ValueError):
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


def _schema_columns(schema: Schema) -> list[str]:
    pandera_schema = schema.to_schema() if isinstance(schema, type) else schema
    return list(pandera_schema.columns)


def _table_format(path: Path) -> str:
    try:
        return _TABLE_FORMATS[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(_TABLE_FORMATS))
        raise ValueError(f"{path}: unknown table format {path.suffix!r} (use {known})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _describe_failures(failure_cases: pd.DataFrame) -> tuple[list[str], int]:
    """One line per (column, check) pair, with the offending rows; and how many were left out."""
    groups: dict[tuple[str, str, str], list[tuple[Any, Any]]] = {}
    for row in failure_cases.itertuples(index=False):
        key = (str(row.schema_context), str(row.column), str(row.check))
        groups.setdefault(key, []).append((row.index, row.failure_case))

    lines = []
    for (context, column, check), cases in list(groups.items())[:_MAX_FAILURE_GROUPS]:
        if context == "DataFrameSchema":
            # Table-level failures (a missing or unexpected column): the "failure case" is the
            # column name, and there are no rows to point at.
            names = ", ".join(_short(value) for _, value in cases)
            lines.append(f"  - table: {check} failed for column(s) {names}")
            continue
        shown = [
            f"row {index}: {_short(value)}" if not _is_missing(index) else _short(value)
            for index, value in cases[:_MAX_ROWS_PER_GROUP]
        ]
        more = len(cases) - len(shown)
        suffix = f" (+{more} more)" if more else ""
        lines.append(f"  - column {column!r}: {check} failed at {'; '.join(shown)}{suffix}")
    return lines, max(0, len(groups) - _MAX_FAILURE_GROUPS)


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # pd.isna of a list-like is not a single bool
        return False


def _violation(exc: Exception, *, path: Path, schema: Schema, hint: str) -> SchemaViolation:
    name = _schema_name(schema)
    failure_cases = getattr(exc, "failure_cases", None)
    if isinstance(exc, pa_errors.SchemaErrors) and isinstance(failure_cases, pd.DataFrame):
        lines, left_out = _describe_failures(failure_cases)
        header = f"{path}: does not match {name} ({len(failure_cases)} failure case(s)):"
        if left_out:
            lines.append(f"  ... and {left_out} more column/check pair(s)")
        body = "\n".join(lines)
    else:
        # A single SchemaError (non-lazy paths inside pandera); its own message is the best
        # description there is.
        header = f"{path}: does not match {name}:"
        body = f"  - {exc}"
        failure_cases = failure_cases if isinstance(failure_cases, pd.DataFrame) else None
    return SchemaViolation(
        f"{header}\n{body}\nhint: {hint}",
        path=path,
        schema_name=name,
        failure_cases=failure_cases,
    )


def _validate(df: pd.DataFrame, schema: Schema, *, path: Path, hint: str) -> pd.DataFrame:
    try:
        # lazy=True collects every failure, so one run shows all that is wrong, not the first.
        return schema.validate(df, lazy=True)
    except (pa_errors.SchemaErrors, pa_errors.SchemaError) as exc:
        raise _violation(exc, path=path, schema=schema, hint=hint) from exc


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], schema: Schema) -> None:
    """Validate ``df`` against ``schema``, then write it to ``path`` (Parquet or .jsonl) atomically.

    Validation comes first, so a violating frame writes nothing and leaves any existing file
    untouched. What is written is the validated frame (coerced dtypes) with a fresh 0..n-1
    index: the row index is not part of any contract, and dropping it keeps readers' row
    numbers equal to positions in the file.
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
            valid.to_json(tmp, orient="records", lines=True, force_ascii=False)


def read_table(path: str | os.PathLike[str], schema: Schema) -> pd.DataFrame:
    """Read a Parquet or .jsonl table and return it validated (and coerced) by ``schema``."""
    p = Path(path)
    fmt = _table_format(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: table not found")
    if fmt == "parquet":
        df = pd.read_parquet(p)
    else:
        # dtype=False / convert_dates=False: keep "00042" a string and "2024-01-01" text;
        # the schema, not pandas' guessing, decides the types.
        df = pd.read_json(p, orient="records", lines=True, dtype=False, convert_dates=False)
        if df.empty and len(df.columns) == 0:
            # An empty table is written as a blank .jsonl file, which carries no column names.
            df = pd.DataFrame({column: [] for column in _schema_columns(schema)})
    hint = (
        "the file does not match what the reader expects: re-run the stage that produces it "
        "(dvc repro) if it predates a schema change, otherwise fix that stage's output."
    )
    return _validate(df, schema, path=p, hint=hint)


# ---------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------


class ParamsError(ValueError):
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
