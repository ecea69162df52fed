"""The call-command grammar: round trips and malformed input (property tests)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relaypipe.relay.grammar import (
    CALL_CLOSE,
    CALL_OPEN,
    MAX_CALL_DIGITS,
    TAG_PREFIXES,
    MalformedCall,
    format_call,
    parse_call,
    parse_call_body,
    spelled_tag_mask,
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


# One "3" (or "13") in each of several Unicode digit classes: \d and int() take the decimal
# ones (category Nd) as numbers; none is a token count.
NON_ASCII_DIGITS = {
    "arabic-indic": "\u0663",  # ٣
    "extended-arabic-indic": "\u06f3",  # ۳
    "devanagari": "\u0969",  # ३
    "bengali": "\u09e9",  # ৩
    "thai": "\u0e53",  # ๓
    "full-width": "\uff13",  # ３
    "superscript": "\u00b3",  # ³
    "subscript": "\u2083",  # ₃
    "circled": "\u2462",  # ③
    "math-bold": "\U0001d7d1",  # 𝟑
    "math-double-struck": "\U0001d7db",  # 𝟛
    "ascii-then-arabic-indic": "1\u0663",
    "full-width-then-ascii": "\uff11" + "3",
}


@pytest.mark.parametrize("digits", NON_ASCII_DIGITS.values(), ids=NON_ASCII_DIGITS.keys())
def test_non_ascii_digits_are_malformed(digits):
    for body in (digits, f" {digits} ", f"\t{digits}"):
        with pytest.raises(MalformedCall, match="not a non-negative integer in ASCII digits"):
            parse_call_body(body)
        with pytest.raises(MalformedCall):
            parse_call(f"{CALL_OPEN}{body}{CALL_CLOSE}")


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\u3000", "\x1c", "\x85", "\u2028"])
def test_only_ascii_whitespace_may_surround_the_digits(space):
    for body in (f"{space}3", f"3{space}", f" {space}3 "):
        with pytest.raises(MalformedCall, match="not a non-negative integer"):
            parse_call_body(body)
    with pytest.raises(MalformedCall):
        parse_call(f"{space}{CALL_OPEN}3{CALL_CLOSE}")


@pytest.mark.parametrize("body", ["3", " 3", "3 ", "\t3\n", "\r\x0b\x0c3 \n", "007"])
def test_ascii_digits_in_ascii_whitespace_parse(body):
    assert parse_call_body(body) == int(body)
    assert parse_call(f" \n{CALL_OPEN}{body}{CALL_CLOSE}\t") == int(body)


ASCII_BODY = re.compile(r"[ \t\n\r\f\v]*[0-9]+[ \t\n\r\f\v]*")
# Bodies mixing ASCII digits and whitespace with digits, numbers and spaces of other scripts.
unicode_bodies = st.text(
    alphabet=st.one_of(
        st.sampled_from("0123456789 \t\n"),
        st.characters(categories=["Nd", "No", "Nl", "Zs", "Zl", "Zp", "Cc"]),
    ),
    max_size=8,
)


@settings(max_examples=500)
@given(unicode_bodies)
@example("\u0663")
@example("\U0001d7d1\U0001d7d2")
def test_a_body_parses_exactly_when_it_is_ascii_digits_in_ascii_whitespace(body):
    ascii_count = ASCII_BODY.fullmatch(body) is not None
    digits = body.strip(" \t\n\r\f\v")
    if ascii_count and len(digits.lstrip("0")) <= MAX_CALL_DIGITS:
        assert parse_call_body(body) == int(digits)
    else:
        with pytest.raises(MalformedCall):
            parse_call_body(body)


# spelled_tag_mask: tags written out in ordinary tokens' text


def _visible(pieces, mask):
    return "".join(p for p, hide in zip(pieces, mask, strict=True) if not hide)


def test_spelled_tags_are_hidden_across_pieces_and_the_rest_is_kept():
    pieces = ["12", "<", "ca", "ll", ">", "3", "</", "call", ">", "+4"]
    mask = spelled_tag_mask(pieces)
    assert _visible(pieces, mask) == "123+4"
    assert spelled_tag_mask(["a", "b<call>c", "d"]) == [False, True, False]  # hidden whole


def test_a_tag_left_by_hiding_another_is_hidden_too():
    pieces = ["<ca", "<call>", "ll>", "x"]
    assert spelled_tag_mask(pieces) == [True, True, True, False]


@pytest.mark.parametrize("tail", TAG_PREFIXES)
def test_a_trailing_proper_prefix_of_a_tag_is_hidden_and_elsewhere_kept(tail):
    pieces = ["7", *tail]
    assert _visible(pieces, spelled_tag_mask(pieces)) == "7"
    pieces = ["7", *tail, "x"]  # not a tag, and no longer one in the making
    assert not any(spelled_tag_mask(pieces))


def test_empty_pieces_are_never_hidden_and_do_not_break_a_spelling():
    pieces = ["<ca", "", "ll>", "1", ""]
    assert spelled_tag_mask(pieces) == [True, False, True, False, False]
    assert spelled_tag_mask([]) == []


tag_text = st.sampled_from([CALL_OPEN, CALL_CLOSE, "<", "<c", "</", "call", ">", "</call"])


@settings(max_examples=300)
@given(st.lists(st.one_of(st.text(alphabet="<>/cal1x ", max_size=4), tag_text), max_size=12))
def test_what_spelled_tag_mask_keeps_holds_no_tag_nor_ends_in_part_of_one(pieces):
    mask = spelled_tag_mask(pieces)
    kept = _visible(pieces, mask)
    assert CALL_OPEN not in kept and CALL_CLOSE not in kept
    assert not kept.endswith(TAG_PREFIXES)
    # only pieces that touch a tag (or the trailing prefix) go; text without "<" is untouched
    if "<" not in "".join(pieces):
        assert not any(mask)
