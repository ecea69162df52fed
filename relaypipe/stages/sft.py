"""Stage ``sft``: warm up the student on its own answers with commands (trl ``SFTTrainer``).

Run: ``python -m relaypipe.stages.sft`` (reads ``params.yaml:sft``) or ``dvc repro sft``.
Loss on the completion only; ``params.yaml:sft.trainer`` is passed to trl's ``SFTConfig``
as-is. Checkpoints go to ``data/checkpoints/sft`` every ``save_steps``; re-running after a
crash or Ctrl-C resumes from the last one when params and inputs are unchanged.
Writes ``data/models/warmup/``, ``data/sft/metrics.json`` (command parse rate and teacher-free
accuracy against the bootstrap student, on eval problems) and DVCLive curves in ``data/sft/live``.
The check's teacher is a model directory or, with ``teacher_url``/``teacher_model``, a served
model (relaypipe/teacher.py). ``chat_template`` must match warmup_data's: the training prompts
come from its table, the check's prompts from :func:`relaypipe.tasks.base.format_prompt`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from dvclive import Live
from trl import SFTConfig, SFTTrainer

from relaypipe.evaluate.run import decode_problems, summarize
from relaypipe.io import atomic_path, read_table, write_json
from relaypipe.models import load_model
from relaypipe.relay.backends import TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.schemas import ProblemSchema, SFTExampleSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.teacher import HTTPOptions, build_teacher, validate_teacher_options
from relaypipe.train.checkpoints import LiveCallback, file_digest, prepare_checkpoint_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTParams:
    trainer: dict[str, Any] = field(default_factory=dict)  # trl SFTConfig fields, passed through
    eval_n: int = 200  # eval problems for the post-training check
    max_new_tokens: int = 96
    device: str = "auto"
    threads: int | None = None
    data: str = "data/warmup/sft.parquet"
    student: str = "data/models/student"
    teacher: str = "data/models/teacher"  # weights, or (with teacher_url) its tokenizer
    teacher_url: str | None = None  # an OpenAI-compatible server instead of in-process weights
    teacher_model: str | None = None  # the model name served at teacher_url
    teacher_http: HTTPOptions = field(default_factory=HTTPOptions)
    chat_template: bool = False  # the check's prompts; keep equal to warmup_data.chat_template
    eval_problems: str = "data/problems/eval.parquet"
    checkpoint_dir: str = "data/checkpoints/sft"
    out_model: str = "data/models/warmup"
    out_dir: str = "data/sft"

    def __post_init__(self) -> None:
        validate_teacher_options(self.teacher_url, self.teacher_model)


def train_sft(params: SFTParams) -> None:
    table = read_table(params.data, SFTExampleSchema)
    model, tok = load_model(params.student, device=params.device)
    fingerprint = {
        "params": asdict(params),
        "data": file_digest(params.data),
        "student": file_digest(params.student),
    }
    resume = prepare_checkpoint_dir(params.checkpoint_dir, fingerprint)
    defaults = {
        "report_to": [],
        "save_strategy": "steps",
        "logging_steps": 10,
        "use_cpu": model.device.type == "cpu",
        "bf16": model.device.type == "cuda",  # trl defaults to bf16; CPU trains in float32
        "completion_only_loss": True,
        "disable_tqdm": False,
    }
    args = SFTConfig(output_dir=params.checkpoint_dir, **{**defaults, **params.trainer})
    live = Live(
        dir=str(Path(params.out_dir) / "live"),
        resume=bool(resume),
        save_dvc_exp=False,
        dvcyaml=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_pandas(table[["prompt", "completion"]], preserve_index=False),
        processing_class=tok,
        callbacks=[LiveCallback(live)],
    )
    trainer.train(resume_from_checkpoint=resume)
    live.end()
    with atomic_path(params.out_model, directory=True) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(params.checkpoint_dir, ignore_errors=True)


def check_warmup(params: SFTParams) -> dict:
    """Teacher-free accuracy before/after warm-up and how many emitted commands parse."""
    problems = frame_to_problems(read_table(params.eval_problems, ProblemSchema))[: params.eval_n]
    base, tok = load_model(params.student, device=params.device)
    warm, _ = load_model(params.out_model, device=params.device)
    metrics: dict[str, Any] = {}
    with build_teacher(
        params.teacher,
        tok,
        url=params.teacher_url,
        model_name=params.teacher_model,
        http=params.teacher_http,
        device=params.device,
    ) as teacher:
        for name, model, mode in (
            ("bootstrap", base, "student"),
            ("warmup", warm, "student"),
            ("warmup_relay", warm, "relay"),
        ):
            dec = RelayDecoder(TransformersBackend(model), teacher.backend, tok)
            cfg = RelayConfig(mode=mode, max_new_tokens=params.max_new_tokens)
            graded = decode_problems(
                dec, problems, cfg, batch_size=100, chat_template=params.chat_template
            )
            metrics[name] = summarize(graded)
    metrics["accuracy_drop_teacher_free"] = round(
        metrics["bootstrap"]["accuracy"] - metrics["warmup"]["accuracy"], 4
    )
    return metrics


def run(params: SFTParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    train_sft(params)
    metrics = check_warmup(params)
    write_json(Path(params.out_dir) / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("sft: %s", run(stage_params("sft", SFTParams, argv)))


if __name__ == "__main__":
    main()
