"""Run the relay decoder over a list of problems and grade the answers.

The same prompt template and the same grader as training, so a number here means what the
reward meant.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from relaypipe.checks import answered_share
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.trace import RelayTrace
from relaypipe.tasks.base import Problem, format_prompt
from relaypipe.tasks.grading import is_correct, reader_text


@dataclass
class Graded:
    problem: Problem
    trace: RelayTrace
    completion: str  # generated text as the reader sees it: commands and special tokens dropped
    correct: bool


def prompt_ids(
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Each problem's prompt as token ids: :func:`relaypipe.tasks.base.format_prompt` (with
    ``chat_template``: the tokenizer's chat template, rendered with ``chat_template_kwargs``),
    exactly as in training."""
    return [
        tokenizer(
            format_prompt(
                p.question,
                tokenizer,
                chat_template=chat_template,
                chat_template_kwargs=chat_template_kwargs,
            ),
            add_special_tokens=False,
        ).input_ids
        for p in problems
    ]


def decode_problems(
    decoder: RelayDecoder,
    problems: Sequence[Problem],
    config: RelayConfig,
    batch_size: int = 64,
    desc: str | None = None,
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[Graded]:
    """Decode every problem in ``config``'s mode (in chunks of ``batch_size``) and grade it.

    Prompts come from :func:`relaypipe.tasks.base.format_prompt` with the decoder's tokenizer
    (``chat_template``: its chat template, when it has one, rendered with
    ``chat_template_kwargs``), exactly as in training.
    """
    tok = decoder.tokenizer
    out: list[Graded] = []
    bar = tqdm(total=len(problems), desc=desc or config.mode, mininterval=2.0, leave=False)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = prompt_ids(
            tok, chunk, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
        )
        for p, tr in zip(chunk, decoder.decode(prompts, config, first_id=start), strict=True):
            text = reader_text(tok, tr.token_ids)
            out.append(Graded(p, tr, text, is_correct(text, p.answer)))
        bar.update(len(chunk))
    bar.close()
    return out


def accuracy(graded: Sequence[Graded]) -> float:
    return sum(g.correct for g in graded) / len(graded) if graded else 0.0


def summarize(graded: Sequence[Graded]) -> dict[str, float]:
    """Accuracy, call ratio and command health of one mode's graded traces."""
    traces = [g.trace for g in graded]
    generated = sum(t.n_generated for t in traces) or 1
    commands = sum(t.calls for t in traces) + sum(
        e.kind in ("malformed", "blocked", "budget", "unterminated")
        for t in traces
        for e in t.events
    )
    malformed = sum(e.kind in ("malformed", "unterminated") for t in traces for e in t.events)
    return {
        "accuracy": round(accuracy(graded), 4),
        "call_ratio": round(sum(t.n_teacher for t in traces) / generated, 4),
        "calls_per_request": round(sum(t.calls for t in traces) / max(1, len(traces)), 4),
        "commands_emitted": commands,
        "command_parse_rate": round(1 - malformed / commands, 4) if commands else 1.0,
    }


def solo_accuracies(
    decoder: RelayDecoder,
    problems: list[Problem],
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float | int]:
    """Greedy accuracy of each model alone (modes ``student`` and ``teacher``): the bootstrap's
    measurement, whichever way the pair was made."""
    metrics: dict[str, float | int] = {}
    start = time.perf_counter()
    for mode in ("student", "teacher"):
        graded = decode_problems(
            decoder,
            problems,
            RelayConfig(mode=mode, max_new_tokens=max_new_tokens, seed=seed),
            batch_size=batch_size,
            desc=f"eval {mode}",
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        metrics[f"{mode}_accuracy"] = round(accuracy(graded), 4)
        # 0 here means it never reached an answer line: its accuracy measures nothing
        metrics[f"{mode}_answered"] = round(answered_share(g.completion for g in graded), 4)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    metrics["n_eval"] = len(problems)
    return metrics
