"""Stage ``sft``: warm up the student on its own answers with commands (trl ``SFTTrainer``).

Run: ``python -m relaypipe.stages.sft`` (reads ``params.yaml:sft``) or ``dvc repro sft``.
Loss on the completion only; ``params.yaml:sft.trainer`` is passed to trl's ``SFTConfig``
as-is: its keys are checked when the params are parsed and the whole config is built before
any model is loaded (relaypipe/train/trainer_args.py). ``max_length`` is fitted to the longest
row (prompt + completion + EOS) unless set; a value that would cut a row fails, naming it.
``num_processes > 1`` trains under ``accelerate launch`` (relaypipe/train/launch.py); the
check after training runs in this process. Checkpoints go to ``data/checkpoints/sft`` every
``save_steps``; re-running after a crash or Ctrl-C resumes from the last one when params and
inputs are unchanged.
Writes ``data/models/warmup/``, ``data/sft/metrics.json`` (command parse rate and teacher-free
accuracy against the bootstrap student, on eval problems) and DVCLive curves in ``data/sft/live``.
The check's teacher (``teacher: {path, server}``) is a model directory or, with
``teacher.server``, a served model (relaypipe/teacher.py). ``chat_template`` must match
warmup_data's: the training prompts come from its table, the check's prompts from
:func:`relaypipe.tasks.base.format_prompt` (with ``chat_template_kwargs``, equal to warmup_data's
too). The model folder carries ``relay.json`` (relaypipe/bounds.py): that prompt format, so that
``relaypipe decode`` and friends frame questions as the model was trained; no relay bounds (SFT
trains under none; the check decodes under the decoder's defaults).
A training run that leaves every weight as it was fails before the model is saved
(relaypipe/checks.py; ``allow_degenerate: true`` keeps it, with ``warnings`` in metrics.json).

Every input is checked before training (relaypipe/stages/inputs.py); the model is saved to a
staged folder, checked from there, and published with metrics.json only once both exist
(relaypipe/publish.py).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from relaypipe.bounds import TRAINING_RECORD, PromptFormat, RelayRecord, write_relay_record
from relaypipe.checks import enforce, unchanged_findings, weights_digest
from relaypipe.evaluate.run import decode_problems, summarize
from relaypipe.io import atomic_path, read_table, write_json
from relaypipe.models import check_dtype, load_model, load_tokenizer, pick_device, trainer_precision
from relaypipe.publish import staged_by_launcher, staged_for_launch, together
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import ProblemSchema, SFTExampleSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import StageInputError, check_model_dir, check_table
from relaypipe.tasks.base import Problem, check_prompt_options
from relaypipe.teacher import MOVED_TEACHER_KEYS, TeacherSpec
from relaypipe.train.checkpoints import LiveCallback, file_digest, training_live
from relaypipe.train.launch import (
    check_num_processes,
    hand_back,
    launched,
    process_device,
    resume_point,
    train_in_processes,
)
from relaypipe.train.trainer_args import (
    build_trainer_config,
    check_trainer_keys,
    example_lengths,
    fit_max_length,
)
from relaypipe.train.warmup import TEACHER_WRITTEN, teacher_token_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTParams:
    trainer: dict[str, Any] = field(default_factory=dict)  # trl SFTConfig fields, passed through
    # > 1: train in that many processes under `accelerate launch` (one per GPU)
    num_processes: int = 1
    eval_n: int = 200  # eval problems for the post-training check
    # true: a model that training left unchanged is kept, with warnings in metrics.json and the
    # report; false (default): the stage fails before saving it (relaypipe/checks.py)
    allow_degenerate: bool = False
    max_new_tokens: int = 96
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (as saved) | float32 | bfloat16 | float16; trl follows
    eval_batch_size: int = 100  # requests decoded together in the post-training check
    threads: int | None = None
    data: str = "data/warmup/sft.parquet"
    student: str = "data/models/student"
    # the check's teacher: weights in teacher.path, or a served model (teacher.server)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    chat_template: bool = False  # the check's prompts; keep equal to warmup_data.chat_template
    # variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_problems: str = "data/problems/eval.parquet"
    checkpoint_dir: str = "data/checkpoints/sft"
    out_model: str = "data/models/warmup"
    out_dir: str = "data/sft"

    MOVED_KEYS: ClassVar[dict[str, str]] = MOVED_TEACHER_KEYS

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)
        check_dtype(self.dtype)
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check_trainer_keys(self.trainer, SFTConfig, "sft")
        check_num_processes(self.num_processes, self.device)


def build_sft_config(
    params: SFTParams,
    device_type: str,
    *,
    precision: dict[str, bool] | None = None,
    max_length: int | None = None,
) -> SFTConfig:
    """trl's ``SFTConfig`` exactly as the stage trains with it: the stage's defaults, then
    ``sft.trainer``, then what the stage worked out: ``precision`` (``trainer_precision`` of the
    loaded weights; before loading, None: bf16/fp16 only as ``sft.trainer`` sets them) and the
    ``max_length`` fitted to the table (:func:`prepare_sft`)."""
    defaults = {
        "report_to": [],
        "save_strategy": "steps",
        "logging_steps": 10,
        **(precision or {"bf16": False, "fp16": False}),
        "completion_only_loss": True,
        "disable_tqdm": False,
    }
    return build_trainer_config(
        SFTConfig,
        params.trainer,
        stage="sft",
        output_dir=params.checkpoint_dir,
        device_type=device_type,
        defaults=defaults,
        overrides=None if max_length is None else {"max_length": max_length},
    )


def prepare_sft(params: SFTParams, device_type: str) -> tuple[pd.DataFrame, int | None]:
    """What can fail before a model is loaded: the trainer config (built once to check every
    key and value), the table, and a ``max_length`` that holds its longest row (trl's default
    of 1024 would cut long rows before their answer and EOS). The table and that max_length."""
    build_sft_config(params, device_type)
    table = read_table(params.data, SFTExampleSchema)
    lengths = example_lengths(
        list(table.prompt), list(table.completion), load_tokenizer(params.student)
    )
    return table, fit_max_length(params.trainer, lengths, params.data)


def sft_dataset(table: pd.DataFrame, tok: Any) -> Dataset:
    """trl's training rows: prompt/completion text, or, when some rows' called tokens were
    written by the teacher (policy ``mistakes``), token ids with a ``completion_mask`` that
    keeps those tokens out of the loss, as GRPO's ``env_mask`` does: the student learns where
    to ask, not the answers it asks for. Prompts are tokenized as every decode does (no added
    special tokens); trl appends nothing to pre-tokenized rows, so the EOS is added here."""
    if not table.policy.isin(TEACHER_WRITTEN).any():
        return Dataset.from_pandas(table[["prompt", "completion"]], preserve_index=False)
    open_id, close_id = tok.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
    ids, masks = [], []
    for prompt, completion, policy in zip(
        table.prompt, table.completion, table.policy, strict=True
    ):
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        completion_ids = [*tok(completion, add_special_tokens=False).input_ids, tok.eos_token_id]
        mask = (
            teacher_token_mask(completion_ids, open_id, close_id, tok.decode)
            if policy in TEACHER_WRITTEN
            else [1] * len(completion_ids)
        )
        ids.append(prompt_ids + completion_ids)
        masks.append([0] * len(prompt_ids) + mask)
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def make_sft_trainer(
    model: Any, tok: Any, table: pd.DataFrame, args: SFTConfig, callbacks: list[Any] | None = None
) -> SFTTrainer:
    """The trainer on the table's rows (loss on the completion only; :func:`sft_dataset`)."""
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(table, tok),
        processing_class=tok,
        callbacks=callbacks or [],
    )


def train_sft(params: SFTParams, save_to: Path | None = None) -> list[str]:
    """Train, check that training changed the model, save it; the warnings to record.

    ``save_to``: an empty staged folder (relaypipe/publish.py) that :func:`run` publishes as
    ``out_model`` together with the metrics; without it (and outside a launch that passes
    one), the model is written straight to ``out_model`` and the checkpoints removed.
    In several processes (launched by :func:`run`), each trains on its share of every batch
    and only the main one writes the checkpoint fingerprint, the curves and the model."""
    device = pick_device(process_device(params.device))
    table, max_length = prepare_sft(params, device.type)
    model, tok = load_model(params.student, device=str(device), dtype=params.dtype)
    fingerprint = {
        # allow_degenerate decides only what happens after training: a refused run resumes
        "params": {k: v for k, v in asdict(params).items() if k != "allow_degenerate"},
        "data": file_digest(params.data),
        "student": file_digest(params.student),
    }
    args = build_sft_config(
        params,
        device.type,
        precision=trainer_precision(model, params.trainer, "sft"),  # bf16/fp16 from the weights
        max_length=max_length,
    )
    resume = resume_point(args, params.checkpoint_dir, fingerprint)
    main = args.process_index == 0
    live = training_live(params.out_dir, resume) if main else None
    trainer = make_sft_trainer(
        model, tok, table, args, callbacks=[LiveCallback(live)] if live else None
    )
    before = weights_digest(model)
    trainer.train(resume_from_checkpoint=resume)  # LiveCallback ends the curves' Live
    after = weights_digest(trainer.model)
    findings = unchanged_findings(
        before, after, stage="sft", source=params.student, target=params.out_model
    )
    kept = f" (the curves of this run are in {Path(params.out_dir) / 'live'})"
    warnings = enforce(findings, stage="sft", allow=params.allow_degenerate, kept=kept)
    if main:
        save_to = save_to or (staged_by_launcher() if launched() else None)
        if save_to is not None:  # published by run(), which then removes the checkpoints
            save_model(params, trainer.model, tok, save_to)
        else:
            with atomic_path(params.out_model, directory=True) as tmp:
                save_model(params, trainer.model, tok, tmp)
            shutil.rmtree(params.checkpoint_dir, ignore_errors=True)
    return warnings


def relay_record(params: SFTParams) -> RelayRecord:
    """What the warmed-up model's ``relay.json`` says: the prompt format, no bounds."""
    prompt = PromptFormat(
        chat_template=params.chat_template, chat_template_kwargs=params.chat_template_kwargs
    )
    return RelayRecord(stage="sft", prompt=prompt, bounds=None, max_new_tokens=None)


def save_model(params: SFTParams, model: Any, tok: Any, folder: str | Path) -> None:
    """The weights, the tokenizer and ``relay.json``, into ``folder`` (a staged one)."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_relay_record(folder, relay_record(params))


def read_inputs(params: SFTParams) -> list[Problem]:
    """Check every input before training: the warm-up table, the student (and in-process
    teacher) folders and the eval problems, which it returns (the first ``eval_n``)."""
    check_table(
        params.data,
        SFTExampleSchema,
        param="sft.data",
        made_by="the warmup_data stage",
        empty=(
            "the warmup_data stage kept no warm-up example (its student solved none of the "
            "sampled problems: raise warmup_data.n_problems or warmup_data.samples_per_problem, "
            "or set warmup_data.min_examples with top_up_with_reference: true)"
        ),
    )
    check_model_dir(params.student, param="sft.student", made_by="the bootstrap stage")
    if not params.teacher.remote:  # a served teacher speaks the student's tokenizer
        check_model_dir(
            params.teacher.path, param="sft.teacher.path", made_by="the bootstrap stage"
        )
    frame = check_table(
        params.eval_problems,
        ProblemSchema,
        param="sft.eval_problems",
        made_by="the prepare stage",
        empty="the prepare stage wrote no eval problem (prepare.n_eval); re-run prepare",
    )
    if params.eval_n < 1:
        raise StageInputError(f"sft.eval_n = {params.eval_n}: the check needs at least 1 problem")
    return frame_to_problems(frame)[: params.eval_n]


def check_warmup(
    params: SFTParams, model: str | Path | None = None, problems: list[Problem] | None = None
) -> dict:
    """Teacher-free accuracy before/after warm-up and how many emitted commands parse.

    ``model``: the warmed-up model's folder (default ``out_model``); ``problems``: the eval
    problems already read (default: the first ``eval_n`` of ``eval_problems``)."""
    if problems is None:
        frame = read_table(params.eval_problems, ProblemSchema)
        problems = frame_to_problems(frame)[: params.eval_n]
    base, tok = load_model(params.student, device=params.device, dtype=params.dtype)
    warm, _ = load_model(str(model or params.out_model), device=params.device, dtype=params.dtype)
    metrics: dict[str, Any] = {}
    with params.teacher.build(tok, device=params.device, dtype=params.dtype) as teacher:
        for name, model, mode in (
            ("bootstrap", base, "student"),
            ("warmup", warm, "student"),
            ("warmup_relay", warm, "relay"),
        ):
            dec = RelayDecoder(TransformersBackend(model), teacher.backend, tok)
            cfg = RelayConfig(mode=mode, max_new_tokens=params.max_new_tokens)
            graded = decode_problems(
                dec,
                problems,
                cfg,
                batch_size=params.eval_batch_size,
                chat_template=params.chat_template,
                chat_template_kwargs=params.chat_template_kwargs,
            )
            metrics[name] = summarize(graded)
    metrics["accuracy_drop_teacher_free"] = round(
        metrics["bootstrap"]["accuracy"] - metrics["warmup"]["accuracy"], 4
    )
    return metrics


def run(params: SFTParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    if launched():  # one of the processes started below: train, hand back the warnings
        hand_back(train_sft(params))
        return {}
    # Everything that can be checked before training: the trainer config, then every input.
    device_type = pick_device(params.device).type
    build_sft_config(params, device_type)
    problems = read_inputs(params)
    # The model is saved into a staged folder, checked from there, and published with
    # metrics.json only once both exist: a failure anywhere leaves the previous model and
    # metrics as they were (the curves in out_dir/live record every run, failed ones too).
    with together() as pub:
        staged = pub.directory(params.out_model)
        if params.num_processes > 1:
            prepare_sft(params, device_type)  # fail here, before launching
            with staged_for_launch(staged):
                warnings = train_in_processes(
                    "relaypipe.stages.sft", "sft", params, params.num_processes
                )
        else:
            warnings = train_sft(params, save_to=staged)
        metrics = check_warmup(params, staged, problems)
        metrics["warnings"] = warnings
        pub.json(Path(params.out_dir) / "metrics.json", metrics)
        # the model carries the metrics of the training that made it (the report reads them
        # from there, so it depends on the model folder evaluate reads anyway)
        write_json(staged / TRAINING_RECORD, metrics)
    shutil.rmtree(params.checkpoint_dir, ignore_errors=True)  # published: nothing to resume
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("sft: %s", run(stage_params("sft", SFTParams, argv)))


if __name__ == "__main__":
    main()
