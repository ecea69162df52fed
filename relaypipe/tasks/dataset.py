"""Question/answer datasets (GSM8K, MATH, or any table of your own) as ``Problem`` records.

Rows are read through HuggingFace ``datasets`` from a local file, an fsspec URL (``s3://``...)
or a hub dataset id. Reference answers go through the shared grader's ``extract_answer``, so a
GSM8K cell ending in ``#### 72`` or a MATH solution with ``\\boxed{72}`` yields the answer
``72`` that the grader will later compare against.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import datasets
from huggingface_hub.errors import HfHubHTTPError

from relaypipe.tasks.base import ANSWER_PREFIX, Problem
from relaypipe.tasks.grading import extract_answer, normalize_answer

__all__ = ["DatasetSpec", "DatasetUnavailableError", "load_problems"]

logger = logging.getLogger(__name__)

# File extension -> the `datasets` packaged builder that reads it.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# `datasets` decompresses these transparently, so "test.jsonl.gz" is still a JSONL file.
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# GSM8K's final line ("#### 72"); the grader reads the same marker.
_GSM8K_LINE_RE = re.compile(r"####[ \t]*[^\n]*")


class DatasetUnavailableError(RuntimeError):
    """A hub dataset could not be fetched (offline, unreachable, or not found)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a question/answer table lives and which of its columns mean what."""

    # A local .jsonl/.json/.parquet/.csv file (optionally .gz etc.), an fsspec URL to one
    # ("s3://bucket/gsm8k/test.jsonl"), or a hub dataset id ("openai/gsm8k").
    source: str
    # Hub split to load. Files are a single table, so it is ignored for them.
    split: str = "test"
    # Hub config name ("main" for openai/gsm8k); ignored for files.
    config: str | None = None
    # Column holding the question text.
    question_column: str = "question"
    # Column holding the final answer, or a worked solution that ends in one
    # ("#### 72", "\boxed{72}" or "Answer: 72").
    answer_column: str = "answer"
    # Optional column holding a worked solution (MATH's "solution"); it wins over a worked
    # solution found in the answer column.
    solution_column: str | None = None
    # Optional column with stable row ids; row positions are used when unset.
    id_column: str | None = None
    # Task name for Problem.task and problem ids; derived from the source when unset.
    name: str | None = None
    # Keep only the first `limit` rows (after loading, before any conversion).
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(
                "DatasetSpec.source is empty: give a .jsonl/.json/.parquet/.csv path, an "
                "s3:// URL to such a file, or a hub dataset id like 'openai/gsm8k'"
            )
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit <= 0):
            raise ValueError(
                f"DatasetSpec.limit must be a positive row count, got {self.limit!r}; "
                "leave it unset (None) to load every row"
            )
        for field_name in ("question_column", "answer_column"):
            if not getattr(self, field_name):
                raise ValueError(
                    f"DatasetSpec.{field_name} is empty: name the column of {self.source} "
                    "that holds it"
                )
        if self.name is not None and not self.name.strip():
            raise ValueError(
                "DatasetSpec.name is empty: give a short task name or leave it unset (None)"
            )

    @property
    def task_name(self) -> str:
        """The name used in Problem.task and as the problem-id prefix."""
        if self.name:
            return self.name
        if _file_builder(self.source) is not None:
            stem = _strip_suffixes(os.path.basename(urlparse(self.source).path or self.source))
        else:
            stem = self.source.rstrip("/").rsplit("/", 1)[-1]
            if self.config and self.config not in {"main", "default"}:
                stem = f"{stem}-{self.config}"
        return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "dataset"


def _strip_suffixes(filename: str) -> str:
    lowered = filename.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lowered.endswith(suffix):
            filename, lowered = filename[: -len(suffix)], lowered[: -len(suffix)]
            break
    root, ext = os.path.splitext(filename)
    return root if ext.lower() in _FILE_BUILDERS else filename


def _file_builder(source: str) -> str | None:
    """The `datasets` builder for a file source, or None when the source is a hub id."""
    path = urlparse(source).path if _is_url(source) else source
    lowered = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
            break
    return _FILE_BUILDERS.get(os.path.splitext(lowered)[1])


def _is_url(source: str) -> bool:
    # "C:\data.jsonl" parses with scheme "c"; real fsspec protocols are longer.
    return len(urlparse(source).scheme) > 1


def load_problems(spec: DatasetSpec) -> list[Problem]:
    """Load the rows of `spec` as Problems, failing with a message that names the bad row."""
    table = _load_table(spec)
    where = spec.source if _file_builder(spec.source) else f"{spec.source} (split {spec.split})"
    required = [spec.question_column, spec.answer_column, spec.solution_column, spec.id_column]
    for column in filter(None, required):
        if column not in table.column_names:
            raise ValueError(
                f"{where} has no column {column!r}; its columns are {table.column_names}. "
                "Set question_column/answer_column/solution_column/id_column in the "
                "DatasetSpec to the right names"
            )
    if spec.limit is not None and spec.limit < len(table):
        table = table.select(range(spec.limit))

    name = spec.task_name
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    for index, row in enumerate(table):
        problem = _to_problem(spec, name, where, index, row)
        if problem.problem_id in seen_ids:
            raise ValueError(
                f"{where}: rows {seen_ids[problem.problem_id]} and {index} share the id "
                f"{problem.problem_id!r}; id_column {spec.id_column!r} must be unique"
            )
        seen_ids[problem.problem_id] = index
        problems.append(problem)
    logger.info("loaded %d problems from %s as task %r", len(problems), where, name)
    return problems


def _load_table(spec: DatasetSpec) -> datasets.Dataset:
    builder = _file_builder(spec.source)
    if builder is not None:
        if spec.config is not None:
            logger.warning("DatasetSpec.config=%r ignored for file %s", spec.config, spec.source)
        if not _is_url(spec.source) and not os.path.isfile(spec.source):
            raise FileNotFoundError(f"dataset file not found: {spec.source}")
        # A single file is always exposed by `datasets` as the split "train".
        return datasets.load_dataset(builder, data_files=spec.source, split="train")
    if not _is_url(spec.source) and os.path.isfile(spec.source):
        raise ValueError(
            f"{spec.source}: unsupported file type; use one of {sorted(_FILE_BUILDERS)} "
            "(optionally compressed with .gz/.bz2/.xz/.zst)"
        )
    try:
        return datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except (ConnectionError, TimeoutError, HfHubHTTPError, FileNotFoundError) as exc:
        if datasets.config.HF_HUB_OFFLINE:
            reason = (
                "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the "
                "local cache. Unset those variables on a machine that can reach the hub, or point "
                "DatasetSpec.source at a local .jsonl/.parquet copy"
            )
        else:
            reason = (
                "the hub is unreachable or has no such dataset/config. Point DatasetSpec.source "
                "at a local .jsonl/.parquet copy, or set HF_DATASETS_OFFLINE=1 to fail fast "
                "without network"
            )
        raise DatasetUnavailableError(
            f"could not load hub dataset {spec.source!r} (config {spec.config!r}, split "
            f"{spec.split!r}): {reason}. Cause: {exc}"
        ) from exc


def _cell_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "ndarray":
        # A list cell (OlympiadBench's final_answer: ["$\\frac{1}{2}$"]): its items joined,
        # not Python's repr of the list, which no grader would ever match.
        items = [t for t in (_cell_text(v) for v in value) if t]
        return ", ".join(items) or None
    text = value if isinstance(value, str) else str(value)
    return text.strip() or None


def _to_problem(spec: DatasetSpec, name: str, where: str, index: int, row: dict) -> Problem:
    def required(column: str) -> str:
        text = _cell_text(row[column])
        if text is None:
            raise ValueError(f"{where}: row {index} has an empty {column!r}; fix or drop that row")
        return text

    question = required(spec.question_column)
    answer_cell = required(spec.answer_column)
    answer = extract_answer(answer_cell)
    if answer is None:
        answer, solution = normalize_answer(answer_cell), ""
    else:
        solution = _as_solution(answer_cell, answer)
    if not answer:
        raise ValueError(f"{where}: row {index} has an empty {spec.answer_column!r}")

    if spec.solution_column is not None:
        solution_cell = _cell_text(row[spec.solution_column])
        if solution_cell is not None:
            solution = _as_solution(solution_cell, answer)

    if spec.id_column is None:
        problem_id = f"{name}-{index:06d}"
    else:
        raw_id = row[spec.id_column]
        if _cell_text(raw_id) is None:
            raise ValueError(f"{where}: row {index} has an empty id column {spec.id_column!r}")
        is_int = isinstance(raw_id, int) and not isinstance(raw_id, bool)
        problem_id = f"{name}-{raw_id:06d}" if is_int else f"{name}-{str(raw_id).strip()}"

    return Problem(
        problem_id=problem_id,
        task=name,
        difficulty=0,
        question=question,
        answer=answer,
        solution=solution,
    )


def _as_solution(text: str, answer: str) -> str:
    """A worked solution rewritten to end in our answer line ("" if it is only that line)."""
    answer_line = f"{ANSWER_PREFIX}{answer}"
    gsm8k_marks = list(_GSM8K_LINE_RE.finditer(text))
    if gsm8k_marks:
        last = gsm8k_marks[-1]
        body = text[: last.start()].rstrip()
    else:
        body = text.rstrip()
        lines = body.splitlines()
        if lines and lines[-1].strip().startswith(ANSWER_PREFIX.strip()):
            body = "\n".join(lines[:-1]).rstrip()
    return f"{body}\n{answer_line}" if body else ""
