"""Stage ``bootstrap``: make the student and the teacher, and measure them.

Run: ``python -m relaypipe.stages.bootstrap`` (reads ``params.yaml:bootstrap``), or
``dvc repro bootstrap``. Reads ``data/problems/{train,eval}.parquet``; writes
``data/models/student/``, ``data/models/teacher/`` (safetensors + tokenizer) and the metrics
``data/models/bootstrap.json`` (``student_accuracy``, ``teacher_accuracy``, ``n_eval``, sizes,
times; greedy decoding on the eval table).

Two kinds (``kind``):

* ``micro`` (the default): train a tiny student and a larger teacher from scratch on the
  task's worked solutions (needs ``student``/``teacher`` sizes and ``student_train``/
  ``teacher_train``). Not in the paper, which starts from pretrained Qwen3 models: it exists so
  the whole method runs on a laptop with no model hub.
* ``pretrained``: import ``student_source`` and ``teacher_source`` (each a model directory, a
  hub id, a ``.gguf`` file, or ``smollm2`` for the SmolLM2-135M-Instruct GGUF packaged on PyPI;
  see relaypipe/importing.py), with the call tokens added. ``student_train``/``teacher_train``
  are then optional: a short fine-tune on the task's worked solutions (e.g. to make a same-size
  teacher an expert on the task when no larger model is at hand). Instead of
  ``teacher_source``, ``teacher_server: {url, model, http, params}`` names a served teacher
  (vLLM; the same :class:`~relaypipe.teacher.TeacherServer` the later stages' ``teacher.server``
  is): its directory then holds only the tokenizer and ``remote_teacher.json``, its accuracy is
  measured through the server, and ``teacher_params`` in bootstrap.json is ``params``.

The measurement is the same for both kinds, with the prompt every later stage uses
(``chat_template``: the tokenizer's chat form, for instruct models). A pair that cannot be
graded (a model never writes a gradable final answer: ``<role>_answered`` = 0), a teacher right
on nothing, or a teacher no better than the student leaves nothing to relay: the stage then
fails, naming the param to change, and writes nothing (relaypipe/checks.py);
``allow_degenerate: true`` keeps the pair and records the findings under ``warnings``.

The problem tables (and, for kind pretrained, local model sources) are checked before any
work (relaypipe/stages/inputs.py); the pair and bootstrap.json are published together.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from relaypipe.checks import bootstrap_findings, enforce
from relaypipe.evaluate.run import solo_accuracies
from relaypipe.micro.bootstrap import BootstrapSpec, bootstrap_pair
from relaypipe.micro.models import ModelSize
from relaypipe.micro.train_lm import TrainSpec, train_causal_lm
from relaypipe.publish import together
from relaypipe.schemas import ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import check_model_dir, check_table
from relaypipe.tasks.base import Problem, check_prompt_options
from relaypipe.teacher import Teacher, TeacherServer

log = logging.getLogger(__name__)

KINDS = ("micro", "pretrained")


@dataclass(frozen=True)
class BootstrapParams:
    kind: str = "micro"  # micro (train from scratch) | pretrained (import)
    # micro: the model sizes (required); not used by pretrained
    student: ModelSize | None = None
    teacher: ModelSize | None = None
    # micro: training from scratch (required); pretrained: an optional task fine-tune
    student_train: TrainSpec | None = None
    teacher_train: TrainSpec | None = None
    # pretrained: a model directory, hub id, .gguf file or "smollm2"
    student_source: str | None = None
    teacher_source: str | None = None
    # pretrained: a served teacher instead of teacher_source (relaypipe/teacher.py)
    teacher_server: TeacherServer | None = None
    dtype: str = "float32"  # pretrained: weights are loaded, fine-tuned and saved in this dtype
    cache_dir: str | None = None  # where "smollm2" is cached (None: ~/.cache/relaypipe)
    device: str = "auto"  # pretrained: fine-tune and measure here (micro trains on the CPU)
    chat_template: bool = False  # frame prompts with the tokenizer's chat template
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 96
    eval_batch_size: int = 100
    eval_limit: int | None = None  # evaluate on the first N eval problems only (None: all)
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # true: a pair that cannot be graded or has no gap (relaypipe/checks.py) is kept, with
    # warnings in bootstrap.json and the report; false (default): the stage fails
    allow_degenerate: bool = False
    problems_dir: str = "data/problems"
    out_dir: str = "data/models"

    # the flat keys of a served teacher, now one section (the later stages': teacher.server)
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "teacher_url": "teacher_server.url",
        "teacher_model": "teacher_server.model",
        "teacher_http": "teacher_server.http",
    }

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "micro":
            missing = [
                name
                for name in ("student", "teacher", "student_train", "teacher_train")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"kind micro needs {', '.join(missing)}")
            # Refuse rather than ignore: a pretrained key under kind micro is a mistake.
            stray = [
                name
                for name in ("student_source", "teacher_source", "teacher_server")
                if getattr(self, name) is not None
            ]
            if stray:
                raise ValueError(f"{', '.join(stray)} belong(s) to kind pretrained, not micro")
            return
        if not self.student_source:
            raise ValueError("kind pretrained needs student_source")
        if bool(self.teacher_source) == (self.teacher_server is not None):
            raise ValueError(
                "kind pretrained needs exactly one of teacher_source and teacher_server"
            )
        stray = [name for name in ("student", "teacher") if getattr(self, name) is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} (model sizes) belong(s) to kind micro")
        if self.teacher_server is not None and self.teacher_train is not None:
            raise ValueError("teacher_train cannot fine-tune a served teacher (teacher_server)")


def _measure(
    decoder: Any, evaluation: list[Problem], params: BootstrapParams
) -> dict[str, float | int]:
    """Greedy accuracy of each model alone on the eval problems (modes student, teacher)."""
    return solo_accuracies(
        decoder,
        evaluation,
        max_new_tokens=params.max_new_tokens,
        seed=params.seed,
        batch_size=params.eval_batch_size,
        chat_template=params.chat_template,
        chat_template_kwargs=params.chat_template_kwargs,
    )


def _fine_tune(
    role: str, model: Any, tok: Any, train: list[Problem], spec: TrainSpec, params: BootstrapParams
) -> dict[str, float]:
    """Fine-tune an imported model on the task's worked solutions; its metrics."""
    result = train_causal_lm(
        model,
        tok,
        train,
        spec,
        desc=f"fine-tune {role}",
        chat_template=params.chat_template,
        chat_template_kwargs=params.chat_template_kwargs,
    )
    return {
        f"{role}_train_seconds": round(result["seconds"], 1),
        f"{role}_final_loss": round(result["loss"], 5),
    }


def _local_teacher(
    params: BootstrapParams,
    student: Any,
    tok: Any,
    s_info: Any,
    train: list[Problem],
    device: Any,
    metrics: dict[str, Any],
    **kw: Any,
) -> Teacher:
    """Import (or reuse) the in-process teacher, fine-tune it if asked, save it."""
    from relaypipe.importing import load_for_import, save_import
    from relaypipe.relay.transformers_backend import TransformersBackend
    from relaypipe.teacher import check_same_tokenizer

    assert params.teacher_source is not None
    # The same untouched source twice (SmolLM2 as both, say) is loaded once: same weights.
    same = (
        params.teacher_source == params.student_source
        and params.student_train is None
        and params.teacher_train is None
    )
    if same:
        t_model, t_tok, t_info = student, tok, s_info
    else:
        t_model, t_tok, t_info = load_for_import(params.teacher_source, **kw)
        check_same_tokenizer(tok, t_tok)
        t_model.to(device)
    metrics["teacher_params"] = t_info.parameters
    metrics["teacher_import_seconds"] = 0.0 if same else t_info.load_seconds
    if params.teacher_train is not None:
        metrics |= _fine_tune("teacher", t_model, t_tok, train, params.teacher_train, params)
    save_import(t_model, t_tok, t_info, Path(params.out_dir) / "teacher")
    return Teacher(TransformersBackend(t_model.eval(), name="teacher"), tok, t_model)


def run_pretrained(
    params: BootstrapParams, train: list[Problem], evaluation: list[Problem]
) -> dict[str, Any]:
    """Import (and optionally fine-tune) the pair, save it, measure it."""
    from relaypipe.importing import load_for_import, save_import
    from relaypipe.models import pick_device
    from relaypipe.relay.decoder import RelayDecoder
    from relaypipe.relay.transformers_backend import TransformersBackend
    from relaypipe.teacher import build_teacher, write_remote_teacher_dir

    assert params.student_source is not None  # checked in __post_init__
    out = Path(params.out_dir)
    device = pick_device(params.device)
    kw = {"dtype": params.dtype, "cache_dir": params.cache_dir}
    metrics: dict[str, Any] = {}

    student, tok, s_info = load_for_import(params.student_source, **kw)
    metrics["student_params"] = s_info.parameters
    metrics["student_import_seconds"] = s_info.load_seconds
    served = None
    server = params.teacher_server
    if server is not None:
        # Reach the server before any fine-tuning or writing: a wrong URL fails in seconds.
        served = build_teacher(None, tok, url=server.url, model_name=server.model, http=server.http)
    try:
        student.to(device)
        if params.student_train is not None:
            metrics |= _fine_tune("student", student, tok, train, params.student_train, params)
        save_import(student, tok, s_info, out / "student")
        if served is not None:
            assert server is not None
            write_remote_teacher_dir(out / "teacher", tok, server.url, server.model)
            # behind the server, not ours to count: as teacher_server.params says, if it does
            metrics["teacher_params"] = server.params
            teacher = served
        else:
            teacher = _local_teacher(params, student, tok, s_info, train, device, metrics, **kw)
    except BaseException:
        if served is not None:
            served.close()
        raise

    with teacher:
        s_backend = TransformersBackend(student.eval(), name="student")
        decoder = RelayDecoder(s_backend, teacher.backend, tok)
        metrics |= _measure(decoder, evaluation, params)
    return metrics


def read_inputs(params: BootstrapParams) -> tuple[list[Problem], list[Problem]]:
    """The train and eval problems (each checked: present, valid, not empty) and, for kind
    pretrained, the local model sources: all before anything is trained or written."""
    problems = Path(params.problems_dir)
    tables = []
    for split, n in (("train", "n_train"), ("eval", "n_eval")):
        frame = check_table(
            problems / f"{split}.parquet",
            ProblemSchema,
            param="bootstrap.problems_dir",
            made_by="the prepare stage",
            empty=f"the prepare stage wrote no {split} problem (prepare.{n}); re-run prepare",
        )
        tables.append(frame_to_problems(frame))
    train, evaluation = tables
    if params.kind == "pretrained":
        for name in ("student_source", "teacher_source"):
            source = getattr(params, name)
            if source:
                check_model_dir(
                    source,
                    param=f"bootstrap.{name}",
                    made_by="relaypipe import",
                    fix=(
                        f"bootstrap.{name} names a model folder, a hub id, a .gguf file or "
                        "smollm2; `relaypipe import` makes a complete folder"
                    ),
                )
    return train, evaluation


def run(params: BootstrapParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    train, evaluation = read_inputs(params)
    if params.eval_limit:
        evaluation = evaluation[: params.eval_limit]
    t = time.perf_counter()
    out = Path(params.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The pair is made in a hidden staging folder beside out_dir; it is published with
    # bootstrap.json (all three together) only once the checks pass: a refused pair
    # (relaypipe/checks.py) or a failure anywhere leaves the previous outputs untouched.
    staging = tempfile.TemporaryDirectory(prefix=f".{out.name}.bootstrap-", dir=out.parent)
    with staging, together() as pub:
        metrics = _make_pair(replace(params, out_dir=staging.name), train, evaluation)
        metrics["total_seconds"] = round(time.perf_counter() - t, 1)
        findings = bootstrap_findings(metrics, kind=params.kind, where=str(out))
        metrics["warnings"] = enforce(findings, stage="bootstrap", allow=params.allow_degenerate)
        for role in ("student", "teacher"):
            os.replace(Path(staging.name) / role, pub.directory(out / role))
        pub.json(out / "bootstrap.json", metrics)
    return metrics


def _make_pair(params: BootstrapParams, train: list[Problem], evaluation: list[Problem]) -> dict:
    """Make (or import), save under ``params.out_dir`` and measure the pair, by ``kind``."""
    if params.kind == "pretrained":
        metrics = run_pretrained(params, train, evaluation)
    else:
        assert params.student and params.teacher  # checked in __post_init__
        assert params.student_train and params.teacher_train
        spec = BootstrapSpec(
            student=params.student,
            teacher=params.teacher,
            student_train=params.student_train,
            teacher_train=params.teacher_train,
            max_new_tokens=params.max_new_tokens,
            eval_batch_size=params.eval_batch_size,
            seed=params.seed,
        )
        metrics = bootstrap_pair(train, evaluation, spec, Path(params.out_dir))
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("bootstrap: %s", run(stage_params("bootstrap", BootstrapParams, argv)))


if __name__ == "__main__":
    main()
