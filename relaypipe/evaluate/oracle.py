r"""The oracle caller: where a caller that could read the teacher's mind would call.

What "oracle" means here. Student and teacher read one transcript (the prompt and every token
generated so far; no command ever enters it) and both decode greedily. At each step the
student proposes its greedy token ``s``; the teacher, reading the same transcript, has its own
greedy token ``t`` and gives ``s`` the probability ``p_T(s)``. The oracle at threshold ``tau``
hands that step to the teacher, who writes ``t``, when the teacher would not have written the
student's token and is sure of it:

    t != s  and  p_T(s) < tau

Otherwise the student writes ``s``. Consecutive teacher tokens are one hand-off (one call) of
at most ``max_call_tokens`` tokens; a longer run is several calls. No task-specific knowledge
is used (no reference solution, no pattern of hard steps): the teacher is the judge.

The knob. ``tau = 0`` never calls (the student alone). A small ``tau`` calls only where the
teacher is surest that the student's token is wrong; a larger one also where it is less sure.
Since ``t != s`` implies ``p_T(s) < 0.5``, every ``tau >= 0.5`` calls at *every* disagreement:
the transcript is then, token for token, the teacher's own greedy answer (by induction: each
token is the teacher's greedy choice on the same prefix), bought with the fewest teacher
tokens that give it, unless a budget runs out first. Such a run is *saturated*: teacher tokens
beyond it, at steps where the two agree, would write the same tokens, so more teacher share
cannot make this oracle more accurate (relaypipe/evaluate/oracle_curve.py uses that).

Not a deployable caller. It runs the teacher on every token to decide (a teacher forward pass
per step, prefill of the whole transcript), so its cost is no cost a deployment could have:
it is an upper-bound reference for *where* to call at a given teacher share, the curve the
relay's learned calls are compared with (report: ``oracle_curve``, ``relay_vs_oracle``).

Bounds (the relay's, so that shares compare; :class:`OracleLimits`): ``max_new_tokens``
generated tokens per request; per-request budgets ``max_teacher_tokens`` (teacher tokens) and
``max_calls`` (hand-offs); ``max_call_tokens`` per hand-off; and, as every hand-off ends a
student turn, at most ``max_turns - 1`` hand-offs (the student's runs stay within
``max_turns``). A step the oracle would hand over when a budget is spent is the student's.

Tags. Neither model may write ``<call>`` or ``</call>`` here (their logits are masked): the
oracle places all help, and the transcript stays plain text for both.

Accounting, as the relay's rows (relaypipe/evaluate/cost.py): teacher share = teacher tokens /
generated tokens (there are no command tokens). Each model reads the whole transcript, one
forward pass per step: every token but the last generated one. What it read and did not write
itself is its prefill (``student_prefill_tokens``, ``teacher_prefill_tokens``; for the teacher,
the prompt and the student's tokens: it judges every step), so FLOPs count the peeking;
``teacher_context_tokens`` is the transcript re-read at every judged step (a teacher without a
KV cache).

Implementation: batched greedy decoding with each model's own KV cache
(``cache``), prompts left-padded, one forward pass per model per step; rows may
carry different thresholds (a sweep decodes as one batch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from relaypipe.bounds import RelayBounds

__all__ = ["SATURATED_TAU", "OracleLimits", "OracleTrace", "oracle_decode"]

# Every threshold from here on calls at every disagreement (module docstring).
SATURATED_TAU = 0.5


@dataclass(frozen=True)
class OracleLimits:
    """The relay's bounds, as the oracle applies them (module docstring, "Bounds")."""

    max_new_tokens: int
    max_call_tokens: int
    max_teacher_tokens: int | None = None
    max_calls: int | None = None
    max_turns: int = 32

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_call_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_teacher_tokens", "max_calls"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")

    @classmethod
    def from_bounds(cls, bounds: RelayBounds, max_new_tokens: int) -> OracleLimits:
        return cls(max_new_tokens=max_new_tokens, **bounds.relay_kwargs())

    @property
    def call_cap(self) -> int:
        """Hand-offs allowed per request: ``max_calls``, and ``max_turns - 1``."""
        cap = self.max_turns - 1
        return cap if self.max_calls is None else min(cap, self.max_calls)


@dataclass
class OracleTrace:
    """One request decoded by the oracle."""

    tau: float
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # generated (EOS included if written)
    teacher: list[bool] = field(default_factory=list)  # per generated token: the teacher's
    calls: int = 0  # hand-offs (runs of teacher tokens, each at most max_call_tokens)
    refused: int = 0  # steps the oracle would have handed over with a budget spent
    teacher_context_tokens: int = 0  # transcript tokens at every judged step, summed
    stop_reason: str = ""  # eos | max_new_tokens
    seconds: float = 0.0  # from the batch start until this request ended

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)

    @property
    def n_teacher(self) -> int:
        return sum(self.teacher)

    @property
    def n_student(self) -> int:
        return self.n_generated - self.n_teacher

    @property
    def student_prefill_tokens(self) -> int:
        """The prompt and the teacher's tokens the student read (all but a last one)."""
        return self.prompt_tokens + sum(self.teacher[:-1])

    @property
    def teacher_prefill_tokens(self) -> int:
        """The prompt and the student's tokens the teacher read (all but a last one)."""
        return self.prompt_tokens + sum(not t for t in self.teacher[:-1])


def _left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, P]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class _Stepper:
    """One model decoding the shared transcript with its KV cache: logits of the next step."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = None

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        return out.logits[:, -1].float()  # [B, V]


@torch.inference_mode()
def oracle_decode(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    taus: Sequence[float],
    limits: OracleLimits,
    *,
    eos_ids: Collection[int],
    pad_id: int,
    banned_ids: Collection[int] = (),
) -> list[OracleTrace]:
    """Decode every prompt with the oracle at its threshold (``taus[i]`` for ``prompts[i]``).

    ``eos_ids`` end a request (the EOS token is kept, as the relay keeps it); ``banned_ids``
    (the call tags) are never written by either model; ``pad_id`` fills the left padding.
    Both models must share the tokenizer (the ids are one transcript).
    """
    if len(prompts) != len(taus):
        raise ValueError(f"{len(prompts)} prompts but {len(taus)} thresholds")
    bad = [t for t in taus if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise ValueError(f"oracle thresholds must be in [0, 1], got {bad}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt (a prompt needs a token)")
    traces = [
        OracleTrace(tau=float(t), prompt_tokens=len(p)) for p, t in zip(prompts, taus, strict=True)
    ]
    if not prompts:
        return traces
    start = time.perf_counter()
    device = next(student.parameters()).device
    ids, mask = _left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    tau = torch.tensor([float(t) for t in taus], device=device)  # [B]
    banned = sorted(set(banned_ids))
    eos = set(eos_ids)
    s_step, t_step = _Stepper(student), _Stepper(teacher)
    live = list(range(len(prompts)))
    run = [0] * len(prompts)  # length of the teacher run the last token belongs to (0: none)
    for step in range(limits.max_new_tokens):
        s_logits = s_step(ids, mask, positions)  # [B, V]
        t_logits = t_step(ids, mask, positions)  # [B, V]
        if banned:
            s_logits[:, banned] = -math.inf
            t_logits[:, banned] = -math.inf
        s_tok = s_logits.argmax(-1)  # [B]
        t_logp = t_logits.log_softmax(-1)  # [B, V]
        t_tok = t_logp.argmax(-1)  # [B]
        p_s = t_logp.gather(1, s_tok[:, None]).squeeze(1).exp()  # [B] teacher's p of s
        wants = ((t_tok != s_tok) & (p_s < tau)).tolist()
        s_list, t_list = s_tok.tolist(), t_tok.tolist()
        chosen = list(s_list)
        now = time.perf_counter() - start
        still = []
        for i in live:
            tr = traces[i]
            tr.teacher_context_tokens += tr.prompt_tokens + step
            handed = False
            if wants[i]:
                room = limits.max_teacher_tokens is None or tr.n_teacher < limits.max_teacher_tokens
                continues = 0 < run[i] < limits.max_call_tokens
                if room and (continues or tr.calls < limits.call_cap):
                    handed = True
                    if not continues:
                        tr.calls += 1
                        run[i] = 0
                    run[i] += 1
                else:
                    tr.refused += 1
            if not handed:
                run[i] = 0
            token = t_list[i] if handed else s_list[i]
            chosen[i] = token
            tr.token_ids.append(token)
            tr.teacher.append(handed)
            if token in eos or len(tr.token_ids) >= limits.max_new_tokens:
                tr.stop_reason = "eos" if token in eos else "max_new_tokens"
                tr.seconds = now
            else:
                still.append(i)
        live = still
        if not live:
            break
        ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]  # [B, 1]
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
    return traces
