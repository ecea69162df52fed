"""Warm-up data (stage 1): the student's own right answers with call commands inserted.

Training on its own text teaches the command's syntax without shifting the student's
distribution (DESIGN.md §1). Three insertion policies:

* ``random`` (the paper's): 0-3 commands (uniform count) at random token positions.
* ``disagreement`` (imitation-style, named as future work in the paper): commands go where the
  teacher's greedy next token differs from the student's, most-confident disagreements first,
  falling back to random positions when there are fewer disagreements than commands.
* ``uncertainty`` (imitation of a confidence router): a command goes before every run of
  tokens the student gave less than ``threshold`` probability (teacher-forced on its own
  text), asking for as many tokens as the run is long (the smallest ``n_values`` that covers
  it), lowest-confidence runs first, at most ``max_commands``; a confident example gets none.
  Unlike the other two, the count is not drawn at random: the student learns *where* to call.

Unlike the reference, every command carries its ``n`` (from ``n_values``: drawn at random, or
fitted to the run by ``uncertainty``), and the text around a command is left exactly as the
student wrote it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relaypipe.relay.grammar import format_call
from relaypipe.tasks.base import format_prompt

POLICIES = ("random", "disagreement", "uncertainty")


@dataclass(frozen=True)
class InsertSpec:
    policy: str = "random"  # one of POLICIES
    max_commands: int = 3  # commands per example: uniform in 0..max_commands
    n_values: tuple[int, ...] = (2, 4, 8)  # n of each inserted command, drawn uniformly
    seed: int = 0
    threshold: float = 0.6  # uncertainty: call before tokens the student gives less than this

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.max_commands < 0 or not self.n_values or min(self.n_values) < 1:
            raise ValueError("max_commands must be >= 0 and n_values non-empty positive integers")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


def insert_commands(
    completion_ids: Sequence[int],
    positions: Sequence[int],
    n_values: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
) -> list[int]:
    """``completion_ids`` with ``format_call(n)`` inserted before each token index in positions."""
    out: list[int] = []
    pending = sorted(zip(positions, n_values, strict=True))
    k = 0
    for i in range(len(completion_ids) + 1):
        while k < len(pending) and pending[k][0] == i:
            out.extend(tokenizer(format_call(pending[k][1]), add_special_tokens=False).input_ids)
            k += 1
        if i < len(completion_ids):
            out.append(completion_ids[i])
    return out


def random_positions(length: int, count: int, rng: random.Random) -> list[int]:
    """``count`` distinct insertion points in 1..length-1 (never before the first token nor
    after the last, so a command always sits inside the student's text)."""
    slots = list(range(1, max(1, length)))
    return sorted(rng.sample(slots, min(count, len(slots))))


def completion_logits(
    model: PreTrainedModel, prompt_ids: Sequence[int], completion_ids: Sequence[int]
) -> torch.Tensor:
    """[T, V] logits, teacher-forced: row i predicts completion token i."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    # logits at position j predict token j+1: completion token i is predicted at p + i - 1
    return model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]


@torch.inference_mode()
def disagreement_positions(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    count: int,
) -> list[int]:
    """Indices where the teacher's greedy next token differs from the student's, ordered by
    the teacher's confidence in its own choice; at most ``count``."""
    s_pred = completion_logits(student, prompt_ids, completion_ids).argmax(-1)
    t_logits = completion_logits(teacher, prompt_ids, completion_ids)
    t_conf, t_pred = t_logits.softmax(-1).max(-1)
    idx = torch.nonzero(s_pred != t_pred, as_tuple=True)[0]
    idx = idx[(idx > 0) & (idx < len(completion_ids))]
    ranked = idx[torch.argsort(t_conf[idx], descending=True)]
    return sorted(ranked[:count].tolist())


@torch.inference_mode()
def uncertain_spans(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    student: PreTrainedModel,
    threshold: float,
    count: int,
    n_values: Sequence[int],
) -> list[tuple[int, int]]:
    """(position, n) for each run of completion tokens the student, teacher-forced on this
    text, gave less than ``threshold`` probability; n is the smallest of ``n_values`` that
    covers the run (the largest when none does). Least confident runs first, at most
    ``count``, returned in text order. Position 0 is never flagged, as in the other policies."""
    probs = completion_logits(student, prompt_ids, completion_ids).float().softmax(-1)
    chosen = probs.gather(-1, torch.tensor(list(completion_ids))[:, None])[:, 0].tolist()
    runs: list[tuple[float, int, int]] = []  # (lowest probability, start, length)
    for i in range(1, len(completion_ids)):
        if chosen[i] >= threshold:
            continue
        if runs and runs[-1][1] + runs[-1][2] == i:
            low, start, length = runs[-1]
            runs[-1] = (min(low, chosen[i]), start, length + 1)
        else:
            runs.append((chosen[i], i, 1))
    ranked = sorted(runs)[:count]
    sizes = sorted(n_values)
    return sorted(
        (start, next((n for n in sizes if n >= length), sizes[-1])) for _, start, length in ranked
    )


def build_warmup_example(
    question: str,
    completion: str,
    tokenizer: PreTrainedTokenizerBase,
    spec: InsertSpec,
    rng: random.Random,
    student: PreTrainedModel | None = None,
    teacher: PreTrainedModel | None = None,
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, str, list[int]]:
    """(prompt, completion with commands, the inserted n values) for one right answer.

    The prompt is :func:`format_prompt`'s (``chat_template``: the tokenizer's chat form, with
    ``chat_template_kwargs``), the same text GRPO and evaluation will show the student.
    """
    prompt = format_prompt(
        question, tokenizer, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
    )
    comp_ids = tokenizer(completion, add_special_tokens=False).input_ids
    if spec.policy == "uncertainty":
        if student is None:
            raise ValueError("the uncertainty policy needs the student model")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        spans = uncertain_spans(
            prompt_ids, comp_ids, student, spec.threshold, spec.max_commands, spec.n_values
        )
        positions, ns = [q for q, _ in spans], [n for _, n in spans]
    else:
        count = rng.randint(0, spec.max_commands)
        if spec.policy == "disagreement" and count:
            if student is None or teacher is None:
                raise ValueError("the disagreement policy needs the student and the teacher models")
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            positions = disagreement_positions(prompt_ids, comp_ids, student, teacher, count)
            taken = set(positions)
            extra = [q for q in random_positions(len(comp_ids), count, rng) if q not in taken]
            positions = sorted(positions + extra[: count - len(positions)])
        else:
            positions = random_positions(len(comp_ids), count, rng)
        ns = [rng.choice(spec.n_values) for _ in positions]
    with_calls = insert_commands(comp_ids, positions, ns, tokenizer)
    return prompt, tokenizer.decode(with_calls), ns
