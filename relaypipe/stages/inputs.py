"""Every stage reads and checks all of its inputs before any expensive work or any write.

A stage's inputs are the tables, model folders and JSON files that earlier stages wrote (or a
param points at). Each check here fails with a :class:`StageInputError` whose message names the
file, the param that points at it and the stage (or param) that produces it, e.g.

    data/filter/kept.parquet (grpo.problems) has 0 rows: the filter stage kept no problem ...

so that a broken, missing or empty input stops the stage before it loads a model, trains, or
touches any of its previous outputs. Schema violations stay :class:`relaypipe.io.SchemaViolation`
(their message gains the same provenance line); a missing file is also a FileNotFoundError.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from relaypipe.errors import InputError
from relaypipe.io import SchemaViolation, read_json, read_table

__all__ = [
    "MissingInputError",
    "StageInputError",
    "check_json",
    "check_model_dir",
    "check_table",
    "looks_local",
]

# Files a saved model's weights live in (transformers' names), and those of its tokenizer.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER = ("tokenizer_config.json", "tokenizer.json")
_REMOTE_RECORD = "remote_teacher.json"  # relaypipe.teacher.REMOTE_TEACHER_RECORD


class StageInputError(InputError):
    """An input of a stage is missing, empty or broken; the message says which file, which
    param points at it and which stage (or param) makes it. An InputError (a ValueError):
    command lines report it in a few lines, without a traceback (relaypipe/errors.py)."""


class MissingInputError(StageInputError, FileNotFoundError):
    """An input file or folder does not exist."""


def _where(path: Path, param: str) -> str:
    return f"{path} ({param})"


def _rerun(made_by: str, subject: str = "it") -> str:
    return f"{subject} is written by {made_by}: run (or re-run) that stage first, e.g. `dvc repro`"


def check_table(
    path: str | os.PathLike[str],
    schema: Any,
    *,
    param: str,
    made_by: str,
    empty: str,
) -> pd.DataFrame:
    """Read ``path`` through ``schema`` and refuse it when missing, unreadable or empty.

    ``param``: the param naming the file (``grpo.problems``); ``made_by``: its producer
    ("the filter stage"); ``empty``: why a 0-row table happens and what to change.
    """
    p = Path(path)
    where = _where(p, param)
    if not p.is_file():
        what = "is a folder, not a table" if p.is_dir() else "not found"
        raise MissingInputError(f"{where}: {what}; {_rerun(made_by)}")
    try:
        df = read_table(p, schema)
    except SchemaViolation as exc:
        # keep the type (and its path/failure_cases) for callers; add the provenance
        note = _rerun(made_by, f"this table ({param})")
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])
        raise
    except (OSError, ValueError) as exc:  # a truncated or foreign file (pyarrow, JSON)
        raise StageInputError(
            f"{where}: cannot be read as a table ({type(exc).__name__}: {exc}); {_rerun(made_by)}"
        ) from exc
    if df.empty:
        raise StageInputError(f"{where} has 0 rows: {empty}")
    return df


def looks_local(source: str) -> bool:
    """Whether a model source can only be a local path (as relaypipe.models.load_model decides:
    anything else that does not exist is a hub id, fetched or read from the hub cache)."""
    return source.startswith((".", "/")) or source.count("/") > 1 or source.endswith(".gguf")


def check_model_dir(
    path: str | os.PathLike[str],
    *,
    param: str,
    made_by: str,
    weights: bool = True,
    tokenizer: bool = True,
    served: str = "set teacher.server (url and model) in this stage's params",
    fix: str | None = None,
) -> None:
    """Check a saved model folder: it exists, its ``config.json`` parses, its weights are whole
    (a safetensors file as long as its header says), and it holds a tokenizer.

    ``weights=False`` for a folder read only for its tokenizer (a served teacher's); ``served``:
    what to do when the folder stands for a served teacher but weights are needed; ``fix``:
    what to do instead of re-running ``made_by`` (for a model no stage makes). A source
    that is not a local path (a hub id) is left to the loader; a ``.gguf`` file must exist.
    """
    source = os.fspath(path)
    p = Path(source)
    where = _where(p, param)
    then = fix or _rerun(made_by)
    if not p.exists():
        if not looks_local(source):
            return  # a hub id: nothing local to check
        raise MissingInputError(f"{where}: model not found; {then}")
    if p.is_file() and p.suffix == ".gguf":
        return
    if not p.is_dir():
        raise StageInputError(f"{where}: not a model folder; {then}")
    problems: list[str] = []
    if weights:
        if (p / _REMOTE_RECORD).is_file() and not any((p / w).is_file() for w in _WEIGHTS):
            record = _json_or_none(p / _REMOTE_RECORD)
            record = record if isinstance(record, dict) else {}
            raise StageInputError(
                f"{where} stands for a served teacher ({record.get('model')} at "
                f"{record.get('url')}) and holds no weights: {served}"
            )
        problems += _json_problems(p, ["config.json"], required=True)
        problems += _weight_problems(p)
    if tokenizer:
        present = [name for name in _TOKENIZER if (p / name).is_file()]
        if not present:
            problems.append(f"no tokenizer ({' or '.join(_TOKENIZER)})")
        problems += _json_problems(p, present, required=False)
    if problems:
        raise StageInputError(f"{where}: not a complete saved model: {'; '.join(problems)}; {then}")


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _json_problems(folder: Path, names: Iterable[str], *, required: bool) -> list[str]:
    out = []
    for name in names:
        f = folder / name
        if not f.is_file():
            if required:
                out.append(f"no {name}")
            continue
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            out.append(f"{name} is not valid JSON ({exc})")
    return out


def _weight_problems(folder: Path) -> list[str]:
    present = [name for name in _WEIGHTS if (folder / name).is_file()]
    if not present:
        return [f"no weights ({', '.join(_WEIGHTS)})"]
    if "model.safetensors" in present:
        return _safetensors_problems(folder / "model.safetensors")
    if "model.safetensors.index.json" in present:
        index = _json_or_none(folder / "model.safetensors.index.json")
        if not isinstance(index, Mapping) or not isinstance(index.get("weight_map"), Mapping):
            return ["model.safetensors.index.json is not a valid shard index"]
        out = []
        for shard in sorted(set(map(str, index["weight_map"].values()))):
            out += _safetensors_problems(folder / shard)
        return out
    return []  # pytorch_model.bin: left to torch.load


def _safetensors_problems(path: Path) -> list[str]:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the
    header's offsets describe: a file cut short (an interrupted copy) is shorter than that."""
    if not path.is_file():
        return [f"no {path.name}"]
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file's {size} bytes")
            header = json.loads(fh.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as exc:
        return [f"{path.name} is not a valid safetensors file ({exc})"]
    if size < 8 + n + end:
        return [f"{path.name} is truncated ({size} bytes, its header describes {8 + n + end})"]
    return []


def check_json(
    path: str | os.PathLike[str],
    *,
    param: str,
    made_by: str,
    numbers: Iterable[str] = (),
    keys: Iterable[str] = (),
) -> dict[str, Any]:
    """Read a JSON object; refuse it when missing, not valid JSON, not an object, or lacking
    one of ``keys`` or a number (not a bool) under each of ``numbers``."""
    p = Path(path)
    where = _where(p, param)
    if not p.is_file():
        raise MissingInputError(f"{where}: not found; {_rerun(made_by)}")
    try:
        data = read_json(p)
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise StageInputError(f"{where}: cannot be read ({exc}); {_rerun(made_by)}") from exc
    if not isinstance(data, dict):
        raise StageInputError(
            f"{where}: expected a JSON object, got {type(data).__name__}; {_rerun(made_by)}"
        )
    numbers = list(numbers)
    missing = [k for k in (*keys, *numbers) if k not in data]
    bad = [
        k
        for k in numbers
        if k in data and (isinstance(data[k], bool) or not isinstance(data[k], int | float))
    ]
    if missing or bad:
        what = [f"no key {k!r}" for k in missing] + [
            f"{k!r} is {data[k]!r}, not a number" for k in bad
        ]
        raise StageInputError(f"{where}: {'; '.join(what)}; {_rerun(made_by)}")
    return data
