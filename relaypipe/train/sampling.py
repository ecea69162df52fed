"""Sampling a model k times per problem and grading: used by the competence filter (teacher)
and the warm-up data (student)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from relaypipe.evaluate.run import Graded, decode_problems
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.sampling import Sampling
from relaypipe.tasks.base import Problem


def sample_k(
    decoder: RelayDecoder,
    problems: Sequence[Problem],
    *,
    mode: str,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[Graded]]:
    """``k`` sampled, graded completions per problem (``mode``: "student" or "teacher")."""
    sampling = Sampling(temperature=temperature)
    repeated = [p for p in problems for _ in range(k)]
    cfg = RelayConfig(
        mode=mode,
        max_new_tokens=max_new_tokens,
        student_sampling=sampling,
        teacher_sampling=sampling,
        seed=seed,
    )
    graded = decode_problems(
        decoder,
        repeated,
        cfg,
        batch_size=batch_size,
        desc=f"sample {mode}",
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
    )
    return [graded[i * k : (i + 1) * k] for i in range(len(problems))]
