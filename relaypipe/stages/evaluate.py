"""Stage ``evaluate``: every mode on every benchmark, one row per request.

Run: ``python -m relaypipe.stages.evaluate`` (reads ``params.yaml:evaluate``) or
``dvc repro evaluate``. Reads ``data/problems/benchmarks/*.parquet`` (ProblemSchema, all of them
unless ``benchmarks`` names some), the bootstrap student, the warmed-up student, the GRPO student
and the teacher. Writes ``data/eval/requests.parquet`` (EvalRequestSchema: tokens by source,
calls, teacher prefill with and without prefix caching, student prefill, latency, correctness)
and ``data/eval/models.json`` (which model each mode used and its parameter count, for FLOPs).
``report`` turns these into metrics.

Modes (relaypipe/evaluate/suite.py): student, warmup, relay, teacher_free, teacher, and
random_router at each p of ``router_p``. Greedy by default (``temperature: 0``), like the
paper's reported numbers. The relay bounds (``relay:``) should equal ``grpo.relay``, the ones
the student was trained under; they are repeated here because a stage reads only its own
params section. Departures from the paper: benchmarks are the micro task's difficulty levels
(plus any dataset from ``prepare.benchmarks``), and the cost is measured in full (see
relaypipe/evaluate/cost.py), not only as the teacher's token share.

The teacher is a model directory (in-process) or, with ``teacher_url``/``teacher_model``, a
served model (vLLM, ``relaypipe serve``; see relaypipe/teacher.py): the teacher-alone, relay and
random-router modes then send every teacher turn to that server. A served teacher's parameter
count cannot be read from its weights, so ``teacher_params`` must give it (the report's FLOPs
and cost need it). ``chat_template`` frames prompts with the students' chat template, exactly as
the training stages did.

Every input is checked before any model is loaded (relaypipe/stages/inputs.py): an empty
benchmark table is refused. requests.parquet and models.json are published together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from relaypipe.evaluate.suite import evaluate_benchmarks, plan_runs
from relaypipe.micro.models import count_parameters
from relaypipe.models import check_dtype, load_model
from relaypipe.publish import together
from relaypipe.relay.backends import Sampling, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.schemas import EVAL_MODES, EvalRequestSchema, ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import MissingInputError, check_model_dir, check_table
from relaypipe.tasks.base import Problem, check_prompt_options
from relaypipe.teacher import HTTPOptions, build_teacher, validate_teacher_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRelayBounds:
    """Relay bounds at evaluation: keep equal to ``grpo.relay``."""

    max_call_tokens: int = 8
    max_teacher_tokens: int | None = None
    max_calls: int | None = None
    max_turns: int = 16


@dataclass(frozen=True)
class EvaluateParams:
    modes: list[str] = field(default_factory=lambda: list(EVAL_MODES))
    router_p: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    benchmarks: list[str] | None = None  # names under benchmarks_dir (None: every table there)
    limit: int | None = None  # the first N problems of each benchmark (None: all)
    temperature: float = 0.0  # 0: greedy, for student and teacher alike
    max_new_tokens: int = 96  # enough for the longest worked solution of every benchmark
    relay: EvalRelayBounds = field(default_factory=EvalRelayBounds)
    batch_size: int = 100
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (as saved) | float32 | bfloat16 | float16
    threads: int | None = None
    benchmarks_dir: str = "data/problems/benchmarks"
    student: str = "data/models/student"
    warmup: str = "data/models/warmup"
    relay_model: str = "data/models/relay"
    teacher: str = "data/models/teacher"  # weights (unused with teacher_url)
    teacher_url: str | None = None  # an OpenAI-compatible server instead of in-process weights
    teacher_model: str | None = None  # the model name served at teacher_url
    teacher_http: HTTPOptions = field(default_factory=HTTPOptions)
    teacher_params: int | None = None  # the served teacher's parameter count (with teacher_url)
    chat_template: bool = False  # frame prompts with the tokenizer's chat template
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "data/eval"

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)
        plan_runs(self.modes, self.router_p)  # unknown modes fail here, naming the key
        if not self.modes:
            raise ValueError("modes is empty")
        if "random_router" in self.modes and not self.router_p:
            raise ValueError("random_router needs at least one router_p")
        if any(not 0.0 <= p <= 1.0 for p in self.router_p):
            raise ValueError(f"router_p values must be in [0, 1], got {self.router_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        validate_teacher_options(self.teacher_url, self.teacher_model)
        check_dtype(self.dtype)
        if self.teacher_url and not self.teacher_params:
            raise ValueError(
                "teacher_url needs teacher_params (the served model's parameter count): the "
                "report's FLOPs and cost cannot read it from weights behind a server"
            )
        if self.teacher_params is not None and not self.teacher_url:
            raise ValueError("teacher_params is only for a served teacher (teacher_url)")
        if self.teacher_params is not None and self.teacher_params < 1:
            raise ValueError(f"teacher_params must be >= 1, got {self.teacher_params}")


def load_benchmarks(params: EvaluateParams) -> dict[str, list[Problem]]:
    """Every benchmark table, validated and not empty (a broken one fails before any model is
    loaded)."""
    folder = Path(params.benchmarks_dir)
    if params.benchmarks is None:
        paths = sorted(folder.glob("*.parquet"))
        if not paths:
            raise MissingInputError(
                f"{folder} (evaluate.benchmarks_dir): no benchmark tables; they are written by "
                "the prepare stage: add prepare.benchmarks and run `dvc repro prepare`"
            )
    else:
        paths = [folder / f"{name}.parquet" for name in params.benchmarks]
    out = {}
    for path in paths:
        frame = check_table(
            path,
            ProblemSchema,
            param="evaluate.benchmarks_dir" if params.benchmarks is None else "evaluate.benchmarks",
            made_by=f"the prepare stage (its prepare.benchmarks entry {path.stem!r})",
            empty=(
                f"the prepare stage wrote an empty benchmark {path.stem!r} (prepare.benchmarks: "
                "its n, or its source's rows left after dropping repeated and train/eval "
                "questions); re-run prepare"
            ),
        )
        problems = frame_to_problems(frame)
        out[path.stem] = problems[: params.limit] if params.limit else problems
    return out


STUDENT_MAKERS = {
    "student": ("evaluate.student", "the bootstrap stage"),
    "warmup": ("evaluate.warmup", "the sft stage"),
    "relay": ("evaluate.relay_model", "the grpo stage"),
}


def read_inputs(params: EvaluateParams) -> dict[str, list[Problem]]:
    """Every input, checked before any model is loaded: the benchmark tables (returned), the
    students the modes use and, in-process, the teacher."""
    benchmarks = load_benchmarks(params)
    paths = {"student": params.student, "warmup": params.warmup, "relay": params.relay_model}
    for role in sorted({r.student_role for r in plan_runs(params.modes, params.router_p)}):
        param, made_by = STUDENT_MAKERS[role]
        check_model_dir(paths[role], param=param, made_by=made_by)
    if not params.teacher_url:
        check_model_dir(params.teacher, param="evaluate.teacher", made_by="the bootstrap stage")
    return benchmarks


def run(params: EvaluateParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    benchmarks = read_inputs(params)
    runs = plan_runs(params.modes, params.router_p)
    paths = {"student": params.student, "warmup": params.warmup, "relay": params.relay_model}
    roles = sorted({r.student_role for r in runs})

    student_models, students = {}, {}
    for role in roles:
        student_models[role], tok = load_model(
            paths[role], device=params.device, dtype=params.dtype
        )
        students[role] = {"path": paths[role], "params": count_parameters(student_models[role])}
    # The students share one tokenizer (each stage starts from the previous one's): the
    # teacher must speak it (checked in-process; over HTTP it frames the ids it sends).
    teacher = build_teacher(
        params.teacher,
        tok,
        url=params.teacher_url,
        model_name=params.teacher_model,
        http=params.teacher_http,
        device=params.device,
        dtype=params.dtype,
    )
    decoders = {
        role: RelayDecoder(TransformersBackend(m.eval(), name=role), teacher.backend, tok)
        for role, m in student_models.items()
    }

    sampling = Sampling(temperature=params.temperature)
    b = params.relay
    config = RelayConfig(
        max_new_tokens=params.max_new_tokens,
        max_turns=b.max_turns,
        max_call_tokens=b.max_call_tokens,
        max_teacher_tokens=b.max_teacher_tokens,
        max_calls=b.max_calls,
        student_sampling=sampling,
        teacher_sampling=sampling,
        seed=params.seed,
    )
    with teacher, torch.inference_mode():
        table = evaluate_benchmarks(
            benchmarks,
            runs,
            decoders,
            config,
            params.batch_size,
            chat_template=params.chat_template,
            chat_template_kwargs=params.chat_template_kwargs,
        )

    out = Path(params.out_dir)
    models = {
        "teacher": {
            "path": teacher.where,
            "params": params.teacher_params if teacher.remote else count_parameters(teacher.model),
        },
        "students": students,
        "modes": {r.mode: r.student_role for r in runs},
    }
    # Both land together; the table is validated first: if it breaks its contract, nothing
    # (not even models.json) is written.
    with together() as pub:
        pub.table(table, out / "requests.parquet", EvalRequestSchema)
        pub.json(out / "models.json", models)
    summary = {
        "requests": len(table),
        "benchmarks": {name: len(problems) for name, problems in benchmarks.items()},
        "runs": [r.label for r in runs],
    }
    return summary


def main(argv: list[str] | None = None) -> None:
    log.info("evaluate: %s", run(stage_params("evaluate", EvaluateParams, argv)))


if __name__ == "__main__":
    main()
