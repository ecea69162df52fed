"""Stage ``grpo``: teach the warmed-up student when and how long to call (trl ``GRPOTrainer``).

Run: ``python -m relaypipe.stages.grpo`` (reads ``params.yaml:grpo``) or ``dvc repro grpo``.
Rollouts are relay decodes (the policy is the student, the teacher answers its calls; see
relaypipe/train/rollout.py); the reward is chosen by ``reward`` (``difficulty_aware``, the
paper's, judged per prompt group from delivered teacher tokens; ``accuracy``; or
``cost_penalised`` with a per-request teacher-token budget). ``mask_teacher_tokens`` keeps teacher
tokens out of the policy loss (the reference trains on them: set it false to reproduce that).
``params.yaml:grpo.trainer`` goes to trl's ``GRPOConfig`` as-is. Checkpoints every
``save_steps`` in ``data/checkpoints/grpo``; a re-run resumes from the last one.
Writes ``data/models/relay/``, ``data/grpo/metrics.json`` (relay and teacher-free accuracy and
call ratio on eval problems, gap recovered) and DVCLive curves in ``data/grpo/live``.
The teacher is a model directory or, with ``teacher_url``/``teacher_model``, a served model
(relaypipe/teacher.py: the paper's Qwen3-8B behind vLLM). ``chat_template`` frames the
rollout and check prompts; keep it equal to warmup_data's.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from dvclive import Live

from relaypipe.evaluate.run import decode_problems, summarize
from relaypipe.io import atomic_path, read_json, read_table, write_json
from relaypipe.models import load_model
from relaypipe.relay.backends import Sampling, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.schemas import FilteredProblemSchema, ProblemSchema, frame_to_problems
from relaypipe.stages.common import stage_params
from relaypipe.tasks.base import format_prompt
from relaypipe.teacher import HTTPOptions, Teacher, build_teacher, validate_teacher_options
from relaypipe.train.checkpoints import LiveCallback, file_digest, prepare_checkpoint_dir
from relaypipe.train.rewards import reward_by_name
from relaypipe.train.rollout import make_relay_rollout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayBounds:
    max_call_tokens: int = 16
    max_teacher_tokens: int | None = None  # per-request budget, enforced at decode time
    max_calls: int | None = None
    max_turns: int = 16


@dataclass(frozen=True)
class GRPOParams:
    trainer: dict[str, Any] = field(default_factory=dict)  # trl GRPOConfig fields, passed through
    relay: RelayBounds = field(default_factory=RelayBounds)
    reward: str = "difficulty_aware"  # difficulty_aware | accuracy | cost_penalised
    cost_weight: float = 0.5  # cost_penalised: weight of the call ratio
    budget_penalty: float = 1.0  # cost_penalised: penalty when a budget refused a call
    pay_unfinished: bool = False  # difficulty_aware: true pays cut-off rollouts (the paper's table)
    mask_teacher_tokens: bool = True
    eval_n: int = 300
    eval_temperature: float = 0.0  # decoding of the post-training check (0 = greedy)
    max_new_tokens: int = 64
    device: str = "auto"
    threads: int | None = None
    problems: str = "data/filter/kept.parquet"
    eval_problems: str = "data/problems/eval.parquet"
    student: str = "data/models/warmup"
    teacher: str = "data/models/teacher"  # weights, or (with teacher_url) its tokenizer
    teacher_url: str | None = None  # an OpenAI-compatible server instead of in-process weights
    teacher_model: str | None = None  # the model name served at teacher_url
    teacher_http: HTTPOptions = field(default_factory=HTTPOptions)
    chat_template: bool = False  # rollout/check prompts; keep equal to warmup_data's
    bootstrap_metrics: str = "data/models/bootstrap.json"
    checkpoint_dir: str = "data/checkpoints/grpo"
    out_model: str = "data/models/relay"
    out_dir: str = "data/grpo"

    def __post_init__(self) -> None:
        validate_teacher_options(self.teacher_url, self.teacher_model)


def load_teacher(params: GRPOParams, tokenizer: Any) -> Teacher:
    """The teacher the params name: in-process weights or a served model."""
    return build_teacher(
        params.teacher,
        tokenizer,
        url=params.teacher_url,
        model_name=params.teacher_model,
        http=params.teacher_http,
        device=params.device,
    )


def relay_config(params: GRPOParams, mode: str = "relay") -> RelayConfig:
    b = params.relay
    return RelayConfig(
        mode=mode,
        max_new_tokens=params.max_new_tokens,
        max_turns=b.max_turns,
        max_call_tokens=b.max_call_tokens,
        max_teacher_tokens=b.max_teacher_tokens,
        max_calls=b.max_calls,
        student_sampling=Sampling(temperature=params.eval_temperature),
    )


def train_grpo(params: GRPOParams) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
    from trl import GRPOConfig, GRPOTrainer  # heavy import, only for this stage

    table = read_table(params.problems, FilteredProblemSchema)
    model, tok = load_model(params.student, device=params.device)
    teacher = load_teacher(params, tok)
    fingerprint = {
        "params": asdict(params),
        "problems": file_digest(params.problems),
        "student": file_digest(params.student),
        "teacher": file_digest(params.teacher),
    }
    resume = prepare_checkpoint_dir(params.checkpoint_dir, fingerprint)
    defaults = {
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "steps",
        "use_cpu": model.device.type == "cpu",
        "bf16": model.device.type == "cuda",  # trl defaults to bf16; CPU trains in float32
        "disable_tqdm": False,
        "max_completion_length": params.max_new_tokens,
    }
    args = GRPOConfig(output_dir=params.checkpoint_dir, **{**defaults, **params.trainer})
    dataset = Dataset.from_dict(
        {
            "prompt": [
                format_prompt(q, tok, chat_template=params.chat_template) for q in table.question
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
    live = Live(
        dir=str(Path(params.out_dir) / "live"),
        resume=bool(resume),
        save_dvc_exp=False,
        dvcyaml=None,
    )
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
        callbacks=[LiveCallback(live)],
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        teacher.close()
    live.end()
    with atomic_path(params.out_model, directory=True) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(params.checkpoint_dir, ignore_errors=True)


def check_relay(params: GRPOParams) -> dict:
    """Relay and teacher-free accuracy of the trained student on held-out problems."""
    problems = frame_to_problems(read_table(params.eval_problems, ProblemSchema))[: params.eval_n]
    student, tok = load_model(params.out_model, device=params.device)
    metrics: dict[str, Any] = {}
    with load_teacher(params, tok) as teacher:
        dec = RelayDecoder(TransformersBackend(student), teacher.backend, tok)
        for mode in ("relay", "student"):
            graded = decode_problems(
                dec,
                problems,
                relay_config(params, mode),
                batch_size=100,
                chat_template=params.chat_template,
            )
            metrics["teacher_free" if mode == "student" else mode] = summarize(graded)
    boot = read_json(params.bootstrap_metrics)
    gap = boot["teacher_accuracy"] - boot["student_accuracy"]
    metrics["gap_recovered"] = (
        round((metrics["relay"]["accuracy"] - boot["student_accuracy"]) / gap, 4)
        if gap > 0
        else 0.0
    )
    return metrics


def run(params: GRPOParams) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    train_grpo(params)
    metrics = check_relay(params)
    write_json(Path(params.out_dir) / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    log.info("grpo: %s", run(stage_params("grpo", GRPOParams, argv)))


if __name__ == "__main__":
    main()
