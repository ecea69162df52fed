"""Stage ``evaluate``: every mode on every benchmark, one row per request.

Run: ``python -m relaypipe.stages.evaluate`` (reads ``params.yaml:evaluate``) or
``dvc repro evaluate``. Reads ``data/problems/benchmarks/*.parquet`` (ProblemSchema, all of them
unless ``benchmarks`` names some), the bootstrap student, the warmed-up student, the GRPO student
and the teacher. Writes ``data/eval/requests.parquet`` (EvalRequestSchema: tokens by source,
calls, teacher prefill with and without prefix caching, student prefill, latency, correctness)
and ``data/eval/models.json`` (which model each mode used and its parameter count, for FLOPs).
``report`` turns these into metrics.

Modes (relaypipe/evaluate/suite.py): student, warmup, relay, teacher_free, teacher,
random_router at each p of ``router_p``, and relay_sweep at each bias of ``call_bias_sweep``
(the relay mode again, under the same bounds and budgets, with that call bias: the relay's
accuracy-against-teacher-share curve, which the report sets beside the router's). Greedy by
default (``temperature: 0``), like the paper's reported numbers.

The oracle caller (relaypipe/evaluate/oracle.py), at each threshold tau of ``oracle_sweep``
(empty: off; not a mode of ``modes``): the bootstrap student decodes greedily and the teacher,
judging every step, writes the steps where it would have written another token and gives the
student's a probability below tau, under the relay's bounds and budgets. It peeks at the
teacher at every step, so it is no deployable caller: it is the reference for *where* to call,
the curve the report sets beside the relay's (rows of mode ``oracle``, requests.parquet
``oracle_tau``). It needs the teacher in-process (its probabilities at every step) and
``temperature: 0``.

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

Call bias (``RelayConfig.call_bias``, a logit bias on the relay student's ``<call>``; see
relaypipe/calibrate.py): the relay mode decodes with ``call_bias`` (default 0: the student as
trained). With ``calibrate.target_share`` set, the stage first *calibrates* it: it bisects for
the bias whose teacher share on the first ``calibrate.n_problems`` held-out problems
(``eval_problems``, data/problems/eval.parquet; never a benchmark) is within ``calibrate.tol``
of the target, then decodes the relay mode with that bias; a target out of reach is logged
and the closest bias used (``reached: false``). models.json records the bias and where it came
from (``decoding.call_bias``, ``decoding.call_bias_from``) and the calibration
(``decoding.calibration``: target, bias, share and accuracy on the held-out set, every point;
null when off), and the report sets the realised teacher share on each benchmark against the
target. The bias acts only in mode relay (the other modes' decodes make no honoured calls).
With ``calibrate.per_benchmark: true`` the stage calibrates one bias per benchmark instead, each
on the first ``calibrate.n_problems`` of that benchmark's calibration set
(``calibration_dir``/<name>.parquet: held-out problems of the benchmark's kind, written by
prepare for ``prepare.benchmarks[].calibration_n``), and decodes each benchmark's relay mode with
its own bias: the answer for a workload whose problems differ from the pooled held-out set's
(one bias calls less on short problems and more on long ones). models.json then records
``decoding.calibration_by_benchmark`` and ``decoding.call_bias_by_benchmark``.
The relay_sweep biases are absolute, with or without calibration: each replaces the relay's
bias for its run, it is not added to the calibrated one. Every row records the bias in effect
(requests.parquet ``call_bias``: the sweep value, the relay's applied bias, 0 elsewhere).

The teacher (``teacher: {path, server}``) is a model directory (in-process) or, with
``teacher.server``, a served model (vLLM, ``relaypipe serve``; see relaypipe/teacher.py): the
teacher-alone, relay and random-router modes then send every teacher turn to that server. A
served teacher's parameter count cannot be read from its weights, so ``teacher.server.params``
must give it (the report's FLOPs and cost need it).

A student may be served as well (``student_servers: {student, warmup, relay}``, each null or a
served model like ``teacher.server``: ``{url, model, http, params}``; see relaypipe/student.py):
the modes of that role (the table in relaypipe/evaluate/suite.py) then send every student turn
to the server. Its folder (``student``, ``warmup``, ``relay_model``) still holds its tokenizer
(the call tokens included) and relay.json, not its weights, and ``params`` gives its parameter
count.

Every input is checked before any model is loaded (relaypipe/stages/inputs.py): an empty
benchmark table is refused, and so is a missing or empty ``eval_problems`` when calibrating.
requests.parquet and models.json are published together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from relaypipe.bounds import (
    MOVED_BOUNDS,
    RELAY_RECORD,
    PromptFormat,
    RelayBounds,
    RelayRecord,
    bias_json,
    format_bias,
    read_relay_record,
)
from relaypipe.calibrate import CalibrationResult, calibrate
from relaypipe.evaluate.oracle import OracleLimits
from relaypipe.evaluate.suite import (
    ORACLE_ROLE,
    ModeRun,
    evaluate_benchmarks,
    evaluate_oracle,
    oracle_label,
    plan_runs,
)
from relaypipe.micro.models import count_parameters
from relaypipe.models import check_dtype, load_model
from relaypipe.publish import together
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import (
    EVAL_MODES,
    ORACLE_MODE,
    EvalRequestSchema,
    ProblemSchema,
    frame_to_problems,
)
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import MissingInputError, StageInputError, check_model_dir, check_table
from relaypipe.student import Student, StudentServer, build_student
from relaypipe.tasks.base import Problem, check_prompt_options
from relaypipe.teacher import MOVED_TEACHER_KEYS, TeacherSpec

log = logging.getLogger(__name__)


def _real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class CalibrateParams:
    """``evaluate.calibrate``: the relay mode's call bias, found for a target teacher share on
    held-out problems before the benchmarks are decoded (relaypipe/calibrate.py)."""

    target_share: float | None = None  # teacher tokens / generated tokens; null: off
    n_problems: int = 200  # the first N of evaluate.eval_problems
    tol: float = 0.01  # a share within this of the target is reached
    lo: float = -20.0  # the bias range searched
    hi: float = 20.0
    max_iters: int = 12  # bisection steps after the two ends
    min_step: float = 0.001  # stop when the bracket is narrower (the share jumps there)
    # one bias per benchmark, each on its calibration set (calibration_dir/<name>.parquet)
    # instead of one on eval_problems
    per_benchmark: bool = False

    def __post_init__(self) -> None:
        if self.target_share is not None and not (
            _real(self.target_share) and 0.0 <= self.target_share <= 1.0
        ):
            raise ValueError(f"target_share must be in [0, 1] or null, got {self.target_share}")
        if self.n_problems < 1:
            raise ValueError(f"n_problems must be >= 1, got {self.n_problems}")
        if not (_real(self.tol) and 0.0 < self.tol < 1.0):
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if not (_real(self.lo) and _real(self.hi) and self.lo < self.hi):
            raise ValueError(f"need finite lo < hi, got lo={self.lo}, hi={self.hi}")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if not (_real(self.min_step) and self.min_step > 0):
            raise ValueError(f"min_step must be > 0, got {self.min_step}")

    @property
    def on(self) -> bool:
        return self.target_share is not None


@dataclass(frozen=True)
class StudentServers:
    """``evaluate.student_servers``: a served model for a student role (null: the weights in
    the role's folder, in-process), named as ``teacher.server`` is (module docstring)."""

    student: StudentServer | None = None  # the bootstrap student (evaluate.student)
    warmup: StudentServer | None = None  # evaluate.warmup
    relay: StudentServer | None = None  # evaluate.relay_model

    def __post_init__(self) -> None:
        for role in ("student", "warmup", "relay"):
            server = getattr(self, role)
            if server is not None and not server.params:
                raise ValueError(
                    f"{role} needs params (the served model's parameter count): the report's "
                    "FLOPs and cost cannot read it from weights behind a server"
                )


@dataclass(frozen=True)
class EvaluateParams:
    modes: list[str] = field(default_factory=lambda: list(EVAL_MODES))
    router_p: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    # relay_sweep: one relay run per bias (finite; absolute, not relative to call_bias or the
    # calibrated bias): the relay's Pareto curve in the report
    call_bias_sweep: list[float] = field(default_factory=lambda: [-4.0, -2.0, 2.0, 4.0])
    # the oracle caller: one run per threshold tau in [0, 1] (0: never calls; >= 0.5: at every
    # step where the teacher would write another token); empty: off (module docstring)
    oracle_sweep: list[float] = field(default_factory=list)
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
    # a served model per student role (null each: in-process from the role's folder)
    student_servers: StudentServers = field(default_factory=StudentServers)
    # frame prompts with the tokenizer's chat template; None: as the relay model was trained
    chat_template: bool | None = None
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking
    # mode; None: {} with an explicit chat_template, else the relay model's
    chat_template_kwargs: dict[str, Any] | None = None
    # added to the relay student's <call> logit in mode relay (0: as trained; .inf / -.inf:
    # call whenever allowed / never); replaced by the calibrated bias when calibrate is on
    call_bias: float = 0.0
    # find the relay mode's call bias for calibrate.target_share first (null: off)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    eval_problems: str = "data/problems/eval.parquet"  # held-out problems calibrate decodes
    # with calibrate.per_benchmark: <name>.parquet per benchmark, its held-out problems
    calibration_dir: str = "data/problems/calibration"
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
        if "relay_sweep" in self.modes and not self.call_bias_sweep:
            raise ValueError("relay_sweep needs at least one call_bias_sweep value")
        bad = [b for b in self.call_bias_sweep if not _real(b)]
        if bad:
            raise ValueError(f"call_bias_sweep values must be finite numbers, got {bad}")
        if ORACLE_MODE in self.modes:
            raise ValueError(
                f"modes names {ORACLE_MODE!r}: the oracle caller is no decoder mode; it runs at "
                "each threshold of evaluate.oracle_sweep (empty: off)"
            )
        self.runs()  # unknown modes fail here, naming the key
        self._check_oracle()
        if not self.modes:
            raise ValueError("modes is empty")
        if "random_router" in self.modes and not self.router_p:
            raise ValueError("random_router needs at least one router_p")
        if any(not 0.0 <= p <= 1.0 for p in self.router_p):
            raise ValueError(f"router_p values must be in [0, 1], got {self.router_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        check_dtype(self.dtype)
        if math.isnan(self.call_bias):
            raise ValueError("call_bias must be a number, .inf or -.inf, got NaN")
        if self.calibrate.on:
            if self.call_bias != 0:
                raise ValueError(
                    f"call_bias {self.call_bias} and calibrate.target_share "
                    f"{self.calibrate.target_share} are both set: the calibration finds the "
                    "bias; set call_bias to 0 or calibrate.target_share to null"
                )
            if "relay" not in self.modes:
                raise ValueError(
                    "calibrate.target_share calibrates the relay mode's call bias, but modes "
                    "has no relay"
                )
        server = self.teacher.server
        if server is not None and not server.params:
            raise ValueError(
                "teacher.server needs params (the served model's parameter count): the "
                "report's FLOPs and cost cannot read it from weights behind a server"
            )

    def _check_oracle(self) -> None:
        bad = [t for t in self.oracle_sweep if not (_real(t) and 0.0 <= t <= 1.0)]
        if bad:
            raise ValueError(f"oracle_sweep values must be numbers in [0, 1], got {bad}")
        if not self.oracle_sweep:
            return
        if self.temperature != 0:
            raise ValueError(
                f"oracle_sweep needs temperature 0, got {self.temperature}: the oracle caller "
                "decodes greedily, and a sampled relay would not compare with it"
            )
        if self.teacher.server is not None:
            raise ValueError(
                "oracle_sweep needs the teacher in-process (teacher.server null): the oracle "
                "reads the teacher's probabilities at every step, which a server does not give"
            )
        if getattr(self.student_servers, ORACLE_ROLE) is not None:
            raise ValueError(
                f"oracle_sweep needs the {ORACLE_ROLE} in-process (student_servers."
                f"{ORACLE_ROLE} null): the oracle reads its probabilities at every step"
            )

    def runs(self) -> list[ModeRun]:
        """The decodes the modes ask for (router p and sweep biases expanded)."""
        return plan_runs(self.modes, self.router_p, self.call_bias_sweep)


@dataclass(frozen=True)
class Decoding:
    """The bounds and prompt format every mode decodes under, and where each came from."""

    bounds: RelayBounds
    prompt: PromptFormat
    bounds_from: str  # "evaluate.bounds" or the relay model's relay.json
    prompt_from: str  # "evaluate.chat_template" or the relay model's relay.json
    trained: RelayRecord | None  # the relay model's record, when it has one
    call_bias: float = 0.0  # mode relay's
    call_bias_from: str = "evaluate.call_bias"  # or "evaluate.calibrate(.per_benchmark)"
    calibration: CalibrationResult | None = None
    # calibrate.per_benchmark: each benchmark's calibration, whose bias its relay mode uses
    calibration_by_benchmark: dict[str, CalibrationResult] | None = None

    def relay_biases(self) -> dict[str, float] | None:
        """Mode relay's bias per benchmark, when calibrated per benchmark (else None: one)."""
        if self.calibration_by_benchmark is None:
            return None
        return {name: r.bias for name, r in self.calibration_by_benchmark.items()}

    def relay_biases_json(self) -> dict[str, float | str] | None:
        """:meth:`relay_biases` as JSON writes them (an infinite bias as "inf" / "-inf")."""
        biases = self.relay_biases()
        return None if biases is None else {k: bias_json(b) for k, b in biases.items()}

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
            "call_bias": bias_json(self.call_bias),  # "inf" / "-inf": JSON has no infinity
            "call_bias_from": self.call_bias_from,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "calibration_by_benchmark": (
                None
                if self.calibration_by_benchmark is None
                else {k: r.to_dict() for k, r in self.calibration_by_benchmark.items()}
            ),
            "call_bias_by_benchmark": self.relay_biases_json(),
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
    return Decoding(bounds, prompt, bounds_from, prompt_from, record, params.call_bias)


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


def student_roles(params: EvaluateParams) -> list[str]:
    """The students the runs decode with (the oracle's too, when it runs)."""
    roles = {r.student_role for r in params.runs()}
    if params.oracle_sweep:
        roles.add(ORACLE_ROLE)
    return sorted(roles)


@dataclass(frozen=True)
class HeldOut:
    """The problems calibrate decodes: ``pooled``, the first calibrate.n_problems of
    eval_problems; or (calibrate.per_benchmark) ``by_benchmark``, the first n_problems of each
    benchmark's calibration set. Both empty when calibrate is off."""

    pooled: list[Problem] = field(default_factory=list)
    by_benchmark: dict[str, list[Problem]] = field(default_factory=dict)


def load_held_out(params: EvaluateParams, names: list[str]) -> HeldOut:
    """The held-out problems (:class:`HeldOut`) for benchmarks ``names``, checked; nothing is
    read when calibrate is off."""
    spec = params.calibrate
    if not spec.on:
        return HeldOut()
    if not spec.per_benchmark:
        frame = check_table(
            params.eval_problems,
            ProblemSchema,
            param="evaluate.eval_problems",
            made_by="the prepare stage",
            empty="the prepare stage wrote no eval problems (prepare.n_eval); re-run prepare",
        )
        return HeldOut(pooled=frame_to_problems(frame)[: spec.n_problems])
    by_benchmark = {}
    for name in names:
        made_by = (
            f"the prepare stage, for prepare.benchmarks[{name}].calibration_n > 0 "
            "(calibrate.per_benchmark needs a calibration set per benchmark)"
        )
        frame = check_table(
            Path(params.calibration_dir) / f"{name}.parquet",
            ProblemSchema,
            param="evaluate.calibration_dir",
            made_by=made_by,
            empty=f"the prepare stage wrote an empty calibration set for {name}; re-run prepare",
        )
        by_benchmark[name] = frame_to_problems(frame)[: spec.n_problems]
    return HeldOut(by_benchmark=by_benchmark)


def read_inputs(
    params: EvaluateParams,
) -> tuple[dict[str, list[Problem]], Decoding, HeldOut]:
    """Every input, checked before any model is loaded: the benchmark tables (returned), the
    held-out problems when calibrating (returned, see load_held_out), the students the modes
    use, in-process the teacher, and the bounds and prompt format (returned; from the relay
    model's relay.json where the params are null)."""
    benchmarks = load_benchmarks(params)
    held_out = load_held_out(params, list(benchmarks))
    paths = {"student": params.student, "warmup": params.warmup, "relay": params.relay_model}
    for role in student_roles(params):
        param, made_by = STUDENT_MAKERS[role]
        served = getattr(params.student_servers, role) is not None
        check_model_dir(paths[role], param=param, made_by=made_by, weights=not served)
    if not params.teacher.remote:
        check_model_dir(
            params.teacher.path, param="evaluate.teacher.path", made_by="the bootstrap stage"
        )
    return benchmarks, resolve_decoding(params), held_out


def load_students(params: EvaluateParams, roles: list[str]) -> dict[str, Student]:
    """The student of each role: in-process from its folder, or its server (student_servers)
    speaking the tokenizer in its folder."""
    paths = {"student": params.student, "warmup": params.warmup, "relay": params.relay_model}
    out: dict[str, Student] = {}
    try:
        for role in roles:
            server = getattr(params.student_servers, role)
            if server is None:
                model, tok = load_model(paths[role], device=params.device, dtype=params.dtype)
                backend = TransformersBackend(model.eval(), name=role)
                out[role] = Student(backend, tok, model, paths[role])
                continue
            out[role] = build_student(
                paths[role],
                url=server.url,
                model_name=server.model,
                http=server.http,
                what=STUDENT_MAKERS[role][0],
            )
    except BaseException:
        for student in out.values():
            student.close()
        raise
    return out


@contextlib.contextmanager
def _closing(students: dict[str, Student]) -> Iterator[None]:
    """Close every student on the way out (a served one's HTTP client)."""
    try:
        yield
    finally:
        for student in students.values():
            student.close()


def calibrate_relay(
    params: EvaluateParams,
    decoder: RelayDecoder,
    held_out: list[Problem],
    config: RelayConfig,
    decoding: Decoding,
    benchmark: str | None = None,
) -> CalibrationResult:
    """The relay mode's call bias for ``calibrate.target_share`` on the held-out problems (of
    ``benchmark``, when calibrating per benchmark), decoded as the benchmarks will be
    (``config``, prompt format, batch size)."""
    spec = params.calibrate
    assert spec.target_share is not None
    which = f"{benchmark}'s calibration set" if benchmark else "held-out problems"
    log.info(
        "evaluate: calibrating the relay call bias to teacher share %g on %d of %s",
        spec.target_share,
        len(held_out),
        which,
    )
    result = calibrate(
        decoder,
        held_out,
        target_share=spec.target_share,
        config=dataclasses.replace(config, mode="relay"),
        lo=spec.lo,
        hi=spec.hi,
        tol=spec.tol,
        max_iters=spec.max_iters,
        min_step=spec.min_step,
        batch_size=params.batch_size,
        **decoding.prompt.format_kwargs(),
    )
    if result.reached:
        log.info("evaluate: %s%s", f"{benchmark}: " if benchmark else "", result.message)
    else:
        log.warning(
            "evaluate: calibration did not reach teacher share %g (%s); the relay mode decodes "
            "%s with the closest bias seen, %s (share %.4f on the %s)",
            spec.target_share,
            result.message,
            benchmark or "every benchmark",
            format_bias(result.bias),
            result.share,
            which,
        )
    return result


def run(params: EvaluateParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    benchmarks, decoding, held_out = read_inputs(params)
    runs = params.runs()
    roles = student_roles(params)

    loaded = load_students(params, roles)
    students = {}
    for role, student in loaded.items():
        server = getattr(params.student_servers, role)
        students[role] = {
            "path": student.where,
            "params": server.params if server else count_parameters(student.model),
        }
        tok = student.tokenizer
    # The students share one tokenizer (each stage starts from the previous one's): the
    # teacher must speak it (checked in-process; over HTTP it frames the ids it sends).
    try:
        teacher = params.teacher.build(tok, device=params.device, dtype=params.dtype)
    except BaseException:
        for student in loaded.values():
            student.close()
        raise
    decoders = {
        role: RelayDecoder(student.backend, teacher.backend, tok)
        for role, student in loaded.items()
    }

    sampling = Sampling(temperature=params.temperature)
    config = RelayConfig(
        max_new_tokens=params.max_new_tokens,
        **decoding.bounds.relay_kwargs(),
        student_sampling=sampling,
        teacher_sampling=sampling,
        seed=params.seed,
    )
    with teacher, _closing(loaded), torch.inference_mode():
        if params.calibrate.on and not params.calibrate.per_benchmark:
            result = calibrate_relay(params, decoders["relay"], held_out.pooled, config, decoding)
            decoding = dataclasses.replace(
                decoding,
                call_bias=result.bias,
                call_bias_from="evaluate.calibrate",
                calibration=result,
            )
        elif params.calibrate.on:
            by_benchmark = {
                name: calibrate_relay(params, decoders["relay"], problems, config, decoding, name)
                for name, problems in held_out.by_benchmark.items()
            }
            decoding = dataclasses.replace(
                decoding,
                call_bias_from="evaluate.calibrate.per_benchmark",
                calibration_by_benchmark=by_benchmark,
            )
        # the bias acts in decoder modes relay and fixed_help only: here, the relay mode
        config = dataclasses.replace(config, call_bias=decoding.call_bias)
        table = evaluate_benchmarks(
            benchmarks,
            runs,
            decoders,
            config,
            params.batch_size,
            relay_biases=decoding.relay_biases(),
            **decoding.prompt.format_kwargs(),
        )
        oracle_seconds = None
        if params.oracle_sweep:
            start = time.perf_counter()
            oracle = evaluate_oracle(
                benchmarks,
                params.oracle_sweep,
                loaded[ORACLE_ROLE].model,
                teacher.model,
                tok,
                OracleLimits.from_bounds(decoding.bounds, params.max_new_tokens),
                params.batch_size,
                **decoding.prompt.format_kwargs(),
            )
            oracle_seconds = round(time.perf_counter() - start, 1)
            log.info(
                "evaluate: the oracle caller at %d threshold(s) took %.1f s",
                len(set(params.oracle_sweep)),
                oracle_seconds,
            )
            table = pd.concat([table, oracle], ignore_index=True)

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
        "modes": {
            **{r.mode: r.student_role for r in runs},
            **({ORACLE_MODE: ORACLE_ROLE} if params.oracle_sweep else {}),
        },
        # the bounds, prompt format and relay call bias, where each came from, the calibration
        "decoding": decoding.to_json(),
    }
    # Both land together; the table is validated first: if it breaks its contract, nothing
    # (not even models.json) is written.
    with together() as pub:
        pub.table(table, out / "requests.parquet", EvalRequestSchema)
        pub.json(out / "models.json", models)
    summary: dict[str, Any] = {
        "requests": len(table),
        "benchmarks": {name: len(problems) for name, problems in benchmarks.items()},
        "runs": [
            *(r.label for r in runs),
            *(oracle_label(t) for t in sorted(set(map(float, params.oracle_sweep)))),
        ],
        "call_bias": bias_json(decoding.call_bias),
    }
    if decoding.calibration_by_benchmark is not None:
        summary["call_bias_by_benchmark"] = decoding.relay_biases_json()
    if oracle_seconds is not None:
        summary["oracle_seconds"] = oracle_seconds
    return summary


def main(argv: list[str] | None = None) -> None:
    log.info("evaluate: %s", run(stage_params("evaluate", EvaluateParams, argv)))


if __name__ == "__main__":
    main()
