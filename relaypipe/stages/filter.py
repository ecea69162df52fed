"""Stage ``filter``: keep the training problems inside the teacher's competence.

Run: ``python -m relaypipe.stages.filter`` (reads ``params.yaml:filter``) or ``dvc repro filter``.
Samples the teacher ``k`` times per problem (paper: k = 16, temperature 0.7) and keeps the
problems it solves at least once: asking for help only pays where the teacher can help.
Writes ``data/filter/kept.parquet`` (FilteredProblemSchema) and ``data/filter/metrics.json``.
The teacher (``teacher: {path, server}``) is a model directory or, with ``teacher.server``, a
served model (relaypipe/teacher.py); ``chat_template`` frames prompts as every other stage does.

Its inputs are checked before any decoding (relaypipe/stages/inputs.py); kept.parquet and
metrics.json are published together (relaypipe/publish.py). A teacher that solves nothing
fails the stage before it writes (relaypipe/checks.py; ``allow_degenerate`` publishes the empty
table with a warning, which grpo then refuses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from relaypipe.checks import enforce
from relaypipe.models import check_dtype
from relaypipe.publish import together
from relaypipe.relay.decoder import RelayDecoder
from relaypipe.schemas import FilteredProblemSchema, ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import StageInputError, check_model_dir, check_table
from relaypipe.tasks.base import check_prompt_options
from relaypipe.teacher import MOVED_TEACHER_KEYS, TeacherSpec
from relaypipe.train.sampling import sample_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterParams:
    k: int = 16  # teacher samples per problem
    temperature: float = 0.7
    n_problems: int = 512  # the first N training problems are considered (the GRPO pool)
    max_new_tokens: int = 96
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (as saved) | float32 | bfloat16 | float16
    threads: int | None = None
    problems: str = "data/problems/train.parquet"
    # weights in teacher.path, or a served model (teacher.server; path: its tokenizer)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    chat_template: bool = False  # frame prompts with the tokenizer's chat template
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "data/filter"
    # a teacher that solves nothing fails the stage; true: warn, and publish the empty table
    allow_degenerate: bool = False

    MOVED_KEYS: ClassVar[dict[str, str]] = MOVED_TEACHER_KEYS

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)
        check_dtype(self.dtype)


def read_inputs(params: FilterParams) -> pd.DataFrame:
    """The problems to filter (the first ``n_problems``), and a check of the teacher folder
    (its weights, or with ``teacher.server`` the tokenizer it holds): before any decoding."""
    frame = check_table(
        params.problems,
        ProblemSchema,
        param="filter.problems",
        made_by="the prepare stage",
        empty="the prepare stage wrote no training problem (prepare.n_train); re-run prepare",
    ).iloc[: params.n_problems]
    if frame.empty:
        raise StageInputError(
            f"filter.n_problems = {params.n_problems} leaves no problem of {params.problems} "
            "to filter: set it to at least 1"
        )
    check_model_dir(
        params.teacher.path,
        param="filter.teacher.path",
        made_by="the bootstrap stage",
        weights=not params.teacher.remote,
    )
    return frame


def run(params: FilterParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    frame = read_inputs(params)
    problems = frame_to_problems(frame)
    with params.teacher.build(device=params.device, dtype=params.dtype) as teacher:
        # teacher mode never calls the student, so the teacher fills both seats
        decoder = RelayDecoder(teacher.backend, teacher.backend, teacher.tokenizer)
        samples = sample_k(
            decoder,
            problems,
            mode="teacher",
            k=params.k,
            temperature=params.temperature,
            max_new_tokens=params.max_new_tokens,
            seed=params.seed,
            batch_size=params.batch_size,
            chat_template=params.chat_template,
            chat_template_kwargs=params.chat_template_kwargs,
        )
    frame = frame.assign(teacher_pass_rate=[sum(g.correct for g in s) / params.k for s in samples])
    kept = frame[frame.teacher_pass_rate > 0].reset_index(drop=True)
    findings = []
    if kept.empty:
        findings.append(
            f"filter: the teacher solved none of the {len(frame)} problems in {params.k} "
            "samples each, so GRPO has nothing to train on (the grpo stage refuses an empty "
            "kept.parquet). Check the teacher (bootstrap.json's teacher_accuracy), give it room "
            "(filter.max_new_tokens) or more tries (filter.k, filter.n_problems)"
        )
    warnings = enforce(findings, stage="filter", allow=params.allow_degenerate)
    metrics = {
        "n_considered": len(frame),
        "n_kept": len(kept),
        "kept_share": round(len(kept) / max(1, len(frame)), 4),
        "teacher_mean_pass_rate": round(float(frame.teacher_pass_rate.mean()), 4),
        "warnings": warnings,
    }
    out = Path(params.out_dir)
    with together() as pub:  # the table and its metrics land together
        pub.table(kept, out / "kept.parquet", FilteredProblemSchema)
        pub.json(out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("filter: %s", run(stage_params("filter", FilterParams, argv)))


if __name__ == "__main__":
    main()
