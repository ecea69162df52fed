"""Bootstrap the micro pair: a tokenizer, a tiny student and a larger teacher, from scratch.

Both models learn the task's worked solutions with the same recipe; only their size and
number of steps differ, so the teacher is clearly better and relaying can matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from relaypipe.evaluate.run import solo_accuracies
from relaypipe.io import atomic_path
from relaypipe.micro.models import ModelSize, build_model, count_parameters
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.micro.train_lm import TrainSpec, train_causal_lm
from relaypipe.relay.decoder import RelayDecoder
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.tasks.base import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapSpec:
    student: ModelSize
    teacher: ModelSize
    student_train: TrainSpec
    teacher_train: TrainSpec
    max_new_tokens: int = 96
    eval_batch_size: int = 100
    seed: int = 0


def bootstrap_pair(
    train: list[Problem], evaluation: list[Problem], spec: BootstrapSpec, out_dir: Path
) -> dict[str, float | int]:
    """Train both models, save them under ``out_dir/{student,teacher}``, return metrics."""
    tok = build_char_tokenizer()
    metrics: dict[str, float | int] = {}
    models = {}
    for role, size, train_spec in (
        ("teacher", spec.teacher, spec.teacher_train),
        ("student", spec.student, spec.student_train),
    ):
        model = build_model(size, tok, seed=spec.seed + (role == "student"))
        result = train_causal_lm(model, tok, train, train_spec, desc=f"bootstrap {role}")
        metrics[f"{role}_params"] = count_parameters(model)
        metrics[f"{role}_train_seconds"] = round(result["seconds"], 1)
        metrics[f"{role}_final_loss"] = round(result["loss"], 5)
        metrics[f"{role}_train_problems"] = result["problems"]
        with atomic_path(out_dir / role, directory=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        models[role] = model

    decoder = RelayDecoder(
        TransformersBackend(models["student"]), TransformersBackend(models["teacher"]), tok
    )
    metrics |= solo_accuracies(
        decoder,
        evaluation,
        max_new_tokens=spec.max_new_tokens,
        seed=spec.seed,
        batch_size=spec.eval_batch_size,
    )
    log.info("bootstrap metrics: %s", metrics)
    return metrics
