"""Stage ``prepare``: write the train and eval problem tables, and the benchmark tables.

Run: ``python -m relaypipe.stages.prepare`` (reads ``params.yaml:prepare``), ``dvc repro prepare``.
Writes ``data/problems/train.parquet``, ``data/problems/eval.parquet`` and one
``data/problems/benchmarks/<name>.parquet`` per entry of ``benchmarks`` (all ProblemSchema).
Eval questions never occur in train: colliding train draws are skipped and replaced.
``terms`` is one operand count or a list of them: with a list, every train and eval problem
draws its count from the list (seeded by its index), so both models learn every length the
benchmarks ask about.

Benchmarks (split ``benchmark``) are what the ``evaluate`` stage reports; ``eval`` stays the
model-selection split of training. Each entry is either

* procedural arith: ``{name, difficulty, terms, n}``, drawn fresh with its own RNG stream, so a
  benchmark of the training shape (e.g. ``arith-d1t6``) is the eval distribution but not the
  eval problems, and one with more terms or digits is out of the training distribution; or
* a question/answer table (``relaypipe.tasks.dataset``): ``{name, source, split, n, ...column
  mapping}`` with a local JSONL/Parquet/CSV file, an fsspec URL or a hub id (e.g. GSM8K:
  ``source: openai/gsm8k, config: main, split: test``). A local file source must also be listed
  under this stage's ``deps`` in dvc.yaml, or DVC will not notice when it changes.

Every benchmark question is disjoint from train and eval (and from itself): repeats are dropped,
arith redraws until it has ``n``. Not in the paper, which evaluates on public math sets only.

A benchmark with ``calibration_n > 0`` also gets a *calibration set*:
``data/problems/calibration/<name>.parquet`` (split ``calibration``), ``calibration_n`` problems
of the benchmark's own kind that are in no benchmark, nor in train or eval. Arith draws them fresh
from their own stream (``make_problem(..., "calibration", i)``); a dataset takes the rows after
the benchmark's ``n`` (too few rows left fail, saying how many there are). The evaluate stage
calibrates the relay's call bias per benchmark on them (``evaluate.calibrate.per_benchmark``):
a workload's held-out problems, never the ones it is scored on. Drawn after everything else,
so adding them changes no train, eval or benchmark problem.

Train and eval come from the procedural arith task (``difficulty``, ``terms``) unless
``train_source`` names a question/answer table, with the same fields as a dataset benchmark row
(``source``, ``split`` (default ``train``), ``config``, column mapping; e.g. the MATH train split:
``{source: DigitalLearningGmbH/MATH-lighteval, split: train, question_column: problem,
answer_column: solution}``). Its rows are shuffled with ``seed``; repeated questions and every
question of a dataset benchmark are dropped (so the benchmarks stay whole); the first ``n_eval``
become eval and the next ``n_train`` train. Fewer usable rows than ``n_eval + n_train`` fail,
saying how many there are. A local file must be listed under this stage's ``deps`` too.

Its inputs (dataset files) are all read before anything is written, and train, eval and
the benchmarks folder are published together (relaypipe/publish.py).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from relaypipe.io import write_table
from relaypipe.publish import together
from relaypipe.schemas import ProblemSchema, problems_to_frame
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import MissingInputError, StageInputError
from relaypipe.tasks.arith import ArithSpec, make_problem
from relaypipe.tasks.base import Problem
from relaypipe.tasks.dataset import DatasetSpec, DatasetUnavailableError, load_problems

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# An arith benchmark gives up after this many draws per wanted problem: a tiny question space
# (e.g. one digit, two terms) cannot hold n fresh questions, and looping forever helps nobody.
_MAX_DRAWS_PER_PROBLEM = 50


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark table: procedural arith (no ``source``) or a dataset file / hub id."""

    name: str  # file name under out_dir/benchmarks and the column label in the report
    n: int | None = None  # problems; required for arith, a row limit for a dataset (None: all)
    difficulty: int = 1  # arith: digits per operand
    terms: int = 6  # arith: operands per problem
    letters: int = 0  # arith: > 0 writes operands as code letters (relaypipe/tasks/arith.py)
    source: str | None = None  # dataset: file, fsspec URL or hub id (relaypipe.tasks.dataset)
    split: str = "test"  # dataset: hub split
    config: str | None = None  # dataset: hub config ("main" for openai/gsm8k)
    question_column: str = "question"
    answer_column: str = "answer"
    solution_column: str | None = None
    id_column: str | None = None
    # problems of the same kind, in no benchmark, written to out_dir/calibration/<name>.parquet
    # for evaluate.calibrate.per_benchmark (0: none)
    calibration_n: int = 0

    def __post_init__(self) -> None:
        if self.calibration_n < 0:
            raise ValueError(
                f"benchmark {self.name}: calibration_n must be >= 0, got {self.calibration_n}"
            )
        if not _NAME_RE.match(self.name):
            raise ValueError(f"benchmark name {self.name!r} must be a plain file name ([\\w.-])")
        if self.n is not None and self.n < 1:
            raise ValueError(f"benchmark {self.name}: n must be >= 1, got {self.n}")
        if self.source is None:
            if self.n is None:
                raise ValueError(f"benchmark {self.name}: an arith benchmark needs n")
            ArithSpec(self.difficulty, self.terms, self.letters)  # validates the knobs

    def dataset_spec(self) -> DatasetSpec:
        assert self.source is not None
        return DatasetSpec(
            source=self.source,
            split=self.split,
            config=self.config,
            question_column=self.question_column,
            answer_column=self.answer_column,
            solution_column=self.solution_column,
            id_column=self.id_column,
            name=self.name,
        )


@dataclass(frozen=True)
class TrainSourceSpec(DatasetSpec):
    """Where train and eval problems come from when not procedural: a question/answer table
    (a dataset benchmark row's fields, read by the same loader); its split defaults to train."""

    split: str = "train"


@dataclass(frozen=True)
class PrepareParams:
    seed: int = 0
    difficulty: int = 1  # digits per operand of the micro task
    terms: int | list[int] = 6  # operands per problem, or the counts to draw from per problem
    letters: int = 0  # > 0: operands are code letters, a knowledge gap for pretrained models
    n_train: int = 20000
    n_eval: int = 500
    # train/eval from a question/answer table instead of the micro task (difficulty and terms
    # then unused): file, fsspec URL or hub id, with its column mapping
    train_source: TrainSourceSpec | None = None
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    out_dir: str = "data/problems"

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError("n_train and n_eval must be >= 1")
        if isinstance(self.terms, list) and not self.terms:
            raise ValueError("terms must be a count or a non-empty list of counts")
        for terms in self.term_counts:
            ArithSpec(self.difficulty, terms, self.letters)  # validates the knobs
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique, got {names}")

    @property
    def term_counts(self) -> list[int]:
        return self.terms if isinstance(self.terms, list) else [self.terms]

    def problem(self, split: str, index: int) -> Problem:
        """Problem ``index`` of ``split`` (train or eval), with its own operand count."""
        counts = self.term_counts
        # Its own string-seeded stream: the count never depends on other problems' draws.
        terms = (
            counts[0]
            if len(counts) == 1
            else random.Random(f"{self.seed}/{split}/terms/{index}").choice(counts)
        )
        return make_problem(
            ArithSpec(self.difficulty, terms, self.letters), self.seed, split, index
        )


def arith_problems(
    spec: BenchmarkSpec, seed: int, seen: set[str], n: int, split: str, what: str
) -> list[Problem]:
    """``n`` fresh problems of ``spec``'s kind whose questions are not in ``seen`` (nor
    repeated), drawn from stream ``split``; ``what`` names the set in errors and logs."""
    arith = ArithSpec(spec.difficulty, spec.terms, spec.letters)
    # The split string feeds the RNG: "benchmark" and "calibration" give streams independent
    # of train/eval and of each other.
    out, taken, index = [], set(seen), 0
    while len(out) < n:
        if index >= _MAX_DRAWS_PER_PROBLEM * n:
            raise ValueError(
                f"{what}: only {len(out)} of {n} fresh questions in {index} draws; "
                f"{arith.name} has too few distinct questions left"
            )
        p = make_problem(arith, seed, split, index)
        index += 1
        if p.question not in taken:
            taken.add(p.question)
            out.append(p)
    if index > n:
        log.info("%s: skipped %d repeated draws", what, index - n)
    return out


def _fresh_rows(rows: Iterable[Problem], seen: set[str], n: int | None) -> list[Problem]:
    """The first ``n`` (None: all) of ``rows`` whose questions are not in ``seen`` nor
    repeated."""
    out, taken = [], set(seen)
    for p in rows:
        if n is not None and len(out) >= n:
            break
        if p.question not in taken:
            taken.add(p.question)
            out.append(p)
    return out


def dataset_calibration(spec: BenchmarkSpec, taken: set[str], rows: list[Problem]) -> list[Problem]:
    """The first ``calibration_n`` of a dataset's rows not in ``taken`` (train, eval and every
    benchmark) nor repeated: the rows after the benchmark's own."""
    out = _fresh_rows(rows, taken, spec.calibration_n)
    if len(out) >= spec.calibration_n:
        return out
    raise ValueError(
        f"benchmark {spec.name}: calibration_n {spec.calibration_n}, but {spec.source} has only "
        f"{len(out)} usable rows beyond the benchmark's (and train/eval's); lower calibration_n "
        "or the benchmark's n"
    )


def dataset_benchmark(
    spec: BenchmarkSpec, seen: set[str], rows: list[Problem] | None = None
) -> list[Problem]:
    """The dataset's rows (first ``n``) minus questions already in train/eval or repeated
    (``rows``: the dataset already loaded)."""
    source = rows if rows is not None else load_problems(spec.dataset_spec())
    out = _fresh_rows(source, seen, spec.n)
    if not out:
        raise ValueError(f"benchmark {spec.name}: no usable rows in {spec.source}")
    return out


def arith_splits(params: PrepareParams) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) of the micro task; a train draw that repeats an eval question is redrawn."""
    evaluation = [params.problem("eval", i) for i in range(params.n_eval)]
    held_out = {p.question for p in evaluation}
    train, index = [], 0
    while len(train) < params.n_train:
        p = params.problem("train", index)
        index += 1
        if p.question not in held_out:
            train.append(p)
    if index > params.n_train:
        log.info("skipped %d train draws that repeat an eval question", index - params.n_train)
    return train, evaluation


def source_splits(params: PrepareParams, avoid: set[str]) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) from ``train_source``: shuffled with the seed, without repeated questions
    or any in ``avoid`` (the benchmarks'); eval first, then train, disjoint by construction."""
    spec = params.train_source
    assert spec is not None
    rows = load_source(spec, "prepare.train_source")
    usable, taken = [], set(avoid)
    for p in rows:
        if p.question not in taken:
            taken.add(p.question)
            usable.append(p)
    # A string seed: the order depends on the seed and the rows, not on Python's hash salt.
    random.Random(f"{params.seed}/train_source").shuffle(usable)
    need = params.n_eval + params.n_train
    if len(usable) < need:
        raise ValueError(
            f"prepare.train_source {spec.source!r}: {len(usable)} usable questions "
            f"({len(rows) - len(usable)} of its {len(rows)} rows repeat a question or are in a "
            f"benchmark), fewer than prepare.n_eval + prepare.n_train = {need}; lower "
            f"prepare.n_train to at most {max(0, len(usable) - params.n_eval)}"
        )
    if len(rows) > len(usable):
        log.info(
            "train_source: dropped %d repeated or benchmark questions", len(rows) - len(usable)
        )
    return usable[params.n_eval : need], usable[: params.n_eval]


def load_source(spec: DatasetSpec, param: str) -> list[Problem]:
    """The rows of a dataset source; a missing, unreadable or empty one fails naming ``param``
    (this stage's inputs are its params' files: nothing upstream makes them)."""
    local = Path(spec.source)
    if local.is_file() and local.stat().st_size < 4096 and not local.read_bytes().strip():
        raise StageInputError(f"{param}: {spec.source} is empty (0 rows)")
    try:
        rows = load_problems(spec)
    except FileNotFoundError as exc:
        raise MissingInputError(f"{param}: {exc}") from exc
    except DatasetUnavailableError:
        raise
    except Exception as exc:  # datasets/pyarrow parse errors, a missing column, a blank cell
        causes, cause = [], exc
        while cause is not None and len(causes) < 4:  # datasets wraps the parser's error
            causes.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        raise StageInputError(
            f"{param}: {spec.source} cannot be read as a question/answer table "
            f"({'; caused by '.join(causes)})"
        ) from exc
    if not rows:
        raise StageInputError(f"{param}: {spec.source} has 0 rows")
    return rows


def run(params: PrepareParams) -> dict[str, int]:
    # Every input first (dataset benchmarks, then a train_source inside source_splits): a bad
    # one fails before anything is written, and a train_source leaves their questions out of
    # train/eval so every benchmark keeps all its rows.
    loaded = {
        b.name: load_source(b.dataset_spec(), f"prepare.benchmarks[{b.name}]")
        for b in params.benchmarks
        if b.source
    }
    if params.train_source is None:
        train, evaluation = arith_splits(params)
    else:
        avoid = {p.question for rows in loaded.values() for p in rows}
        train, evaluation = source_splits(params, avoid)
    held_out = {p.question for p in evaluation}
    counts = {"n_train": len(train), "n_eval": len(evaluation)}

    seen = held_out | {p.question for p in train}
    benchmarks = {}
    for bench in params.benchmarks:
        if bench.source is None:
            assert bench.n is not None
            problems = arith_problems(
                bench, params.seed, seen, bench.n, "benchmark", f"benchmark {bench.name}"
            )
        else:
            problems = dataset_benchmark(bench, seen, loaded[bench.name])
        benchmarks[bench.name] = problems
        counts[f"benchmark/{bench.name}"] = len(problems)
    # Calibration sets last, avoiding every benchmark: nothing above depends on them.
    taken = seen | {p.question for problems in benchmarks.values() for p in problems}
    calibration = {}
    for bench in params.benchmarks:
        if bench.calibration_n:
            calibration[bench.name] = (
                arith_problems(
                    bench,
                    params.seed,
                    taken,
                    bench.calibration_n,
                    "calibration",
                    f"calibration set of {bench.name}",
                )
                if bench.source is None
                else dataset_calibration(bench, taken, loaded[bench.name])
            )
            counts[f"calibration/{bench.name}"] = bench.calibration_n

    # All computed: the tables land together (train, eval and the benchmarks folder).
    out = Path(params.out_dir)
    bench_dir = out / "benchmarks"
    with together() as pub:
        pub.table(problems_to_frame(train, "train"), out / "train.parquet", ProblemSchema)
        pub.table(problems_to_frame(evaluation, "eval"), out / "eval.parquet", ProblemSchema)
        if benchmarks or bench_dir.is_dir():
            # This stage owns the folder: it is replaced whole, so a benchmark dropped from
            # params does not linger there and get evaluated by a run outside DVC (DVC itself
            # clears declared outputs first). Anything but tables in it is kept.
            staged = pub.directory(bench_dir)
            if bench_dir.is_dir():
                for other in sorted(bench_dir.iterdir()):
                    if other.suffix == ".parquet" and other.is_file():
                        if other.stem not in benchmarks:
                            log.info("removing %s: no longer in prepare.benchmarks", other)
                    elif other.is_dir():
                        shutil.copytree(other, staged / other.name, symlinks=True)
                    else:
                        shutil.copy2(other, staged / other.name, follow_symlinks=False)
            for name, problems in benchmarks.items():
                frame = problems_to_frame(problems, "benchmark")
                write_table(frame, staged / f"{name}.parquet", ProblemSchema)
        # Written whole every run (empty without calibration sets): a DVC output must exist,
        # and a set dropped from params must not linger.
        staged = pub.directory(out / "calibration")
        for name, problems in calibration.items():
            frame = problems_to_frame(problems, "calibration")
            write_table(frame, staged / f"{name}.parquet", ProblemSchema)
    return counts


def main(argv: list[str] | None = None) -> None:
    log.info("prepare: %s", run(stage_params("prepare", PrepareParams, argv)))


if __name__ == "__main__":
    main()
