"""The call command: ``<call>n</call>`` asks the teacher for ``n`` tokens.

Three operations on text: :func:`format_call` writes a command, :func:`parse_call_body`
reads the ``n`` between the tags (strictly: a malformed or absurd body raises
:class:`MalformedCall` with the reason), and :func:`strip_calls` removes every command, well
formed or not, so the teacher never sees one. ``n == 0`` is a valid command meaning "no call".
:func:`drop_command_ids` does the same on token ids, for tokenizers that hold the tags as
single tokens: decoding with ``skip_special_tokens`` drops the tags but keeps the body, so
``Answer: <call>2</call>12`` would read ``Answer: 212``.

A body is ASCII digits ``0-9`` only, optionally surrounded by ASCII whitespace (space, tab,
newline, carriage return, form feed, vertical tab). Python's ``\\d`` and ``int()`` also accept
every other Unicode decimal digit (Arabic-Indic ``٣``, Devanagari ``३``, full-width ``３``,
mathematical ``𝟑``, ...), which a byte-level tokenizer can spell; such a body is malformed.

:func:`spelled_tag_mask` finds the tags where ordinary tokens spell them out as text (the
relay decoder honours only the tag *tokens*, but hides spelled tags from the teacher too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relaypipe.errors import InputError

CALL_OPEN = "<call>"
CALL_CLOSE = "</call>"
# More digits than this is absurd for a per-call token count and is refused outright, which
# also keeps int() away from pathological inputs.
MAX_CALL_DIGITS = 6

# ASCII only: str.strip(), \s and \d would take Unicode spaces and digits as well.
ASCII_WHITESPACE = " \t\n\r\f\v"
_BODY = re.compile(r"[ \t\n\r\f\v]*([0-9]+)[ \t\n\r\f\v]*")
# Non-greedy: a nested "<call>3<call>2</call>" is removed whole up to its first close tag.
_COMMAND = re.compile(re.escape(CALL_OPEN) + r".*?" + re.escape(CALL_CLOSE), re.DOTALL)
# An open tag never closed: the rest of the text is its body (as in drop_command_ids).
_UNTERMINATED = re.compile(re.escape(CALL_OPEN) + r".*\Z", re.DOTALL)
_STRAY_TAG = re.compile(re.escape(CALL_OPEN) + "|" + re.escape(CALL_CLOSE))
# Non-empty proper prefixes of a tag ("<", "<c", ..., "</call"), longest first.
TAG_PREFIXES = tuple(
    sorted(
        {tag[:k] for tag in (CALL_OPEN, CALL_CLOSE) for k in range(1, len(tag))},
        key=len,
        reverse=True,
    )
)


class MalformedCall(InputError):
    """A call command whose body is not a non-negative integer token count."""


def format_call(n: int) -> str:
    """The command asking for ``n`` teacher tokens.

    >>> format_call(12)
    '<call>12</call>'
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"a call asks for a non-negative integer number of tokens, got {n!r}")
    return f"{CALL_OPEN}{n}{CALL_CLOSE}"


def parse_call_body(body: str) -> int:
    """The ``n`` of a command body (the text between the tags): ASCII digits, optionally
    surrounded by ASCII whitespace.

    >>> parse_call_body(" 8")
    8
    >>> parse_call_body("-3")
    Traceback (most recent call last):
    ...
    relaypipe.relay.grammar.MalformedCall: call body '-3' is not a non-negative integer
    """
    if CALL_OPEN in body or CALL_CLOSE in body:
        raise MalformedCall(f"nested call command in body {body!r}")
    m = _BODY.fullmatch(body)
    if m is None:
        if not body.strip(ASCII_WHITESPACE):
            raise MalformedCall("empty call body: expected a token count such as <call>8</call>")
        if any(not ch.isascii() and ch.isnumeric() for ch in body):
            raise MalformedCall(
                f"call body {body!r} is not a non-negative integer in ASCII digits (0-9): "
                "other scripts' digits are not read as a token count"
            )
        raise MalformedCall(f"call body {body!r} is not a non-negative integer")
    digits = m.group(1)
    if len(digits.lstrip("0")) > MAX_CALL_DIGITS:
        raise MalformedCall(f"call body {digits[:12]!r}... has more than {MAX_CALL_DIGITS} digits")
    return int(digits)


def parse_call(text: str) -> int:
    """Parse one complete command ``<call>n</call>`` (surrounding ASCII whitespace allowed)."""
    s = text.strip(ASCII_WHITESPACE)
    if not (s.startswith(CALL_OPEN) and s.endswith(CALL_CLOSE)):
        raise MalformedCall(f"{text!r} is not of the form {CALL_OPEN}n{CALL_CLOSE}")
    return parse_call_body(s[len(CALL_OPEN) : -len(CALL_CLOSE)])


def strip_calls(text: str) -> str:
    """``text`` with every call command, an unterminated one through the end, and any stray
    close tag removed: the teacher's view, and the text a reader sees.

    >>> strip_calls("12+7=<call>4</call>19")
    '12+7=19'
    >>> strip_calls("Answer: 8<call>3")
    'Answer: 8'
    """
    return _STRAY_TAG.sub("", _UNTERMINATED.sub("", _COMMAND.sub("", text)))


def command_mask(ids: list[int], open_id: int, close_id: int) -> list[bool]:
    """[T] True where a token belongs to a command: from an open tag through its close tag, an
    unterminated open tag through the end, and any stray close tag.

    >>> command_mask([5, 1, 7, 2, 6, 2, 9, 1, 8], open_id=1, close_id=2)
    [False, True, True, True, False, True, False, True, True]
    """
    mask: list[bool] = []
    inside = False
    for token in ids:
        if token == open_id:
            inside = True
        mask.append(inside or token == close_id)
        if token == close_id:
            inside = False
    return mask


def drop_command_ids(ids: list[int], open_id: int, close_id: int) -> list[int]:
    """``ids`` without the tokens :func:`command_mask` marks.

    >>> drop_command_ids([5, 1, 7, 2, 6, 1, 9], open_id=1, close_id=2)
    [5, 6]
    """
    return [t for t, cmd in zip(ids, command_mask(ids, open_id, close_id), strict=True) if not cmd]


def spelled_tag_mask(pieces: Sequence[str]) -> list[bool]:
    """[T] True for each piece (the text of one token) that helps spell a call tag as text: a
    ``<call>`` or ``</call>`` written across one or more pieces, or a proper prefix of one
    (``<``, ``<ca``, ``</cal``, ...) at the very end, where the next piece could complete it.

    A piece is hidden whole (``x<`` starting a tag goes with it). The text left after hiding
    must hold no tag either (hiding ``<call>`` from ``<ca<call>ll>`` leaves ``<call>``), so the
    search repeats on what is left until nothing is found. Empty pieces (special tokens
    decoded with ``skip_special_tokens``) are never hidden.

    >>> spelled_tag_mask(["1", "<", "call", ">", "2", "</", "call>", "3"])
    [False, True, True, True, False, True, True, False]
    >>> spelled_tag_mask(["a<b", "<", "c"])  # a trailing "<c" may become "<call>"
    [False, True, True]
    >>> spelled_tag_mask(["1<2", "x"])
    [False, False]
    """
    hidden = [False] * len(pieces)
    while True:
        kept = [j for j, h in enumerate(hidden) if not h and pieces[j]]
        text = "".join(pieces[j] for j in kept)
        if "<" not in text:
            return hidden
        spans = [m.span() for m in _STRAY_TAG.finditer(text)]
        tail = next((p for p in TAG_PREFIXES if text.endswith(p)), None)
        if tail is not None:
            spans.append((len(text) - len(tail), len(text)))
        if not spans:
            return hidden
        start = 0
        for j in kept:
            end = start + len(pieces[j])
            if any(start < hi and end > lo for lo, hi in spans):
                hidden[j] = True
            start = end
