"""Stage ``warmup_data``: the student's own right answers, with call commands inserted.

Run: ``python -m relaypipe.stages.warmup_data`` (reads ``params.yaml:warmup_data``) or
``dvc repro warmup_data``. Samples the bootstrap student on training problems, keeps its right
solutions (graded by the shared grader), inserts 0-``max_commands`` ``<call>n</call>`` commands
(policy ``random``, the paper's, ``disagreement`` or ``uncertainty``), and writes
``data/warmup/sft.parquet`` (SFTExampleSchema) and ``data/warmup/metrics.json``.
Departs from the reference: commands carry n; the prompt is the one every stage uses
(``chat_template``: the tokenizer's chat form, as in sft, grpo and evaluation).
A table made only of reference solutions (``top_up_with_reference`` with a student that got
nothing right) or with no command inserted is refused before anything is written
(``allow_degenerate: true`` keeps it, with ``warnings`` in metrics.json).
The teacher is loaded only for the ``disagreement`` policy, and must then be in-process
weights: the policy compares its logits with the student's at every position, which a served
teacher (``teacher.server`` in other stages) does not return.

Its inputs are checked before any model is loaded (relaypipe/stages/inputs.py); sft.parquet
and metrics.json are published together (relaypipe/publish.py).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from relaypipe.checks import enforce, warmup_findings
from relaypipe.models import check_dtype, load_model
from relaypipe.publish import together
from relaypipe.relay.decoder import RelayDecoder
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import ProblemSchema, SFTExampleSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import StageInputError, check_model_dir, check_table
from relaypipe.tasks.base import Problem, check_prompt_options, format_prompt
from relaypipe.teacher import build_teacher
from relaypipe.train.sampling import sample_k
from relaypipe.train.warmup import (
    InsertSpec,
    build_warmup_example,
    greedy_choices,
    insert_commands,
    mistake_spans,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupDataParams:
    insert: InsertSpec
    n_problems: int = 2000  # training problems sampled (taken after the GRPO pool)
    offset: int = 512  # skip the first N training problems (the filter/GRPO pool)
    samples_per_problem: int = 2
    temperature: float = 0.7
    max_new_tokens: int = 96
    batch_size: int = 128
    seed: int = 0
    # A student too weak to solve enough problems leaves no warm-up data. With
    # top_up_with_reference, reference worked solutions fill the table up to min_examples
    # (counted in the metrics); otherwise the stage fails and says so.
    min_examples: int = 1
    top_up_with_reference: bool = False
    # A table of reference rows only (no own right answer) or with no command in it teaches
    # nothing the method needs: the stage fails (relaypipe/checks.py) unless this is true, which
    # keeps it with warnings in metrics.json and the report.
    allow_degenerate: bool = False
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (as saved) | float32 | bfloat16 | float16
    threads: int | None = None
    problems: str = "data/problems/train.parquet"
    student: str = "data/models/student"
    teacher: str = "data/models/teacher"  # used by the disagreement policy only
    chat_template: bool = False  # frame prompts with the tokenizer's chat template
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "data/warmup"

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)
        check_dtype(self.dtype)


def read_inputs(params: WarmupDataParams) -> list[Problem]:
    """The problems to sample (``offset`` .. ``offset + n_problems``), and checks of the
    student folder (and the teacher's, for policy disagreement): before any model is loaded."""
    frame = check_table(
        params.problems,
        ProblemSchema,
        param="warmup_data.problems",
        made_by="the prepare stage",
        empty="the prepare stage wrote no training problem (prepare.n_train); re-run prepare",
    )
    window = frame.iloc[params.offset : params.offset + params.n_problems]
    if window.empty:
        raise StageInputError(
            f"warmup_data.offset = {params.offset} and warmup_data.n_problems = "
            f"{params.n_problems} select no row of {params.problems}, which has {len(frame)} "
            "(prepare.n_train): lower the offset or raise prepare.n_train"
        )
    check_model_dir(params.student, param="warmup_data.student", made_by="the bootstrap stage")
    if params.insert.policy == "disagreement":
        check_model_dir(
            params.teacher,
            param="warmup_data.teacher",
            made_by="the bootstrap stage",
            served=(
                "policy disagreement compares the teacher's logits with the student's at every "
                "position, which needs its weights in-process: use another "
                "warmup_data.insert.policy, or a teacher folder with weights"
            ),
        )
    return frame_to_problems(window)


def run(params: WarmupDataParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    problems = read_inputs(params)
    student, tok = load_model(params.student, device=params.device, dtype=params.dtype)
    if params.insert.policy == "mistakes":
        rows, dropped = reference_rows(params, problems, student, tok)
        n_own, n_samples, accuracy = len(rows), 0, None
    else:
        rows, n_own, accuracy = sampled_rows(params, problems, student, tok)
        n_samples, dropped = len(problems) * params.samples_per_problem, 0
    table = pd.DataFrame(rows)
    out = Path(params.out_dir)
    metrics = {
        "n_examples": len(table),
        "n_reference_examples": len(table) - n_own,
        "student_sample_accuracy": accuracy,  # null for mistakes: nothing is sampled
        "commands_per_example": round(float(table.n_commands.mean()), 3),
    }
    if params.insert.policy == "mistakes":
        # rows the student would write alone (greedy, teacher-forced), and rows left out
        metrics["rows_without_mistakes"] = int((table.n_commands == 0).sum())
        metrics["dropped_over_max_commands"] = dropped
    findings = warmup_findings(
        len(table),
        n_own,
        int(table.n_commands.sum()),
        n_samples=n_samples,
        where=str(out / "sft.parquet"),
    )
    # Checked before anything is written: a refused table leaves the previous one in place.
    metrics["warnings"] = enforce(findings, stage="warmup_data", allow=params.allow_degenerate)
    with together() as pub:  # the table and its metrics land together
        pub.table(table, out / "sft.parquet", SFTExampleSchema)
        pub.json(out / "metrics.json", metrics)
    return metrics


def _row(problem: Problem, prompt: str, completion: str, ns: list[int], policy: str) -> dict:
    return {
        "problem_id": problem.problem_id,
        "prompt": prompt,
        "completion": completion,
        "n_commands": len(ns),
        "policy": policy,
    }


def reference_rows(
    params: WarmupDataParams, problems: list[Problem], student: Any, tok: Any
) -> tuple[list[dict], int]:
    """Policy ``mistakes``: every problem's reference solution, a command before each run the
    student would get wrong (relaypipe/train/warmup.py); rows needing more than
    ``max_commands`` are dropped. Returns the rows and how many were dropped."""
    missing = [p.problem_id for p in problems if not p.solution]
    if missing:
        raise ValueError(
            f"warmup_data.insert.policy mistakes builds rows from reference solutions, but "
            f"{len(missing)} problems in {params.problems} have none (first: {missing[0]})"
        )
    prompts = [
        format_prompt(
            p.question,
            tok,
            chat_template=params.chat_template,
            chat_template_kwargs=params.chat_template_kwargs,
        )
        for p in problems
    ]
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    completion_ids = [tok(p.solution, add_special_tokens=False).input_ids for p in problems]
    greedy = greedy_choices(student, prompt_ids, completion_ids, params.batch_size)
    rows, dropped = [], 0
    for problem, prompt, ids, choices in zip(
        problems, prompts, completion_ids, greedy, strict=True
    ):
        spans = mistake_spans(choices, ids, params.insert.n_values)
        if len(spans) > params.insert.max_commands:
            dropped += 1
            continue
        ns = [n for _, n in spans]
        completion = tok.decode(insert_commands(ids, [q for q, _ in spans], ns, tok))
        rows.append(_row(problem, prompt, completion, ns, params.insert.policy))
    if not rows:
        raise ValueError(
            f"every one of the {len(problems)} warm-up problems needs more than "
            f"warmup_data.insert.max_commands = {params.insert.max_commands} calls: raise it"
        )
    return rows, dropped


def sampled_rows(
    params: WarmupDataParams, problems: list[Problem], student: Any, tok: Any
) -> tuple[list[dict], int, float]:
    """The paper's rows: the student's own right samples with commands inserted (topped up
    with reference solutions if asked). Returns the rows, how many are the student's own, and
    its sample accuracy."""
    backend = TransformersBackend(student)
    samples = sample_k(
        RelayDecoder(backend, backend, tok),
        problems,
        mode="student",
        k=params.samples_per_problem,
        temperature=params.temperature,
        max_new_tokens=params.max_new_tokens,
        seed=params.seed,
        batch_size=params.batch_size,
        chat_template=params.chat_template,
        chat_template_kwargs=params.chat_template_kwargs,
    )
    teacher = None
    if params.insert.policy == "disagreement":
        # build_teacher refuses a directory that stands for a served teacher, and a teacher
        # whose tokenizer differs (positions are compared token by token).
        teacher = build_teacher(params.teacher, tok, device=params.device, dtype=params.dtype).model
    rng = random.Random(params.insert.seed)
    rows, seen = [], set()
    for problem, graded in zip(problems, samples, strict=True):
        for g in graded:
            if not g.correct or (problem.problem_id, g.completion) in seen:
                continue  # wrong, or an exact duplicate of a kept sample
            seen.add((problem.problem_id, g.completion))
            prompt, completion, ns = build_warmup_example(
                problem.question,
                g.completion,
                tok,
                params.insert,
                rng,
                student,
                teacher,
                chat_template=params.chat_template,
                chat_template_kwargs=params.chat_template_kwargs,
            )
            rows.append(_row(problem, prompt, completion, ns, params.insert.policy))
    n_own = len(rows)
    if n_own < params.min_examples and params.top_up_with_reference:
        for problem in problems[: params.min_examples - n_own]:
            prompt, completion, ns = build_warmup_example(
                problem.question,
                problem.solution,
                tok,
                params.insert,
                rng,
                student,
                teacher,
                chat_template=params.chat_template,
                chat_template_kwargs=params.chat_template_kwargs,
            )
            rows.append(_row(problem, prompt, completion, ns, params.insert.policy))
    if len(rows) < params.min_examples:
        raise RuntimeError(
            f"the student solved only {n_own} of {len(problems)} problems in "
            f"{params.samples_per_problem} samples (min_examples={params.min_examples}): not "
            "enough warm-up data. Raise n_problems/samples_per_problem, train the student "
            "longer, or set "
            "warmup_data.top_up_with_reference: true."
        )
    n_samples = len(problems) * params.samples_per_problem
    accuracy = round(sum(g.correct for s in samples for g in s) / n_samples, 4)
    return rows, n_own, accuracy


def main(argv: list[str] | None = None) -> None:
    log.info("warmup_data: %s", run(stage_params("warmup_data", WarmupDataParams, argv)))


if __name__ == "__main__":
    main()
