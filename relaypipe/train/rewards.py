"""Reward functions for GRPO over relay rollouts: plain trl-style ``(completions, **kwargs)``.

Every function grades with :func:`relaypipe.tasks.grading.is_correct` (the evaluation grader)
on ``reader_text`` when the rollout supplies it (relaypipe/train/rollout.py: the completion with
its commands removed, as evaluation reads it; trl's own ``completions`` are decoded with
``skip_special_tokens``, which keeps a command's body as if it were answer text), and reads
the rollout's *delivered* token counts (``teacher_tokens``, ``generated_tokens``), never the n
the student asked for. The difficulty-aware reward is decided **per prompt group**
(all completions of the same ``problem_id`` in the batch), not over the whole batch as the
reference implementation does. Its table (DESIGN.md §1; call_ratio = teacher / generated,
capped at 1; "called" = the teacher delivered at least one token):

=================================  ==========  ==============  ========  ===========
the group contains...              right, no   right, called   wrong,    wrong,
                                   call                        no call   called
=================================  ==========  ==============  ========  ===========
a right rollout without calls      1.5         1 - call_ratio  0         0
else a right rollout with calls    --          1 - call_ratio  -1        0
no right rollout                   --          --              0         call_ratio
=================================  ==========  ==============  ========  ===========

One guard the paper's table lacks (on unless ``pay_unfinished=True``): in the last row, a
rollout that never finished (cut off by the length or turn bound, ``finished`` False) earns 0,
not its call ratio. Without it a small policy learns to call until the length bound cuts it off:
every group is then wrong, and the call ratio of a cut-off rollout is the only reward left
(measured: call rate 1.0, teacher share 0.54, accuracy 0.00 after 150 steps at lr 1e-4).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from relaypipe.tasks.grading import is_correct

RewardFunc = Callable[..., list[float]]


def _text(completion: Any) -> str:
    """trl passes plain strings, or chat messages for conversational data."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def _correct(
    completions: list[Any], answer: list[str], reader_text: list[str] | None
) -> list[bool]:
    texts = reader_text if reader_text is not None else [_text(c) for c in completions]
    return [is_correct(t, a) for t, a in zip(texts, answer, strict=True)]


def call_ratios(teacher_tokens: Sequence[int], generated_tokens: Sequence[int]) -> list[float]:
    return [
        min(1.0, t / g) if g else 0.0 for t, g in zip(teacher_tokens, generated_tokens, strict=True)
    ]


def accuracy_reward(
    completions: list[Any], answer: list[str], reader_text: list[str] | None = None, **_: Any
) -> list[float]:
    """1 for a right final answer, else 0 (graded on ``reader_text`` when given).

    >>> accuracy_reward(["Answer: 4", "Answer: 5"], answer=["4", "4"])
    [1.0, 0.0]
    >>> accuracy_reward(["Answer: 212"], answer=["12"], reader_text=["Answer: 12"])
    [1.0]
    """
    return [float(c) for c in _correct(completions, answer, reader_text)]


def difficulty_aware_reward(
    completions: list[Any],
    answer: list[str],
    problem_id: list[str],
    teacher_tokens: list[int],
    generated_tokens: list[int],
    finished: list[bool] | None = None,
    reader_text: list[str] | None = None,
    **_: Any,
) -> list[float]:
    """RelayLLM's difficulty-aware reward, judged per prompt group (table in the module doc);
    ``finished`` (None: all finished) withholds the last row's pay from cut-off rollouts.

    >>> difficulty_aware_reward(
    ...     ["Answer: 4", "Answer: 4", "Answer: 5"], answer=["4"] * 3, problem_id=["p"] * 3,
    ...     teacher_tokens=[0, 2, 0], generated_tokens=[10, 10, 10])
    [1.5, 0.8, 0.0]
    """
    correct = _correct(completions, answer, reader_text)
    ratio = call_ratios(teacher_tokens, generated_tokens)
    called = [t > 0 for t in teacher_tokens]
    done = finished if finished is not None else [True] * len(completions)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(problem_id):
        groups[pid].append(i)
    rewards = [0.0] * len(completions)
    for members in groups.values():
        has_solo = any(correct[i] and not called[i] for i in members)
        has_relayed = any(correct[i] and called[i] for i in members)
        for i in members:
            if correct[i]:
                rewards[i] = 1.5 if not called[i] else 1.0 - ratio[i]
            elif has_solo:
                rewards[i] = 0.0
            elif has_relayed:
                rewards[i] = 0.0 if called[i] else -1.0
            else:  # nobody got it right: asking was the right instinct
                rewards[i] = ratio[i] if called[i] and done[i] else 0.0
    return rewards


def make_cost_penalised_reward(cost_weight: float = 0.5, budget_penalty: float = 1.0) -> RewardFunc:
    """Accuracy minus ``cost_weight`` x call_ratio, minus ``budget_penalty`` when a rollout asked
    for more teacher tokens or calls than its per-request budget allowed (``budget_events``)."""

    def cost_penalised_reward(
        completions: list[Any],
        answer: list[str],
        teacher_tokens: list[int],
        generated_tokens: list[int],
        budget_events: list[int] | None = None,
        reader_text: list[str] | None = None,
        **_: Any,
    ) -> list[float]:
        acc = accuracy_reward(completions, answer, reader_text)
        ratio = call_ratios(teacher_tokens, generated_tokens)
        over = budget_events or [0] * len(completions)
        return [
            a - cost_weight * r - (budget_penalty if o else 0.0)
            for a, r, o in zip(acc, ratio, over, strict=True)
        ]

    cost_penalised_reward.__name__ = "cost_penalised_reward"
    return cost_penalised_reward


REWARDS = ("difficulty_aware", "accuracy", "cost_penalised")


def reward_by_name(
    name: str,
    cost_weight: float = 0.5,
    budget_penalty: float = 1.0,
    pay_unfinished: bool = False,
) -> RewardFunc:
    """The reward ``name`` (one of REWARDS); ``pay_unfinished`` drops the difficulty-aware
    reward's guard on cut-off rollouts (the paper's table exactly)."""
    if name == "difficulty_aware":
        if not pay_unfinished:
            return difficulty_aware_reward

        def paper_difficulty_aware_reward(*args: Any, **kwargs: Any) -> list[float]:
            kwargs.pop("finished", None)
            return difficulty_aware_reward(*args, **kwargs)

        return paper_difficulty_aware_reward
    if name == "accuracy":
        return accuracy_reward
    if name == "cost_penalised":
        return make_cost_penalised_reward(cost_weight, budget_penalty)
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
