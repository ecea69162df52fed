"""The call-command grammar: round trips and malformed input (property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaypipe.relay.grammar import (
    CALL_CLOSE,
    CALL_OPEN,
    MAX_CALL_DIGITS,
    MalformedCall,
    format_call,
    parse_call,
    parse_call_body,
    strip_calls,
)

plain_text = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40)


@given(st.integers(min_value=0, max_value=10**MAX_CALL_DIGITS - 1))
def test_format_parse_round_trip(n):
    assert parse_call(format_call(n)) == n


@given(plain_text, st.integers(min_value=0, max_value=999), plain_text)
def test_strip_removes_exactly_the_command(before, n, after):
    assert strip_calls(before + format_call(n) + after) == before + after


@given(st.lists(st.tuples(plain_text, st.integers(0, 99)), max_size=5), plain_text)
def test_strip_removes_every_command_and_nothing_else(parts, tail):
    text = "".join(t + format_call(n) for t, n in parts) + tail
    stripped = strip_calls(text)
    assert stripped == "".join(t for t, _ in parts) + tail
    assert CALL_OPEN not in stripped and CALL_CLOSE not in stripped


@given(st.text(max_size=60))
def test_strip_never_leaves_a_tag_and_parse_never_crashes_unexpectedly(text):
    assert CALL_OPEN not in strip_calls(text) and CALL_CLOSE not in strip_calls(text)
    try:
        n = parse_call(text)
    except MalformedCall:
        return
    assert n >= 0


@given(st.text(max_size=20).filter(lambda s: not s.strip().isdigit()))
def test_non_numeric_bodies_are_malformed(body):
    with pytest.raises(MalformedCall):
        parse_call_body(body)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<call></call>", "empty call body"),
        ("<call>-1</call>", "not a non-negative integer"),
        ("<call>1.5</call>", "not a non-negative integer"),
        ("<call>" + "9" * 40 + "</call>", "digits"),
        ("<call>3<call>2</call>", "nested"),
        ("<call>3", "is not of the form"),
        ("3</call>", "is not of the form"),
    ],
)
def test_malformed_examples(text, message):
    with pytest.raises(MalformedCall, match=message):
        parse_call(text)


def test_strip_handles_nested_and_stray_tags():
    assert strip_calls("a<call>3<call>2</call>b") == "ab"
    assert strip_calls("a</call>b<call>") == "ab"


def test_format_rejects_bad_n():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            format_call(bad)
