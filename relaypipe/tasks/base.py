"""What every task shares: the problem record and the one prompt template.

The prompt template lives here, and only here, so warm-up data, GRPO rollouts and evaluation
all show the model exactly the same text (the reference implementation used three different
prompts for those three stages).

Two forms, chosen by the stages' ``chat_template`` parameter:

* plain (the default): ``"Q: {question}\nA: "``, what the micro models are trained on;
* chat: the question as one user turn of the tokenizer's own chat template, generation prompt
  appended (an instruct model such as SmolLM2-Instruct or Qwen3 answers best in the format it
  was tuned on). A tokenizer without a chat template (the micro character tokenizer) falls
  back to the plain form, so one setting can serve every preset; the fallback is logged once.
  ``chat_template_kwargs`` (a stage param next to ``chat_template``) are passed to the template,
  e.g. ``{enable_thinking: false}`` for Qwen3's non-thinking mode, as the reference code does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

# The completion the model writes after the prompt. Worked solutions end with the answer line
# "Answer: <value>"; graders also understand GSM8K's "#### <value>" and LaTeX "\boxed{<value>}".
PROMPT_TEMPLATE = "Q: {question}\nA: "
ANSWER_PREFIX = "Answer: "
# Appended to the user turn in chat form: the pretrained models know \boxed{} from their math
# tuning, and the shared grader reads it (as it reads "Answer:" and "####").
CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_warned_no_template: set[int] = set()


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer (and, when known, a worked solution)."""

    problem_id: str  # unique within a table, stable across runs (e.g. "arith-d3-000042")
    task: str  # which task produced it ("arith", "gsm8k", ...)
    difficulty: int  # task-specific knob; 0 when the source has none
    question: str
    answer: str  # the canonical final answer, as text
    solution: str = ""  # a worked solution ending in "Answer: <answer>", "" when unknown

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template ``apply_chat_template`` can use."""
    return bool(getattr(tokenizer, "chat_template", None))


def check_prompt_options(chat_template: bool, chat_template_kwargs: Mapping[str, Any]) -> None:
    """For a stage's ``__post_init__``: template kwargs without a template are a mistake."""
    if chat_template_kwargs and not chat_template:
        raise ValueError(
            f"chat_template_kwargs {dict(chat_template_kwargs)} need chat_template: true (the "
            "plain Q:/A: prompt has no template to pass them to)"
        )


def format_prompt(
    question: str,
    tokenizer: Any = None,
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for a question; the same in every stage.

    With ``chat_template`` and a tokenizer that has one, the question (plus
    :data:`CHAT_INSTRUCTION`) becomes a single user turn rendered by
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``; the
    result contains the template's special tokens as text, so callers tokenize it with
    ``add_special_tokens=False`` as they do the plain form. Otherwise: the plain template.

    ``chat_template_kwargs`` are extra variables for the template (Qwen3's
    ``{"enable_thinking": false}``): every stage passes its ``chat_template_kwargs`` param, so
    warm-up, GRPO and evaluation show the model the same rendering. They are refused without
    ``chat_template`` (they would be silently ignored by the plain form).
    """
    check_prompt_options(chat_template, chat_template_kwargs or {})
    if chat_template:
        if tokenizer is None:
            raise ValueError("chat_template=True needs the tokenizer whose template to apply")
        if has_chat_template(tokenizer):
            content = f"{question.strip()}\n{CHAT_INSTRUCTION}"
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
        if id(tokenizer) not in _warned_no_template:
            _warned_no_template.add(id(tokenizer))
            log.warning(
                "chat_template is on but the tokenizer (%s) has none: using the plain "
                "Q:/A: template",
                type(tokenizer).__name__,
            )
    return PROMPT_TEMPLATE.format(question=question.strip())
