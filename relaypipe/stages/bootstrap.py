"""Stage ``bootstrap``: train the micro student and teacher from scratch and measure them.

Run: ``python -m relaypipe.stages.bootstrap`` (reads ``params.yaml:bootstrap``), or
``dvc repro bootstrap``. Reads ``data/problems/{train,eval}.parquet``; writes
``data/models/student/``, ``data/models/teacher/`` (safetensors + tokenizer) and the metrics
``data/models/bootstrap.json`` (``student_accuracy``, ``teacher_accuracy``, ``n_eval``, sizes,
times; greedy decoding on the eval table).

Not in the paper: the paper starts from pretrained Qwen3 models. This stage exists so the whole
method runs on a laptop with no model hub; a pretrained pair replaces it in other presets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from relaypipe.io import read_table, write_json
from relaypipe.micro.bootstrap import BootstrapSpec, bootstrap_pair
from relaypipe.micro.models import ModelSize
from relaypipe.micro.train_lm import TrainSpec
from relaypipe.schemas import ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapParams:
    student: ModelSize
    teacher: ModelSize
    student_train: TrainSpec
    teacher_train: TrainSpec
    max_new_tokens: int = 96
    eval_batch_size: int = 100
    eval_limit: int | None = None  # evaluate on the first N eval problems only (None: all)
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    problems_dir: str = "data/problems"
    out_dir: str = "data/models"


def run(params: BootstrapParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    problems = Path(params.problems_dir)
    train = frame_to_problems(read_table(problems / "train.parquet", ProblemSchema))
    evaluation = frame_to_problems(read_table(problems / "eval.parquet", ProblemSchema))
    if params.eval_limit:
        evaluation = evaluation[: params.eval_limit]
    spec = BootstrapSpec(
        student=params.student,
        teacher=params.teacher,
        student_train=params.student_train,
        teacher_train=params.teacher_train,
        max_new_tokens=params.max_new_tokens,
        eval_batch_size=params.eval_batch_size,
        seed=params.seed,
    )
    t = time.perf_counter()
    metrics = bootstrap_pair(train, evaluation, spec, Path(params.out_dir))
    metrics["total_seconds"] = round(time.perf_counter() - t, 1)
    write_json(Path(params.out_dir) / "bootstrap.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("bootstrap: %s", run(stage_params("bootstrap", BootstrapParams, argv)))


if __name__ == "__main__":
    main()
