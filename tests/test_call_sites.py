"""Where calls land (relaypipe/evaluate/call_sites.py), on hand-built traces."""

from __future__ import annotations

import re

from relaypipe.evaluate.call_sites import call_sites, teacher_view_chars
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.relay.trace import RelayTrace, Source

TOK = build_char_tokenizer()
S, T, C = Source.STUDENT, Source.TEACHER, Source.COMMAND
HARD = re.compile(r"(?<=\+)[78]=\d+")


def trace(*pieces: tuple[str, Source]) -> RelayTrace:
    tr = RelayTrace(request_id=0, prompt_ids=[])
    for text, source in pieces:
        ids = TOK(text, add_special_tokens=False).input_ids
        tr.token_ids += ids
        tr.sources += [source] * len(ids)
    return tr


def test_teacher_view_drops_commands_and_keeps_who_wrote_each_character():
    tr = trace(("3+", S), ("<call>4</call>", C), ("7=10", T), ("\n", S))
    text, owners = teacher_view_chars(tr, TOK)
    assert text == "3+7=10\n"
    assert owners == [S, S, T, T, T, T, S]


def test_counts_hard_spans_started_by_the_teacher_and_the_teacher_share_inside_them():
    timely = trace(("3+", S), ("<call>4</call>", C), ("7=10", T), ("\n10+2=12", S))
    late = trace(("4+8", S), ("<call>2</call>", C), ("=1", T), ("2\n12+", S), ("1=1", T), ("3", S))
    result = call_sites([timely, late], TOK, HARD)
    # hard spans: "7=10" (teacher from its first character) and "8=12" (the student wrote "8")
    assert result["hard_spans"] == 2
    assert result["hard_started_by_teacher"] == 0.5
    # teacher characters: "7=10" and "=1" inside hard spans (6), "1=1" outside (3)
    assert result["teacher_chars"] == 9
    assert result["teacher_chars_on_hard"] == round(6 / 9, 4)


def test_no_hard_span_and_no_teacher_give_zeros_not_errors():
    result = call_sites([trace(("1+2=3", S))], TOK, HARD)
    assert result == {
        "hard_spans": 0,
        "hard_started_by_teacher": 0.0,
        "teacher_chars": 0,
        "teacher_chars_on_hard": 0.0,
    }
