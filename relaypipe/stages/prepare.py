"""Stage ``prepare``: write the train and eval problem tables.

Run: ``python -m relaypipe.stages.prepare`` (reads ``params.yaml:prepare``), ``dvc repro prepare``.
Writes ``data/problems/train.parquet`` and ``data/problems/eval.parquet`` (ProblemSchema).
Eval questions never occur in train: colliding train draws are skipped and replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from relaypipe.io import write_table
from relaypipe.schemas import ProblemSchema, problems_to_frame
from relaypipe.stages.common import stage_params
from relaypipe.tasks.arith import ArithSpec, generate, make_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareParams:
    seed: int = 0
    difficulty: int = 1  # digits per operand of the micro task
    terms: int = 6  # operands per problem
    n_train: int = 20000
    n_eval: int = 500
    out_dir: str = "data/problems"

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError("n_train and n_eval must be >= 1")


def run(params: PrepareParams) -> dict[str, int]:
    spec = ArithSpec(difficulty=params.difficulty, terms=params.terms)
    evaluation = generate(spec, params.n_eval, params.seed, "eval")
    held_out = {p.question for p in evaluation}
    train, index = [], 0
    while len(train) < params.n_train:
        p = make_problem(spec, params.seed, "train", index)
        index += 1
        if p.question not in held_out:
            train.append(p)
    if index > params.n_train:
        log.info("skipped %d train draws that repeat an eval question", index - params.n_train)
    out = Path(params.out_dir)
    write_table(problems_to_frame(train, "train"), out / "train.parquet", ProblemSchema)
    write_table(problems_to_frame(evaluation, "eval"), out / "eval.parquet", ProblemSchema)
    return {"n_train": len(train), "n_eval": len(evaluation)}


def main(argv: list[str] | None = None) -> None:
    log.info("prepare: %s", run(stage_params("prepare", PrepareParams, argv)))


if __name__ == "__main__":
    main()
