"""What every task shares: the problem record and the one prompt template.

The prompt template lives here, and only here, so warm-up data, GRPO rollouts and evaluation
all show the model exactly the same text (the reference implementation used three different
prompts for those three stages).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The completion the model writes after the prompt. Worked solutions end with the answer line
# "Answer: <value>"; graders also understand GSM8K's "#### <value>" and LaTeX "\boxed{<value>}".
PROMPT_TEMPLATE = "Q: {question}\nA: "
ANSWER_PREFIX = "Answer: "


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


def format_prompt(question: str) -> str:
    """The prompt text for a question; the same in every stage."""
    return PROMPT_TEMPLATE.format(question=question.strip())
