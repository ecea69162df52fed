"""GRPO rollouts that are relay decodes: the policy is the student, the teacher answers calls.

:func:`make_relay_rollout` builds trl's ``rollout_func(prompts, trainer) -> dict``. trl's
sampler already repeats each prompt ``num_generations`` times, so this returns exactly one
completion per received prompt. Completions are in the student's view (its commands included,
so the policy learns to write them); ``env_mask`` is 0 on teacher tokens so they stay out of
the policy loss (``mask_teacher_tokens=False`` reproduces the reference, which trains on them).
Extra fields (delivered teacher tokens, generated tokens, budget events) reach the rewards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from relaypipe.relay.backends import Backend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import RelayTrace, StopReason
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.tasks.grading import reader_text

log = logging.getLogger(__name__)

FINISHED = (StopReason.STUDENT_EOS, StopReason.TEACHER_EOS)


def rollout_fields(
    traces: list[RelayTrace], tokenizer: PreTrainedTokenizerBase, mask_teacher_tokens: bool
) -> dict[str, list]:
    """trl's rollout dict from relay traces (one completion per trace)."""
    return {
        "prompt_ids": [t.prompt_ids for t in traces],  # [N][P_i]
        "completion_ids": [t.token_ids for t in traces],  # [N][T_i]
        "logprobs": None,  # trl recomputes them with the policy
        # [N][T_i] 1 = policy token (student or command), 0 = teacher token (not trained on)
        "env_mask": [
            [1 - m for m in t.teacher_mask()] if mask_teacher_tokens else [1] * t.n_generated
            for t in traces
        ],
        # what the rewards grade: commands removed (trl's own decode keeps their bodies)
        "reader_text": [reader_text(tokenizer, t.token_ids) for t in traces],
        "teacher_tokens": [t.n_teacher for t in traces],
        "generated_tokens": [t.n_generated for t in traces],
        "calls": [t.calls for t in traces],
        "budget_events": [sum(e.kind in ("budget", "clipped") for e in t.events) for t in traces],
        # False: cut off by the length or turn bound before an end of sequence
        "finished": [t.stop_reason in FINISHED for t in traces],
    }


def make_relay_rollout(
    teacher: Backend,
    tokenizer: PreTrainedTokenizerBase,
    config: RelayConfig,
    mask_teacher_tokens: bool = True,
) -> Callable[[list[Any], Any], dict[str, list]]:
    """A trl ``rollout_func`` running relay decodes with ``trainer.model`` as the student."""
    calls = {"n": 0}

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, list]:
        model = trainer.model
        was_training = model.training
        args = trainer.args
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0)
        cfg = replace(
            config,
            student_sampling=sampling,
            max_new_tokens=args.max_completion_length or config.max_new_tokens,
            # a fresh seed per generation round keeps rollouts varied yet reproducible
            seed=config.seed * 100_003 + calls["n"],
        )
        calls["n"] += 1
        texts = [
            p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False)
            for p in prompts
        ]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        student = TransformersBackend(model, name="policy")
        try:
            traces = RelayDecoder(student, teacher, tokenizer, cfg).decode(ids)
        finally:
            model.train(was_training)
        fields = rollout_fields(traces, tokenizer, mask_teacher_tokens)
        _log_relay_metrics(trainer, traces, "train" if was_training else "eval")
        return fields

    return rollout


def _log_relay_metrics(trainer: Any, traces: list[RelayTrace], mode: str) -> None:
    """Per-step call rate and teacher-token share, logged with trl's own metrics."""
    metrics = getattr(trainer, "_metrics", None)
    if metrics is None or mode not in metrics or not traces:
        return
    generated = sum(t.n_generated for t in traces) or 1
    metrics[mode]["relay/call_rate"].append(sum(t.calls > 0 for t in traces) / len(traces))
    metrics[mode]["relay/calls_per_request"].append(sum(t.calls for t in traces) / len(traces))
    metrics[mode]["relay/teacher_share"].append(sum(t.n_teacher for t in traces) / generated)
    metrics[mode]["relay/malformed"].append(
        sum(e.kind == "malformed" for t in traces for e in t.events) / len(traces)
    )
