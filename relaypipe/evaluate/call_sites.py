"""Where calls land: the teacher's share of known-hard spans of the answers.

When the tokens a student cannot write are known in advance (the default micro student never
saw a step adding 7 or 8: ``bootstrap.student_train.withhold``), a regular expression over the
answer text marks them, and a relay trace says who wrote each character. Two numbers follow:
how many hard spans the teacher started (the call came in time, so the student never wrote a
token it does not know) and how much of the teacher's text lies inside hard spans (how much of
what was borrowed was needed). ``scripts/call_sites.py`` runs it on a model.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN, command_mask
from relaypipe.relay.trace import RelayTrace, Source


def teacher_view_chars(trace: RelayTrace, tok: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
    """The answer text as the reader sees it (no command, even one the decoder did not mark)
    and, per character, the Source of the token it came from."""
    open_id, close_id = tok.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
    in_command = command_mask(trace.token_ids, open_id, close_id)
    text, owners = [], []
    for token, source, command in zip(trace.token_ids, trace.sources, in_command, strict=True):
        if command or source == Source.COMMAND:
            continue
        piece = tok.decode([token], skip_special_tokens=True)
        text.append(piece)
        owners += [source] * len(piece)
    return "".join(text), owners


def call_sites(
    traces: list[RelayTrace], tok: PreTrainedTokenizerBase, hard: re.Pattern[str]
) -> dict[str, float | int]:
    """``hard_spans`` (matches of ``hard`` in all answers), ``hard_started_by_teacher`` (share of
    them whose first character the teacher wrote), ``teacher_chars`` and
    ``teacher_chars_on_hard`` (share of the teacher's characters inside a hard span)."""
    spans = started = teacher_total = teacher_on_hard = 0
    for trace in traces:
        text, owners = teacher_view_chars(trace, tok)
        inside = [False] * len(text)
        for m in hard.finditer(text):
            if m.end() == m.start():
                continue
            spans += 1
            started += owners[m.start()] == Source.TEACHER
            inside[m.start() : m.end()] = [True] * (m.end() - m.start())
        by_teacher = [o == Source.TEACHER for o in owners]
        teacher_total += sum(by_teacher)
        teacher_on_hard += sum(t and i for t, i in zip(by_teacher, inside, strict=True))
    return {
        "hard_spans": spans,
        "hard_started_by_teacher": round(started / spans, 4) if spans else 0.0,
        "teacher_chars": teacher_total,
        "teacher_chars_on_hard": round(teacher_on_hard / max(1, teacher_total), 4),
    }
