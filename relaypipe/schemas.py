"""The contracts between pipeline stages: one pandera model per kind of table.

A stage writes a table with ``relaypipe.io.write_table(df, path, SomeSchema)`` and the next one
reads it with ``read_table(path, SomeSchema)``; both validate, so a producer cannot hand on a
broken table and a consumer cannot silently read a stale one.

To add a contract, subclass the closest existing model (fields and checks are inherited), e.g.
a filtered problem table is ``class FilteredProblemSchema(ProblemSchema)`` plus one column, and
list it in ``SCHEMAS``. Models set ``strict = True`` (no unexpected columns: a renamed column
fails loudly instead of being dropped), ``unique_column_names = True``, and ``coerce = False``.

Strict types: a value is never converted to fit its column
------------------------------------------------------------
Coercion once turned a null into False, the strings "True" and "False" into True, 2.7 teacher
tokens into 2 and difficulty 1.5 into 1, and the stage then overwrote its outputs with them. So
``read_table``/``write_table`` (relaypipe/io.py) accept a value only if it already has its
column's type, and report each one that has not by file, column, row and value:

* ``Series[str]``: a str. Numbers, bools and bytes are not turned into text.
* ``Series[int]``: an int, within int64. Not a bool, not a string ("3"), and not a float, even
  one without a fractional part (2.0): a float in a count means the producer computed it as
  one, and whether 2.7 would have been truncated or rounded is exactly what must not be guessed.
* ``Series[float]``: a finite float, or an int that float64 holds exactly (1 is the float 1.0,
  as in Python). Not a bool, not a string, and not +-inf.
* ``Series[bool]``: a bool. Not 0/1, not "True"/"False"/"yes".
* No column is nullable (pandera's default): None, NaN, pd.NA in any column is reported (by
  pandera's ``not_nullable`` check), never filled. A column meant to hold nulls must say so
  with ``pa.Field(nullable=True)`` and a comment on what a null means.

What may change is only the representation of values that pass: an int32, uint8, object or
nullable ``Int64`` column of ints is handed on as int64, a float32 column as float64, an object
column of bools as bool, object or categorical text as pandas' str dtype, and an empty column of
any dtype (an empty JSONL file carries none) as the column's dtype. Nothing else is converted,
and relaypipe.io refuses a schema that sets ``coerce``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Final

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from relaypipe.tasks.base import Problem

__all__ = [
    "EVAL_MODES",
    "ORACLE_MODE",
    "PROBLEM_COLUMNS",
    "REQUEST_MODES",
    "SCHEMAS",
    "SPLITS",
    "EvalRequestSchema",
    "FilteredProblemSchema",
    "ProblemSchema",
    "SFTExampleSchema",
    "frame_to_problems",
    "problems_to_frame",
]

# train: warm-up / RL data; eval: held out for model selection during training;
# benchmark: the final reported numbers, never looked at before the end.
SPLITS: Final[tuple[str, ...]] = ("train", "eval", "benchmark", "calibration")

# The Problem dataclass's fields, in declaration order (problem tables start with these).
PROBLEM_COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in fields(Problem))


class ProblemSchema(pa.DataFrameModel):
    """Problems of one split: one row per ``relaypipe.tasks.base.Problem``, plus its split.

    Written by the data-preparation stage; read by warm-up data building, teacher filtering
    and evaluation.
    """

    # Unique within the table: later tables (rollouts, eval requests) join back on it.
    problem_id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    # The task that generated the problem ("arith", "gsm8k", ...); selects the grader.
    task: Series[str] = pa.Field(str_length={"min_value": 1})
    # Task-specific difficulty knob; 0 when the source has none.
    difficulty: Series[int] = pa.Field(ge=0)
    # The question text shown in the prompt; blank questions are checked by `_not_blank`.
    question: Series[str]
    # The canonical final answer as text; graders compare against it, so it cannot be blank.
    answer: Series[str]
    # A worked solution ending in "Answer: <answer>"; "" when the source has none.
    solution: Series[str]
    # Which split the row belongs to; one of SPLITS.
    split: Series[str] = pa.Field(isin=list(SPLITS))

    @pa.check("question", "answer", name="not_blank")
    @classmethod
    def _not_blank(cls, series: Series[str]) -> Series[bool]:
        # str_length(min_value=1) would accept "  "; a whitespace-only question or answer is
        # as useless as an empty one.
        return series.str.strip().str.len() > 0

    class Config:
        strict = True
        unique_column_names = True
        coerce = False  # never convert a value to fit (module docstring)


class FilteredProblemSchema(ProblemSchema):
    """Training problems inside the teacher's competence (stage ``filter``): the teacher solved
    each at least once in k samples. Read by ``grpo``."""

    # Share of the teacher's k samples that were right; > 0 by construction of the filter.
    teacher_pass_rate: Series[float] = pa.Field(gt=0.0, le=1.0)


class SFTExampleSchema(pa.DataFrameModel):
    """Warm-up examples (stage ``warmup_data``): the student's own right answer, commands inserted.
    Read by ``sft``."""

    problem_id: Series[str] = pa.Field(str_length={"min_value": 1})
    # The exact prompt text (relaypipe.tasks.base.format_prompt), as every stage shows it.
    prompt: Series[str] = pa.Field(str_length={"min_value": 1})
    # The completion with its <call>n</call> commands; what the SFT loss is computed on (policy
    # mistakes: except the n tokens after each command, which the teacher wrote).
    completion: Series[str] = pa.Field(str_length={"min_value": 1})
    # How many commands were inserted (0..max_commands).
    n_commands: Series[int] = pa.Field(ge=0)
    # Which insertion policy produced the row (relaypipe.train.warmup.POLICIES).
    policy: Series[str] = pa.Field(isin=["random", "disagreement", "uncertainty", "mistakes"])

    class Config:
        strict = True
        unique_column_names = True
        coerce = False  # never convert a value to fit (module docstring)


def problems_to_frame(problems: list[Problem], split: str) -> pd.DataFrame:
    """A ProblemSchema-shaped frame (not yet validated: ``write_table`` does that) for one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    columns = [*PROBLEM_COLUMNS, "split"]
    rows = [{**problem.to_row(), "split": split} for problem in problems]
    # columns= keeps the column set (and order) even for an empty list.
    return pd.DataFrame(rows, columns=columns)


def frame_to_problems(df: pd.DataFrame) -> list[Problem]:
    """The Problems in a problem table, in row order.

    Columns beyond the Problem fields (``split``, or those a subclass schema adds) are ignored,
    so this works on any table derived from ProblemSchema.
    """
    missing = [column for column in PROBLEM_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"not a problem table: missing column(s) {', '.join(missing)}")
    problems = []
    for record in df[list(PROBLEM_COLUMNS)].to_dict(orient="records"):
        # Parquet hands back numpy integers; Problem promises a plain int (it is hashed,
        # JSON-dumped and compared by other stages).
        record["difficulty"] = int(record["difficulty"])
        problems.append(Problem(**record))
    return problems


# Evaluation modes (stage ``evaluate``): which student, and how the decoder may use the teacher.
EVAL_MODES: Final[tuple[str, ...]] = (
    "student",  # the bootstrap student alone
    "warmup",  # the warmed-up student, calls blocked
    "relay",  # the GRPO student, calls answered by the teacher
    "teacher_free",  # the GRPO student, calls blocked (the paper's teacher-free mode)
    "teacher",  # the teacher alone
    "random_router",  # the bootstrap student, each token the teacher's with probability router_p
    "relay_sweep",  # the relay mode at each call_bias of evaluate.call_bias_sweep (Pareto curve)
)
# The oracle caller (relaypipe/evaluate/oracle.py): the bootstrap student with the teacher judging
# every step, at each threshold of evaluate.oracle_sweep. A reference, not a decoder mode: it is
# turned on by its sweep, never named in evaluate.modes.
ORACLE_MODE: Final[str] = "oracle"
# Every mode a request row may have.
REQUEST_MODES: Final[tuple[str, ...]] = (*EVAL_MODES, ORACLE_MODE)


class EvalRequestSchema(pa.DataFrameModel):
    """One evaluated request (stage ``evaluate``): a problem of a benchmark decoded in one mode.

    Read by ``report``, which turns the counts into call ratio, FLOPs, money and latency
    (relaypipe/evaluate/cost.py).
    """

    # The benchmark table's name (data/problems/benchmarks/<benchmark>.parquet).
    benchmark: Series[str] = pa.Field(str_length={"min_value": 1})
    mode: Series[str] = pa.Field(isin=list(REQUEST_MODES))
    # random_router: the probability that a token is the teacher's; -1 for every other mode
    # (-1 rather than NaN: parquet and pandas keep it, and equality joins work).
    router_p: Series[float] = pa.Field(ge=-1.0, le=1.0)
    # The logit bias on the student's <call> in effect (RelayConfig.call_bias): relay_sweep its
    # sweep value, relay the applied one (evaluate.call_bias or the calibrated bias; +-inf is
    # recorded as +-1e6: floats here are finite, and a bias that large is as decisive), 0 for
    # every other mode (no bias acts there). Optional: tables written before the column
    # existed have none (their relay's bias is in models.json decoding.call_bias).
    call_bias: Series[float] | None
    # oracle: its threshold tau in [0, 1] (a step goes to the teacher where it would write
    # another token and gives the student's a probability below tau); -1 for every other mode.
    # Optional: tables written before the oracle existed have none (and no oracle rows).
    oracle_tau: Series[float] | None = pa.Field(ge=-1.0, le=1.0)
    problem_id: Series[str] = pa.Field(str_length={"min_value": 1})
    correct: Series[bool]
    # Generated tokens by source; student_tokens includes its commands (command_tokens).
    student_tokens: Series[int] = pa.Field(ge=0)
    teacher_tokens: Series[int] = pa.Field(ge=0)
    command_tokens: Series[int] = pa.Field(ge=0)
    calls: Series[int] = pa.Field(ge=0)  # hand-offs that ran
    # Context tokens the teacher processed over all its calls with its prefix (KV) cache...
    teacher_prefill_tokens: Series[int] = pa.Field(ge=0)
    # ...and the full teacher-view context at each call, summed: what an uncached teacher reads.
    teacher_context_tokens: Series[int] = pa.Field(ge=0)
    student_prefill_tokens: Series[int] = pa.Field(ge=0)
    # Wall time from the start of the request's batch until it finished.
    latency_s: Series[float] = pa.Field(ge=0.0)

    # Cross-column rules. Each returns one bool for the whole table: relaypipe.io reports a
    # table-level check as one line, whereas a per-row result would list every cell of every
    # failing row as if it were a column name.
    @pa.dataframe_check(name="router_p in [0, 1] for random_router rows, -1 for all others")
    @classmethod
    def _router_p(cls, df: pd.DataFrame) -> bool:
        router = df["mode"] == "random_router"
        ok = (router & df["router_p"].between(0.0, 1.0)) | (~router & (df["router_p"] == -1.0))
        return bool(ok.all())

    @pa.dataframe_check(name="call_bias finite for relay_sweep rows (the column is needed then)")
    @classmethod
    def _sweep_bias(cls, df: pd.DataFrame) -> bool:
        sweep = df["mode"] == "relay_sweep"
        if "call_bias" not in df.columns:
            return not bool(sweep.any())
        bias = pd.to_numeric(df.loc[sweep, "call_bias"], errors="coerce").to_numpy(dtype=float)
        return bool(np.isfinite(bias).all())

    @pa.dataframe_check(name="oracle_tau in [0, 1] for oracle rows, -1 for all others")
    @classmethod
    def _oracle_tau(cls, df: pd.DataFrame) -> bool:
        oracle = df["mode"] == ORACLE_MODE
        if "oracle_tau" not in df.columns:
            return not bool(oracle.any())
        tau = pd.to_numeric(df["oracle_tau"], errors="coerce")
        ok = (oracle & tau.between(0.0, 1.0)) | (~oracle & (tau == -1.0))
        return bool(ok.all())

    @pa.dataframe_check(name="command_tokens <= student_tokens")
    @classmethod
    def _commands(cls, df: pd.DataFrame) -> bool:
        return bool((df["command_tokens"] <= df["student_tokens"]).all())

    @pa.dataframe_check(name="teacher_prefill_tokens <= teacher_context_tokens")
    @classmethod
    def _prefill(cls, df: pd.DataFrame) -> bool:
        # A cache can only save work: the cached prefill never exceeds the full contexts.
        return bool((df["teacher_prefill_tokens"] <= df["teacher_context_tokens"]).all())

    class Config:
        strict = True
        unique_column_names = True
        coerce = False  # never convert a value to fit (module docstring)
        # One row per problem per run; a duplicate would be counted twice in every average.
        # (call_bias tells the relay_sweep runs apart, oracle_tau the oracle's; a table without
        # them is keyed without them.)
        unique = ("benchmark", "mode", "router_p", "call_bias", "oracle_tau", "problem_id")


# Every contract, for checks that must hold for all of them (tests/test_strict_schemas.py).
SCHEMAS: Final[tuple[type[pa.DataFrameModel], ...]] = (
    ProblemSchema,
    FilteredProblemSchema,
    SFTExampleSchema,
    EvalRequestSchema,
)
