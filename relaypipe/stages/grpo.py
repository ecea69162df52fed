"""Stage ``grpo``: teach the warmed-up student when and how long to call (trl ``GRPOTrainer``).

Run: ``python -m relaypipe.stages.grpo`` (reads ``params.yaml:grpo``) or ``dvc repro grpo``.
Rollouts are relay decodes (the policy is the student, the teacher answers its calls; see
relaypipe/train/rollout.py); the reward is chosen by ``reward`` (``difficulty_aware``, the
paper's, judged per prompt group from delivered teacher tokens; ``accuracy``; or
``cost_penalised`` with a per-request teacher-token budget). ``mask_teacher_tokens`` keeps teacher
tokens out of the policy loss (the reference trains on them: set it false to reproduce that).
``params.yaml:grpo.trainer`` goes to trl's ``GRPOConfig`` as-is (checked when the params are
parsed, built before any model is loaded: relaypipe/train/trainer_args.py).
``num_processes > 1`` trains under ``accelerate launch`` (relaypipe/train/launch.py), each
process holding whole prompt groups. Checkpoints every
``save_steps`` in ``data/checkpoints/grpo``; a re-run resumes from the last one.
Writes ``data/models/relay/``, ``data/grpo/metrics.json`` (relay and teacher-free accuracy and
call ratio on eval problems, gap recovered) and DVCLive curves in ``data/grpo/live``.
The teacher (``teacher: {path, server}``) is a model directory or, with ``teacher.server``, a
served model (relaypipe/teacher.py: the paper's Qwen3-8B behind vLLM). ``bounds`` (relaypipe/
bounds.py) bound every rollout and the check. ``chat_template`` (and ``chat_template_kwargs``)
frame the rollout and check prompts; keep them equal to warmup_data's.
The model folder carries ``relay.json`` (relaypipe/bounds.py): the bounds, the prompt format and
``max_new_tokens`` it was trained with, which ``relaypipe decode/serve/bench`` and the evaluate
stage (``bounds: null``) decode it under by default.
A run in which no group's rewards ever differed (trl's ``frac_reward_zero_std`` = 1 at every
logged step: zero advantages) or that left every weight as it was fails before the model is
saved (relaypipe/checks.py; ``allow_degenerate: true`` keeps it, with ``warnings`` in
metrics.json). ``gap_recovered`` is null, with ``gap_recovered_note``, when the bootstrap
teacher is no better than the student.

Every input (bootstrap.json included) is checked before training (relaypipe/stages/inputs.py):
an empty kept table is refused, naming the filter's params. The model is saved to a staged
folder, checked from there, and published with metrics.json only once both exist.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset

from relaypipe.bounds import (
    MOVED_BOUNDS,
    TRAINING_RECORD,
    PromptFormat,
    RelayBounds,
    RelayRecord,
    read_relay_record,
    write_relay_record,
)
from relaypipe.checks import enforce, reward_findings, unchanged_findings, weights_digest
from relaypipe.config import ConfigError
from relaypipe.evaluate.run import decode_problems, summarize
from relaypipe.io import atomic_path, read_json, read_table, write_json
from relaypipe.models import check_dtype, load_model, pick_device, trainer_precision
from relaypipe.publish import staged_by_launcher, staged_for_launch, together
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import FilteredProblemSchema, ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import (
    MissingInputError,
    StageInputError,
    check_json,
    check_model_dir,
    check_table,
)
from relaypipe.tasks.base import Problem, check_prompt_options, format_prompt
from relaypipe.teacher import MOVED_TEACHER_KEYS, Teacher, TeacherSpec
from relaypipe.train.checkpoints import LiveCallback, file_digest, training_live
from relaypipe.train.launch import (
    check_num_processes,
    hand_back,
    launched,
    process_device,
    resume_point,
    train_in_processes,
)
from relaypipe.train.rewards import reward_by_name
from relaypipe.train.rollout import make_relay_rollout
from relaypipe.train.trainer_args import build_trainer_config, check_trainer_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GRPOParams:
    trainer: dict[str, Any] = field(default_factory=dict)  # trl GRPOConfig fields, passed through
    # > 1: train in that many processes under `accelerate launch` (one per GPU)
    num_processes: int = 1
    bounds: RelayBounds = field(default_factory=RelayBounds)  # of every rollout and the check
    reward: str = "difficulty_aware"  # difficulty_aware | accuracy | cost_penalised
    cost_weight: float = 0.5  # cost_penalised: weight of the call ratio
    budget_penalty: float = 1.0  # cost_penalised: penalty when a budget refused a call
    pay_unfinished: bool = False  # difficulty_aware: true pays cut-off rollouts (the paper's table)
    mask_teacher_tokens: bool = True
    eval_n: int = 300
    # true: a run whose rewards never varied or that left the model unchanged is kept, with
    # warnings in metrics.json and the report; false (default): the stage fails before saving it
    allow_degenerate: bool = False
    eval_temperature: float = 0.0  # decoding of the post-training check (0 = greedy)
    max_new_tokens: int = 64
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (as saved) | float32 | bfloat16 | float16; trl follows
    eval_batch_size: int = 100  # requests decoded together in the post-training check
    threads: int | None = None
    problems: str = "data/filter/kept.parquet"
    eval_problems: str = "data/problems/eval.parquet"
    student: str = "data/models/warmup"
    # weights in teacher.path, or a served model (teacher.server; path: its tokenizer)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    chat_template: bool = False  # rollout/check prompts; keep equal to warmup_data's
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    bootstrap_metrics: str = "data/models/bootstrap.json"
    checkpoint_dir: str = "data/checkpoints/grpo"
    out_model: str = "data/models/relay"
    out_dir: str = "data/grpo"

    MOVED_KEYS: ClassVar[dict[str, str]] = {**MOVED_TEACHER_KEYS, **MOVED_BOUNDS}

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)
        check_dtype(self.dtype)
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
        from trl import GRPOConfig  # heavy import, only for this stage

        check_trainer_keys(self.trainer, GRPOConfig, "grpo")
        check_num_processes(self.num_processes, self.device)


def build_grpo_config(
    params: GRPOParams, device_type: str, *, precision: dict[str, bool] | None = None
) -> Any:
    """trl's ``GRPOConfig`` exactly as the stage trains with it: the stage's defaults, then
    ``grpo.trainer``, then ``precision`` (``trainer_precision`` of the loaded weights; before
    loading, None: bf16/fp16 only as ``grpo.trainer`` sets them).

    With several processes each one scores its own completions, and the difficulty-aware
    reward judges a prompt's ``num_generations`` completions together: a process must hold
    whole groups, which is checked here (trl alone would split them across processes).
    """
    from trl import GRPOConfig

    defaults = {
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "steps",
        **(precision or {"bf16": False, "fp16": False}),
        "disable_tqdm": False,
        "max_completion_length": params.max_new_tokens,
    }
    args = build_trainer_config(
        GRPOConfig,
        params.trainer,
        stage="grpo",
        output_dir=params.checkpoint_dir,
        device_type=device_type,
        defaults=defaults,
    )
    # Completions one process generates and scores at once. Built here as one process, trl
    # itself refuses a count that is not a multiple of num_generations, except when
    # generation_batch_size is given: that one is shared out among the processes.
    per_process = args.per_device_train_batch_size * args.steps_per_generation
    if params.trainer.get("generation_batch_size"):
        per_process = params.trainer["generation_batch_size"] // params.num_processes
    if (
        params.num_processes > 1
        and params.reward == "difficulty_aware"
        and per_process % args.num_generations
    ):
        raise ConfigError(
            f"grpo.trainer: each of the {params.num_processes} processes (grpo.num_processes) "
            f"scores {per_process} completions at a time (generation_batch_size shared out), "
            f"not a multiple of num_generations = {args.num_generations}: prompt groups would "
            "be split across processes and the difficulty-aware reward would judge each from "
            "part of its group. Make generation_batch_size / num_processes a multiple of "
            "num_generations"
        )
    return args


def load_teacher(params: GRPOParams, tokenizer: Any, device: str | None = None) -> Teacher:
    """The teacher the params name: in-process weights (on ``device``, default the stage's)
    or a served model."""
    return params.teacher.build(tokenizer, device=device or params.device, dtype=params.dtype)


def relay_config(params: GRPOParams, mode: str = "relay") -> RelayConfig:
    return RelayConfig(
        mode=mode,
        max_new_tokens=params.max_new_tokens,
        student_sampling=Sampling(temperature=params.eval_temperature),
        **params.bounds.relay_kwargs(),
    )


def prompt_format(params: GRPOParams) -> PromptFormat:
    return PromptFormat(
        chat_template=params.chat_template, chat_template_kwargs=params.chat_template_kwargs
    )


def relay_record(params: GRPOParams) -> RelayRecord:
    """What the trained model's ``relay.json`` says (relaypipe/bounds.py)."""
    return RelayRecord(
        stage="grpo",
        prompt=prompt_format(params),
        bounds=params.bounds,
        max_new_tokens=params.max_new_tokens,
    )


def save_model(params: GRPOParams, model: Any, tok: Any, folder: str | Path) -> None:
    """The weights, the tokenizer and ``relay.json``, into ``folder`` (a staged one)."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_relay_record(folder, relay_record(params))


def train_grpo(params: GRPOParams, save_to: Path | None = None) -> list[str]:
    """Train, check that the rewards varied and the model changed, save it; the warnings.

    ``save_to``: an empty staged folder (relaypipe/publish.py) that :func:`run` publishes as
    ``out_model`` together with the metrics; without it (and outside a launch that passes
    one), the model is written straight to ``out_model`` and the checkpoints removed.
    In several processes (launched by :func:`run`), each decodes and scores its own prompt
    groups; only the main one writes the checkpoint fingerprint, the curves and the model."""
    from trl import GRPOTrainer  # heavy import, only for this stage

    device = pick_device(process_device(params.device))
    build_grpo_config(params, device.type)  # every trainer key and value, before any model
    table = read_table(params.problems, FilteredProblemSchema)
    model, tok = load_model(params.student, device=str(device), dtype=params.dtype)
    teacher = load_teacher(params, tok, device=str(device))
    fingerprint = {
        # allow_degenerate decides only what happens after training: a refused run resumes
        "params": {k: v for k, v in asdict(params).items() if k != "allow_degenerate"},
        "problems": file_digest(params.problems),
        "student": file_digest(params.student),
        "teacher": file_digest(params.teacher.path),
    }
    args = build_grpo_config(
        params, device.type, precision=trainer_precision(model, params.trainer, "grpo")
    )
    resume = resume_point(args, params.checkpoint_dir, fingerprint)
    main = args.process_index == 0
    dataset = Dataset.from_dict(
        {
            "prompt": [
                format_prompt(
                    q,
                    tok,
                    chat_template=params.chat_template,
                    chat_template_kwargs=params.chat_template_kwargs,
                )
                for q in table.question
            ],
            "answer": list(table.answer),
            "problem_id": list(table.problem_id),
        }
    )
    rollout = make_relay_rollout(
        teacher.backend,
        tok,
        relay_config(params),
        mask_teacher_tokens=params.mask_teacher_tokens,
    )
    live = training_live(params.out_dir, resume) if main else None
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[
            reward_by_name(
                params.reward, params.cost_weight, params.budget_penalty, params.pay_unfinished
            )
        ],
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        rollout_func=rollout,
        callbacks=[LiveCallback(live)] if live else [],
    )
    before = weights_digest(model)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        teacher.close()
    curves = Path(params.out_dir) / "live"
    findings = reward_findings(trainer.state.log_history, where=str(curves))
    findings += unchanged_findings(
        before,
        weights_digest(trainer.model),
        stage="grpo",
        source=params.student,
        target=params.out_model,
    )
    kept = f" (the curves of this run are in {curves})"
    warnings = enforce(findings, stage="grpo", allow=params.allow_degenerate, kept=kept)
    if main:
        save_to = save_to or (staged_by_launcher() if launched() else None)
        if save_to is not None:  # published by run(), which then removes the checkpoints
            save_model(params, trainer.model, tok, save_to)
        else:
            with atomic_path(params.out_model, directory=True) as tmp:
                save_model(params, trainer.model, tok, tmp)
            shutil.rmtree(params.checkpoint_dir, ignore_errors=True)
    return warnings


def read_inputs(params: GRPOParams) -> tuple[list[Problem], dict[str, Any]]:
    """Check every input before training: the kept problems, the warmed-up student, the
    teacher, the eval problems and the bootstrap metrics. Returns the eval problems (the first
    ``eval_n``) and the bootstrap metrics, which the check after training uses."""
    check_table(
        params.problems,
        FilteredProblemSchema,
        param="grpo.problems",
        made_by="the filter stage",
        empty=(
            "the filter stage kept no problem: the teacher solved none of the problems it was "
            f"given in filter.k samples (see {Path(params.problems).parent / 'metrics.json'}; "
            "raise filter.k, filter.n_problems or filter.max_new_tokens, or train a stronger "
            "teacher, bootstrap.teacher_train); training on it would take 0 steps"
        ),
    )
    check_model_dir(params.student, param="grpo.student", made_by="the sft stage")
    warmed = read_relay_record(params.student)
    ours = prompt_format(params)
    if warmed is not None and warmed.prompt.format_kwargs() != ours.format_kwargs():
        log.warning(
            "grpo: %s was warmed up with prompts framed as %s, but grpo.chat_template and "
            "grpo.chat_template_kwargs frame them as %s: keep them equal to warmup_data's",
            params.student,
            warmed.prompt.describe(),
            ours.describe(),
        )
    if params.teacher.remote:
        # only read for the checkpoint fingerprint (the server holds the weights)
        if not Path(params.teacher.path).exists():
            raise MissingInputError(
                f"{params.teacher.path} (grpo.teacher.path): not found; it is written by the "
                "bootstrap stage (with teacher.server: the served teacher's tokenizer folder)"
            )
    else:
        check_model_dir(
            params.teacher.path, param="grpo.teacher.path", made_by="the bootstrap stage"
        )
    frame = check_table(
        params.eval_problems,
        ProblemSchema,
        param="grpo.eval_problems",
        made_by="the prepare stage",
        empty="the prepare stage wrote no eval problem (prepare.n_eval); re-run prepare",
    )
    if params.eval_n < 1:
        raise StageInputError(f"grpo.eval_n = {params.eval_n}: the check needs at least 1 problem")
    boot = check_json(
        params.bootstrap_metrics,
        param="grpo.bootstrap_metrics",
        made_by="the bootstrap stage",
        numbers=("student_accuracy", "teacher_accuracy"),
    )
    return frame_to_problems(frame)[: params.eval_n], boot


def check_relay(
    params: GRPOParams,
    model: str | Path | None = None,
    problems: list[Problem] | None = None,
    boot: dict[str, Any] | None = None,
) -> dict:
    """Relay and teacher-free accuracy of the trained student on held-out problems.

    ``model``: the trained model's folder (default ``out_model``); ``problems`` and ``boot``:
    the eval problems and bootstrap metrics already read (default: read them here)."""
    if problems is None:
        frame = read_table(params.eval_problems, ProblemSchema)
        problems = frame_to_problems(frame)[: params.eval_n]
    if boot is None:
        boot = read_json(params.bootstrap_metrics)
    student, tok = load_model(
        str(model or params.out_model), device=params.device, dtype=params.dtype
    )
    metrics: dict[str, Any] = {}
    with load_teacher(params, tok) as teacher:
        dec = RelayDecoder(TransformersBackend(student), teacher.backend, tok)
        for mode in ("relay", "student"):
            graded = decode_problems(
                dec,
                problems,
                relay_config(params, mode),
                batch_size=params.eval_batch_size,
                chat_template=params.chat_template,
                chat_template_kwargs=params.chat_template_kwargs,
            )
            metrics["teacher_free" if mode == "student" else mode] = summarize(graded)
    gap = boot["teacher_accuracy"] - boot["student_accuracy"]
    metrics["gap_recovered"] = None  # a teacher no better than the student leaves no gap
    if gap > 0:
        metrics["gap_recovered"] = round(
            (metrics["relay"]["accuracy"] - boot["student_accuracy"]) / gap, 4
        )
    else:
        metrics["gap_recovered_note"] = (
            f"the teacher ({boot['teacher_accuracy']}) is not more accurate than the student "
            f"({boot['student_accuracy']}) in {params.bootstrap_metrics}: no gap to recover"
        )
    return metrics


def run(params: GRPOParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    if launched():  # one of the processes started below: train, hand back the warnings
        hand_back(train_grpo(params))
        return {}
    # Everything that can be checked before training: the trainer config, then every input.
    build_grpo_config(params, pick_device(params.device).type)
    problems, boot = read_inputs(params)
    # The model is saved into a staged folder, checked from there, and published with
    # metrics.json only once both exist: a failure anywhere leaves the previous model and
    # metrics as they were (the curves in out_dir/live record every run, failed ones too).
    with together() as pub:
        staged = pub.directory(params.out_model)
        if params.num_processes > 1:
            with staged_for_launch(staged):
                warnings = train_in_processes(
                    "relaypipe.stages.grpo", "grpo", params, params.num_processes
                )
        else:
            warnings = train_grpo(params, save_to=staged)
        metrics = check_relay(params, staged, problems, boot)
        metrics["warnings"] = warnings
        pub.json(Path(params.out_dir) / "metrics.json", metrics)
        # the model carries the metrics of the training that made it (the report reads them
        # from there, so it depends on the model folder evaluate reads anyway)
        write_json(staged / TRAINING_RECORD, metrics)
    shutil.rmtree(params.checkpoint_dir, ignore_errors=True)  # published: nothing to resume
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("grpo: %s", run(stage_params("grpo", GRPOParams, argv)))


if __name__ == "__main__":
    main()
