"""Typed results of a relay decode: every generated token with its provenance.

A :class:`RelayTrace` is the one record the rest of relaypipe reads: training turns it into
completion ids and an ``env_mask``; evaluation and cost accounting read its counts and
hand-offs. Token lists are in the *student's* view (commands included); the teacher's view is
the same list with command tokens dropped, and with any other tag token and any tag spelled out
in ordinary tokens (see :meth:`RelayTrace.teacher_view_ids`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import IntEnum

from relaypipe.relay.grammar import spelled_tag_mask


class Source(IntEnum):
    """Who wrote a generated token."""

    STUDENT = 0
    TEACHER = 1
    # part of a call command (written by the student, never shown to the teacher): a closed
    # one, a malformed one, a stray close tag, or an open one never closed (at the end of the
    # request, or abandoned when the pen passed to the teacher before its close tag)
    COMMAND = 2


class StopReason:
    STUDENT_EOS = "student_eos"
    TEACHER_EOS = "teacher_eos"
    MAX_NEW_TOKENS = "max_new_tokens"
    MAX_TURNS = "max_turns"
    TEACHER_ERROR = "teacher_error"
    # teacher mode only (nobody else may write): a teacher budget of RelayConfig is spent
    MAX_TEACHER_TOKENS = "max_teacher_tokens"
    MAX_CALLS = "max_calls"


@dataclass
class HandOff:
    """One span written by the teacher."""

    start: int  # index into RelayTrace.token_ids of the span's first token
    requested: int  # the n the student asked for (after fixed_help substitution)
    granted: int  # n after clipping by budgets and bounds
    delivered: int  # tokens the teacher actually returned (may stop early at EOS)
    prefill_tokens: int  # context tokens the teacher processed for this call (with its cache)
    context_tokens: int  # full teacher-view context at the call (what an uncached teacher reads)
    # wall time from handing the span to the teacher until it came back: waiting for company
    # (the teacher hold) and the teacher steps it shared with other requests included
    seconds: float = 0.0


@dataclass
class CallEvent:
    """Something notable about a command: malformed, clipped, refused by a budget or a mode."""

    position: int  # index into RelayTrace.token_ids of the command's closing tag (or last token)
    # "malformed" | "clipped" | "budget" | "blocked" | "unterminated" | "teacher_error";
    # "unterminated": a <call> never closed, at the end of the request or at a hand-off
    kind: str
    detail: str


@dataclass
class RelayTrace:
    """The outcome of one request."""

    request_id: int
    prompt_ids: list[int]  # [P]
    token_ids: list[int] = field(default_factory=list)  # [T] generated, student view
    sources: list[int] = field(default_factory=list)  # [T] Source of each generated token
    handoffs: list[HandOff] = field(default_factory=list)
    events: list[CallEvent] = field(default_factory=list)
    stop_reason: str = ""
    turns: int = 0  # student generation rounds
    student_prefill_tokens: int = 0  # context tokens the student processed over all its rounds
    seconds: float = 0.0  # wall time from this request's start (admission) until it finished

    def count(self, source: Source) -> int:
        return sum(1 for s in self.sources if s == source)

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)

    @property
    def n_teacher(self) -> int:
        return self.count(Source.TEACHER)

    @property
    def n_student(self) -> int:
        """Tokens the student wrote, its commands included."""
        return self.n_generated - self.n_teacher

    @property
    def n_command(self) -> int:
        return self.count(Source.COMMAND)

    @property
    def calls(self) -> int:
        """Hand-offs that actually ran (a command refused by a budget is not a call)."""
        return len(self.handoffs)

    @property
    def call_ratio(self) -> float:
        """Teacher-generated tokens over all generated tokens (the paper's cost measure)."""
        return self.n_teacher / self.n_generated if self.token_ids else 0.0

    @property
    def teacher_prefill_tokens(self) -> int:
        return sum(h.prefill_tokens for h in self.handoffs)

    @property
    def teacher_context_tokens(self) -> int:
        return sum(h.context_tokens for h in self.handoffs)

    def teacher_view_ids(
        self,
        tag_ids: Collection[int] = (),
        piece: Callable[[int], str] | None = None,
    ) -> list[int]:
        """Prompt plus generated tokens as the teacher sees them: without commands (tokens of
        Source.COMMAND), without any other token in ``tag_ids`` (a tag the teacher wrote
        itself, which stays the teacher's token in the trace), and, given ``piece`` (the text
        of a token), without ordinary tokens that spell a tag out or end the view in part of
        one (:func:`~relaypipe.relay.grammar.spelled_tag_mask`). The prompt is kept as given.
        The relay decoder passes both; without them this is the view with commands dropped.
        """
        tags = frozenset(tag_ids)
        kept = [
            t
            for t, s in zip(self.token_ids, self.sources, strict=True)
            if s != Source.COMMAND and t not in tags
        ]
        if piece is not None:
            spelled = spelled_tag_mask([piece(t) for t in kept])
            kept = [t for t, hide in zip(kept, spelled, strict=True) if not hide]
        return self.prompt_ids + kept

    def teacher_mask(self) -> list[int]:
        """[T] 1 where the teacher wrote the token: the tokens to keep out of a policy loss."""
        return [int(s == Source.TEACHER) for s in self.sources]
