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
* ``mistakes`` (imitation of a perfect caller; not in the paper): the row is the problem's
  *reference* solution, with a command before every run of tokens the student, teacher-forced
  on it, would not write (its greedy choice differs), asking for the run's length. Everything
  outside those runs is what the student writes itself; the runs are the teacher's, and SFT
  keeps them out of the loss (relaypipe/stages/sft.py), as GRPO masks teacher tokens, so the
  student learns where to ask without learning the answers it asks for. For a student that is
  *confidently* wrong (a knowledge gap), neither its own right answers nor its uncertainty
  mark the tokens it lacks; this does. A row with more runs than ``max_commands`` is dropped
  rather than left with an unmarked mistake (which it would then be trained to write).

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

from relaypipe.relay.grammar import MalformedCall, format_call, parse_call_body
from relaypipe.tasks.base import format_prompt

POLICIES = ("random", "disagreement", "uncertainty", "mistakes")
# Policies whose called tokens were written by the teacher: kept out of the SFT loss.
TEACHER_WRITTEN = frozenset({"mistakes"})


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


@torch.inference_mode()
def greedy_choices(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> list[list[int]]:
    """Per completion, the model's greedy next token at each of its positions, teacher-forced
    (batched; rows are right-padded, which a causal model never attends to from earlier)."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            list(p) + list(c)
            for p, c in zip(
                prompts[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
        best = model(input_ids=ids).logits.argmax(-1).tolist()
        for k, row in enumerate(rows):
            p_len = len(prompts[start + k])
            # logits at position j predict token j+1: completion token i is predicted at p + i - 1
            out.append(best[k][p_len - 1 : len(row) - 1])
    return out


def mistake_spans(
    greedy: Sequence[int], completion_ids: Sequence[int], n_values: Sequence[int]
) -> list[tuple[int, int]]:
    """(position, n) covering every completion token the student would not write (its greedy
    choice, teacher-forced, differs: :func:`greedy_choices`), in text order. n is the smallest
    of ``n_values`` that covers the run of such tokens from ``position`` (the largest when none
    does; the rest of the run then starts the next span). Position 0 may be flagged: a student
    that cannot write the first token must call before it.

    >>> mistake_spans([1, 9, 3, 9, 9, 9], [1, 2, 3, 4, 5, 6], n_values=(1, 2))
    [(1, 1), (3, 2), (5, 1)]
    """
    wrong = [p != t for p, t in zip(greedy, completion_ids, strict=True)]
    sizes = sorted(n_values)
    spans, i = [], 0
    while i < len(wrong):
        if not wrong[i]:
            i += 1
            continue
        run = next((j for j in range(i, len(wrong)) if not wrong[j]), len(wrong)) - i
        n = next((size for size in sizes if size >= run), sizes[-1])
        spans.append((i, n))
        i += n
    return spans


def teacher_token_mask(
    completion_ids: Sequence[int], open_id: int, close_id: int, decode: Any
) -> list[int]:
    """[T] 0 on the ``n`` tokens that follow each well-formed ``<call>n</call>`` (the teacher's,
    in a relay transcript), 1 elsewhere. ``decode`` turns a command body's ids into text.

    >>> teacher_token_mask([5, 1, 9, 2, 7, 8, 6], 1, 2, lambda ids: "1")
    [1, 1, 1, 1, 0, 1, 1]
    """
    mask, owed, body, inside = [], 0, [], False
    for token in completion_ids:
        if token == open_id:
            inside, body = True, []
            mask.append(1)
        elif token == close_id and inside:
            inside = False
            try:
                owed = parse_call_body(decode(body))
            except MalformedCall:
                owed = 0
            mask.append(1)
        elif inside:
            body.append(token)
            mask.append(1)
        elif owed:
            owed -= 1
            mask.append(0)
        else:
            mask.append(1)
    return mask


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
    if spec.policy == "mistakes":
        if student is None:
            raise ValueError("the mistakes policy needs the student model")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        greedy = greedy_choices(student, [prompt_ids], [comp_ids])[0]
        spans = mistake_spans(greedy, comp_ids, spec.n_values)
        positions, ns = [q for q, _ in spans], [n for _, n in spans]
    elif spec.policy == "uncertainty":
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
