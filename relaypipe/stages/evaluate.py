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
paper's reported numbers.

Bounds and prompt format: every mode decodes under ``bounds`` (relaypipe/bounds.py) and frames
questions with ``chat_template``/``chat_template_kwargs``. ``bounds: null`` (the default) means
the ones the relay model was trained under, read from ``relay_model``/relay.json (grpo writes
it); ``chat_template: null`` likewise takes its prompt format. A relay model without relay.json
(made before the file existed, or by hand) then fails before any decoding: set the params, or
re-run grpo. Explicit values override the record (a difference from it is logged); models.json
says which bounds and prompt format were used and where they came from (``decoding``).
Departures from the paper: benchmarks are the micro task's difficulty levels
(plus any dataset from ``prepare.benchmarks``), and the cost is measured in full (see
relaypipe/evaluate/cost.py), not only as the teacher's token share.

The teacher (``teacher: {path, server}``) is a model directory (in-process) or, with
``teacher.server``, a served model (vLLM, ``relaypipe serve``; see relaypipe/teacher.py): the
teacher-alone, relay and random-router modes then send every teacher turn to that server. A
served teacher's parameter count cannot be read from its weights, so ``teacher.server.params``
must give it (the report's FLOPs and cost need it).

Every input is checked before any model is loaded (relaypipe/stages/inputs.py): an empty
benchmark table is refused. requests.parquet and models.json are published together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from relaypipe.bounds import (
    MOVED_BOUNDS,
    RELAY_RECORD,
    PromptFormat,
    RelayBounds,
    RelayRecord,
    read_relay_record,
)
from relaypipe.evaluate.suite import evaluate_benchmarks, plan_runs
from relaypipe.micro.models import count_parameters
from relaypipe.models import check_dtype, load_model
from relaypipe.publish import together
from relaypipe.relay.backends import Sampling, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.schemas import EVAL_MODES, EvalRequestSchema, ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import MissingInputError, StageInputError, check_model_dir, check_table
from relaypipe.tasks.base import Problem, check_prompt_options
from relaypipe.teacher import MOVED_TEACHER_KEYS, TeacherSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateParams:
    modes: list[str] = field(default_factory=lambda: list(EVAL_MODES))
    router_p: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    benchmarks: list[str] | None = None  # names under benchmarks_dir (None: every table there)
    limit: int | None = None  # the first N problems of each benchmark (None: all)
    temperature: float = 0.0  # 0: greedy, for student and teacher alike
    max_new_tokens: int = 96  # enough for the longest worked solution of every benchmark
    # every mode's bounds; None: those the relay model was trained under (its relay.json)
    bounds: RelayBounds | None = None
    batch_size: int = 100
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (as saved) | float32 | bfloat16 | float16
    threads: int | None = None
    benchmarks_dir: str = "data/problems/benchmarks"
    student: str = "data/models/student"
    warmup: str = "data/models/warmup"
    relay_model: str = "data/models/relay"
    # weights in teacher.path, or a served model (teacher.server, with its params count)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    # frame prompts with the tokenizer's chat template; None: as the relay model was trained
    chat_template: bool | None = None
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking
    # mode; None: {} with an explicit chat_template, else the relay model's
    chat_template_kwargs: dict[str, Any] | None = None
    out_dir: str = "data/eval"

    MOVED_KEYS: ClassVar[dict[str, str]] = {**MOVED_TEACHER_KEYS, **MOVED_BOUNDS}

    def __post_init__(self) -> None:
        if self.chat_template is None and self.chat_template_kwargs is not None:
            raise ValueError(
                f"chat_template_kwargs {dict(self.chat_template_kwargs)} need chat_template: "
                "true (chat_template: null takes the relay model's prompt format, kwargs "
                "included)"
            )
        if self.chat_template is not None:
            check_prompt_options(self.chat_template, self.chat_template_kwargs or {})
        plan_runs(self.modes, self.router_p)  # unknown modes fail here, naming the key
        if not self.modes:
            raise ValueError("modes is empty")
        if "random_router" in self.modes and not self.router_p:
            raise ValueError("random_router needs at least one router_p")
        if any(not 0.0 <= p <= 1.0 for p in self.router_p):
            raise ValueError(f"router_p values must be in [0, 1], got {self.router_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        check_dtype(self.dtype)
        server = self.teacher.server
        if server is not None and not server.params:
            raise ValueError(
                "teacher.server needs params (the served model's parameter count): the "
                "report's FLOPs and cost cannot read it from weights behind a server"
            )


@dataclass(frozen=True)
class Decoding:
    """The bounds and prompt format every mode decodes under, and where each came from."""

    bounds: RelayBounds
    prompt: PromptFormat
    bounds_from: str  # "evaluate.bounds" or the relay model's relay.json
    prompt_from: str  # "evaluate.chat_template" or the relay model's relay.json
    trained: RelayRecord | None  # the relay model's record, when it has one

    def to_json(self) -> dict[str, Any]:
        return {
            "bounds": self.bounds.relay_kwargs(),
            "bounds_from": self.bounds_from,
            "chat_template": self.prompt.chat_template,
            "chat_template_kwargs": dict(self.prompt.chat_template_kwargs),
            "prompt_from": self.prompt_from,
            "trained_bounds": (
                self.trained.bounds.relay_kwargs()
                if self.trained is not None and self.trained.bounds is not None
                else None
            ),
        }


def resolve_decoding(params: EvaluateParams) -> Decoding:
    """The bounds and prompt format: the params', or (null) the relay model's record. Fails,
    before any model is loaded, when a null one has no record to come from."""
    folder = Path(params.relay_model)
    record = read_relay_record(folder)
    path = str(folder / RELAY_RECORD)
    missing = []
    if params.bounds is None and (record is None or record.bounds is None):
        missing.append("evaluate.bounds")
    if params.chat_template is None and record is None:
        missing.append("evaluate.chat_template")
    if missing:
        why = (
            "it has no relay bounds (it was not trained by grpo)"
            if record is not None
            else "there is no such file (a relay model made before grpo wrote it, or not by grpo)"
        )
        raise StageInputError(
            f"{' and '.join(missing)} null: decode as the relay model was trained, by {path} "
            f"(evaluate.relay_model); but {why}. Re-run the grpo stage, or set "
            f"{' and '.join(missing)} (e.g. evaluate.bounds equal to grpo.bounds)"
        )
    if params.bounds is not None:
        bounds, bounds_from = params.bounds, "evaluate.bounds"
        trained = record.bounds if record is not None else None
        if trained is not None and trained != bounds:
            log.warning(
                "evaluate: decoding under evaluate.bounds (%s), not those %s was trained under "
                "(%s, %s)",
                bounds.describe(),
                params.relay_model,
                trained.describe(),
                path,
            )
    else:
        assert record is not None and record.bounds is not None
        bounds, bounds_from = record.bounds, path
    if params.chat_template is not None:
        prompt = PromptFormat(
            chat_template=params.chat_template,
            chat_template_kwargs=params.chat_template_kwargs or {},
        )
        prompt_from = "evaluate.chat_template"
        if record is not None and record.prompt.format_kwargs() != prompt.format_kwargs():
            log.warning(
                "evaluate: framing prompts as %s (evaluate.chat_template), not as %s was trained "
                "(%s, %s)",
                prompt.describe(),
                params.relay_model,
                record.prompt.describe(),
                path,
            )
    else:
        assert record is not None
        prompt, prompt_from = PromptFormat(**record.prompt.format_kwargs()), path
    log.info(
        "evaluate: bounds %s (from %s); prompts %s",
        bounds.describe(),
        bounds_from,
        prompt.describe(),
    )
    return Decoding(bounds, prompt, bounds_from, prompt_from, record)


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


def read_inputs(params: EvaluateParams) -> tuple[dict[str, list[Problem]], Decoding]:
    """Every input, checked before any model is loaded: the benchmark tables (returned), the
    students the modes use, in-process the teacher, and the bounds and prompt format (returned;
    from the relay model's relay.json where the params are null)."""
    benchmarks = load_benchmarks(params)
    paths = {"student": params.student, "warmup": params.warmup, "relay": params.relay_model}
    for role in sorted({r.student_role for r in plan_runs(params.modes, params.router_p)}):
        param, made_by = STUDENT_MAKERS[role]
        check_model_dir(paths[role], param=param, made_by=made_by)
    if not params.teacher.remote:
        check_model_dir(
            params.teacher.path, param="evaluate.teacher.path", made_by="the bootstrap stage"
        )
    return benchmarks, resolve_decoding(params)


def run(params: EvaluateParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    benchmarks, decoding = read_inputs(params)
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
    teacher = params.teacher.build(tok, device=params.device, dtype=params.dtype)
    decoders = {
        role: RelayDecoder(TransformersBackend(m.eval(), name=role), teacher.backend, tok)
        for role, m in student_models.items()
    }

    sampling = Sampling(temperature=params.temperature)
    config = RelayConfig(
        max_new_tokens=params.max_new_tokens,
        **decoding.bounds.relay_kwargs(),
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
            **decoding.prompt.format_kwargs(),
        )

    out = Path(params.out_dir)
    models = {
        "teacher": {
            "path": teacher.where,
            "params": (
                params.teacher.server.params
                if params.teacher.server is not None
                else count_parameters(teacher.model)
            ),
        },
        "students": students,
        "modes": {r.mode: r.student_role for r in runs},
        "decoding": decoding.to_json(),  # the bounds and prompt format, and where from
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
