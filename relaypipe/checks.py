"""Degenerate runs fail loudly: is what a stage produced something to learn from or compare?

A stage can finish with exit 0 and still have produced nothing. A student that never reaches an
answer line scores 0.0 and leaves no warm-up data of its own; a warm-up table topped up with
reference solutions then teaches text the student does not write; GRPO groups that all earn one
reward have zero advantages, so the weights stay as they were; and the report would then print
a "cost reduction" for a relay that never called. Each check below is a plain function from what
a stage measured to a list of findings: what was wrong, where it shows (the stage's metrics
file), and which param to change. :func:`enforce` turns findings into a
:class:`DegenerateRunError` raised *before* the stage publishes anything or, when the stage's
``allow_degenerate`` param says go on, into warnings that the stage records in its metrics.json
(``warnings``) and the report stage repeats at the top of report.md.

Nothing here imports trl, DVC or Prefect; torch only inside :func:`weights_digest`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from relaypipe.tasks.grading import extract_answer

log = logging.getLogger(__name__)

__all__ = [
    "DegenerateRunError",
    "answered_share",
    "bootstrap_findings",
    "enforce",
    "no_calls",
    "no_gap",
    "reward_findings",
    "unchanged_findings",
    "warmup_findings",
    "weights_digest",
]

# trl logs frac_reward_zero_std as a mean of 0/1 flags; a float mean of ones can land a hair
# below 1.
_ALL = 1.0 - 1e-6


class DegenerateRunError(RuntimeError):
    """A stage's result cannot be learned from or compared; the message says why and what to
    change."""


def enforce(findings: Sequence[str], *, stage: str, allow: bool, kept: str = "") -> list[str]:
    """Raise on ``findings`` unless ``allow`` (``<stage>.allow_degenerate``); else warn.

    Returns the warnings to record under ``warnings`` in the stage's metrics.json (empty when
    nothing was found). Call it after measuring and before writing any output, so a refused run
    leaves the previous outputs as they were; ``kept`` names anything the stage did write
    anyway (training curves), for the message.
    """
    if not findings:
        return []
    if allow:
        for finding in findings:
            log.warning("%s (going on: %s.allow_degenerate is true)", finding, stage)
        return list(findings)
    listed = "\n".join(f"- {f}" for f in findings)
    raise DegenerateRunError(
        f"stage {stage} produced a degenerate result:\n{listed}\n"
        f"Nothing was published: the stage's previous outputs are left as they were{kept}. "
        f"Change the params named above, or set {stage}.allow_degenerate: true to go on anyway "
        "(the findings are then recorded as warnings in its metrics file and in the report)."
    )


def answered_share(completions: Iterable[str]) -> float:
    """Share of ``completions`` with a gradable final answer (``extract_answer`` finds one).

    An accuracy of 0.0 from a model that answers wrongly and from one that never reaches its
    answer line look the same; this tells them apart.

    >>> answered_share(["1+2=3\\nAnswer: 3", "1+2=3\\n1+"])
    0.5
    """
    texts = list(completions)
    return sum(extract_answer(t) is not None for t in texts) / len(texts) if texts else 0.0


def bootstrap_findings(metrics: Mapping[str, Any], *, kind: str, where: str) -> list[str]:
    """Can the pair be graded, and is there a gap to relay? (the bootstrap's measurement)

    ``metrics`` holds ``{student,teacher}_accuracy``, ``{student,teacher}_answered`` (see
    :func:`answered_share`) and ``n_eval``; ``where`` is the stage's model folder, named in
    messages. One finding per root cause: a model that never answers is not also reported as
    inaccurate.
    """
    n = metrics["n_eval"]
    if kind == "pretrained":
        grow = {
            "student": "a fine-tune, bootstrap.student_train",
            "teacher": (
                "bootstrap.teacher_train.steps, or a stronger teacher_source / teacher_server"
            ),
        }
    else:
        grow = {
            "student": "bootstrap.student_train.steps",
            "teacher": "bootstrap.teacher_train.steps, or a larger bootstrap.teacher",
        }
    findings = []
    for role in ("student", "teacher"):
        if metrics.get(f"{role}_answered") == 0:
            findings.append(
                f"bootstrap: the {role} ({where}/{role}) wrote no gradable final answer in any "
                f"of its {n} eval completions ({role}_answered = 0), so its accuracy of "
                f"{metrics[f'{role}_accuracy']} measures nothing. Give it room to reach its "
                "answer line (bootstrap.max_new_tokens), check its prompt "
                f"(bootstrap.chat_template), or train it on the task ({grow[role]})"
            )
    if metrics.get("teacher_answered") == 0:
        return findings
    s, t = metrics["student_accuracy"], metrics["teacher_accuracy"]
    if t == 0:
        findings.append(
            f"bootstrap: the teacher ({where}/teacher) is right on none of the {n} eval "
            "problems (teacher_accuracy = 0): it has nothing to give the student. Train it "
            f"longer or better ({grow['teacher']})"
        )
    elif t <= s:
        findings.append(
            f"bootstrap: the teacher ({where}/teacher, accuracy {t}) is not more accurate than "
            f"the student ({s}) on the {n} eval problems: there is no gap for the relay to "
            f"recover. Make the teacher stronger ({grow['teacher']}) or the student weaker on "
            "the task (bootstrap.student_train, e.g. its withhold)"
        )
    return findings


def warmup_findings(
    n_examples: int, n_own: int, n_commands: int, *, n_samples: int, where: str
) -> list[str]:
    """Is the warm-up table the student's own text, with commands in it?

    ``n_own`` rows are the student's own right answers (the rest are reference solutions from
    ``top_up_with_reference``); ``n_commands`` commands were inserted over all rows; ``where``
    is the table's path, named in messages.
    """
    findings = []
    if n_examples and n_own == 0:
        findings.append(
            f"warmup_data: all {n_examples} rows of the warm-up table ({where}) are reference "
            f"solutions (n_reference_examples = {n_examples}): the student got none of its "
            f"{n_samples} sampled completions right, so warm-up would train it on text it does "
            "not write (the method warms up on the student's own answers). Make the student "
            "reach a right answer (warmup_data.max_new_tokens, warmup_data.chat_template, "
            "warmup_data.temperature; or bootstrap.max_new_tokens / student_train) or sample "
            "more (warmup_data.n_problems, warmup_data.samples_per_problem)"
        )
    if n_examples and n_commands == 0:
        findings.append(
            f"warmup_data: no <call>n</call> command was inserted in any of the {n_examples} "
            f"warm-up examples ({where}, commands_per_example = 0): SFT would never show the "
            "student the command. Raise warmup_data.insert.max_commands (policies random, "
            "disagreement) or warmup_data.insert.threshold (policy uncertainty); under policy "
            "mistakes the student already writes every reference token itself: it has no gap"
        )
    return findings


def reward_findings(log_history: Sequence[Mapping[str, Any]], *, where: str) -> list[str]:
    """Did any GRPO group ever see different rewards? (trl's per-step ``frac_reward_zero_std``)

    ``log_history`` is ``trainer.state.log_history``; ``where`` names the training curves.
    When every group of every logged step has zero reward spread, every advantage is zero and
    the policy gets no gradient from the reward. No logged step (``logging_steps`` above
    ``max_steps``) gives no finding: nothing to judge.
    """
    steps = [h for h in log_history if h.get("frac_reward_zero_std") is not None]
    if not steps or any(h["frac_reward_zero_std"] < _ALL for h in steps):
        return []
    means = sorted({round(float(h["reward"]), 4) for h in steps if h.get("reward") is not None})
    rewards = ", ".join(f"{r:g}" for r in means[:5]) + (", ..." if len(means) > 5 else "")
    return [
        f"grpo: in all {len(steps)} logged steps every group's rollouts earned the same reward "
        f"(trl's frac_reward_zero_std = 1 at every step; mean rewards: {rewards or 'not logged'}; "
        f"curves in {where}): every advantage was zero, so the policy learned nothing from the "
        "reward. Usually no rollout is right and none calls: check the warm-up student "
        "(data/sft/metrics.json), give rollouts room to answer (grpo.max_new_tokens), more "
        "variety (grpo.trainer.temperature, grpo.trainer.num_generations), or another reward "
        "(grpo.reward)"
    ]


def unchanged_findings(
    before: str, after: str, *, stage: str, source: str, target: str
) -> list[str]:
    """Is the model trained from ``source`` for ``target`` bit-identical to its input?

    ``before`` and ``after`` are :func:`weights_digest` values taken around training.
    """
    if before != after:
        return []
    return [
        f"{stage}: the model trained for {target} is identical to its input {source} (every weight "
        f"unchanged): training moved nothing. Raise {stage}.trainer.learning_rate or "
        f"{stage}.trainer.max_steps, and check that the loss has a signal (the logged loss "
        f"and, for grpo, the reward spread)"
    ]


def weights_digest(model: Any) -> str:
    """sha256 over a model's state dict (names and exact bytes, any dtype or device).

    Taken before and after training, it says whether training changed any weight at all,
    without holding a second copy of the model in memory.
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        flat = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
        h.update(flat.cpu().numpy())
    return h.hexdigest()


def no_gap(modes: Mapping[str, Mapping[str, float]]) -> str | None:
    """Why there is no student-to-teacher gap to recover (None: there is one, or no modes).

    ``modes`` maps evaluation modes to their summaries (``accuracy``, ``teacher_tokens``, ...),
    as the report builds them.
    """
    if "student" not in modes or "teacher" not in modes:
        return None
    s, t = modes["student"]["accuracy"], modes["teacher"]["accuracy"]
    if t > s:
        return None
    return (
        f"the teacher ({t:.4g}) is not more accurate than the student ({s:.4g}): no gap to "
        "recover and no teacher use worth buying (see bootstrap.teacher_train)"
    )


def no_calls(modes: Mapping[str, Mapping[str, float]]) -> str | None:
    """Why the relay has no teacher use to compare (None: it called, or was not evaluated)."""
    if "relay" not in modes or modes["relay"]["teacher_tokens"] > 0:
        return None
    return (
        "the relay made no teacher calls (0 teacher tokens per request): it is the student "
        "decoding alone, so there is no teacher use to reduce"
    )


def no_better_than_router(modes: Mapping[str, Mapping[str, float]]) -> str | None:
    """Why the relay's calls buy nothing (None: it beats the random router at its own teacher
    share, or either was not evaluated, or it never called: :func:`no_calls` says that).

    ``modes["random_router"]`` is the router curve read at the relay's call ratio, as the report
    builds it. A relay no more accurate than a coin flip spending the same teacher tokens has
    learned nothing about *where* to call, whatever its accuracy against the student. A call
    bias forced far above the trained share ends here: on the micro preset at a 10 % target,
    about six calls per problem, 15-23 % of requests spending the whole per-request teacher
    budget (README, "One student, any teacher budget").
    """
    if "relay" not in modes or "random_router" not in modes:
        return None
    relay, router = modes["relay"], modes["random_router"]
    if relay["teacher_tokens"] <= 0 or relay["accuracy"] > router["accuracy"]:
        return None
    return (
        f"the relay ({relay['accuracy']:.4g}) is no more accurate than a random router handing "
        f"the teacher the same share of tokens ({router['accuracy']:.4g} at call ratio "
        f"{relay['call_ratio']:.4g}): its calls buy nothing a coin flip would not (a call bias "
        "far above the trained share does this; see the relay's Pareto curve)"
    )
