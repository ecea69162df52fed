"""The one grader: final-answer extraction and answer comparison.

GRPO rewards and evaluation must both call this module (``is_correct`` or
``extract_answer`` + ``answers_match``). If they graded differently, a run could raise its
reward while its measured accuracy stayed flat (or the reverse), and the two numbers would no
longer mean the same thing; the reference implementation had exactly that split.

Extraction understands three ways of stating a final answer, taking the last one of the
strongest kind present: LaTeX ``\\boxed{...}``/``\\fbox{...}``, GSM8K's ``#### 42`` line, and our
own ``Answer: 42`` line (``ANSWER_PREFIX``). Comparison goes through ``math-verify`` so
``\\frac{1}{2}`` matches ``0.5`` and ``(x+1)^2`` matches ``x^2+2x+1``; plain numbers take an exact
fast path.

Commands are never part of an answer. Every grading entry point reads the completion as its
reader sees it, with call commands removed: :func:`is_correct` strips textual commands, and
:func:`reader_text` turns token ids into that text (dropping command spans by id first, since
decoding with ``skip_special_tokens`` drops the tags but keeps the body: ``Answer:
<call>2</call>12`` would otherwise grade as ``212``).

Thread safety: math-verify guards parsing and comparison with ``signal.alarm`` timeouts, which
raise ``ValueError`` outside the main thread (Prefect runs tasks in worker threads) and, on the
main thread, cancel any SIGALRM timer the host process set. We switch them off everywhere
(``parsing_timeout=None``, ``timeout_seconds=None``, math-verify >= 0.8), so a completion grades
the same in a reward thread as in evaluation. In their place, a length cap and a size guard
reject the inputs known to hang sympy (towers like ``9^{9^{9^9}}``, huge factorials).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from math_verify import parse, verify
from sympy import Basic
from sympy.matrices import MatrixBase

from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN, drop_command_ids, strip_calls
from relaypipe.tasks.base import ANSWER_PREFIX

__all__ = ["answers_match", "extract_answer", "is_correct", "normalize_answer", "reader_text"]

logger = logging.getLogger(__name__)

# Older math-verify (e.g. 0.3.x, which pip falls back to when another package pins antlr4)
# hard-wires its signal timeouts; parse() would then raise TypeError on our keyword and every
# symbolic answer would silently grade as wrong, so refuse to run instead.
if "parsing_timeout" not in inspect.signature(parse).parameters:
    raise ImportError(
        "relaypipe's grader needs math-verify>=0.8 (parse(parsing_timeout=None) to run outside "
        "the main thread); install it with: pip install 'math-verify[antlr4_9_3]>=0.8'"
    )

# Longer "answers" are almost always a model rambling inside \boxed{}; parsing them with antlr
# and sympy costs seconds and never yields a match worth having.
MAX_ANSWER_CHARS = 500
# An answer with more digits than this (e.g. 9^{99999999}) makes sympy's comparison run for
# minutes; no task of ours has such an answer.
MAX_ANSWER_DIGITS = 10_000

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_LINE_RE = re.compile(
    rf"^[ \t]*{re.escape(ANSWER_PREFIX.strip())}[ \t]*(.*?)[ \t]*$", re.MULTILINE
)
# Only real thousands grouping ("1,234,567"): "1,2" is a pair, not twelve.
_THOUSANDS_RE = re.compile(r"^([+-]?\$?)(\d{1,3}(?:,\d{3})+)(\.\d+)?$")
_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def normalize_answer(value: str) -> str:
    """Tidy a final answer: strip, drop a trailing period and ``$...$``, ungroup thousands.

    >>> normalize_answer(" 1,234. ")
    '1234'
    >>> normalize_answer("$\\\\frac{1}{2}$")
    '\\\\frac{1}{2}'
    >>> normalize_answer("1,2")
    '1,2'
    """
    value = value.strip()
    if value.endswith("."):
        value = value[:-1].rstrip()
    if len(value) >= 2 and value[0] == value[-1] == "$" and "$" not in value[1:-1]:
        value = value[1:-1].strip()
    match = _THOUSANDS_RE.match(value)
    if match:
        sign, digits, fraction = match.groups()
        value = f"{sign}{digits.replace(',', '')}{fraction or ''}"
    return value


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED_RE.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _balanced(text, pos)
        else:
            # MATH occasionally writes "\boxed 5" without braces.
            bare = re.match(r"[^\s$]+", text[pos:]) if pos > match.end() else None
            content = bare.group(0) if bare else None
        # A truncated completion can end inside an unclosed box; an earlier complete one wins.
        if content is not None and content.strip():
            return content
    return None


def _balanced(text: str, open_pos: int) -> str | None:
    """The text inside the brace group opening at open_pos, or None if it never closes."""
    depth = 0
    i = open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            # \{ and \} are literal braces (sets), not grouping.
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def _last_nonempty(pattern: re.Pattern[str], text: str) -> str | None:
    for match in reversed(list(pattern.finditer(text))):
        value = normalize_answer(match.group(1))
        if value:
            return value
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a completion or a reference solution, or None.

    Precedence: ``\\boxed{}``/``\\fbox{}``, then GSM8K's ``####``, then an ``Answer:`` line;
    within a kind the last occurrence counts.

    >>> extract_answer("so $x = \\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_answer("\\\\boxed{1} then \\\\boxed{\\\\{1, 2\\\\}}")
    '\\\\{1, 2\\\\}'
    >>> extract_answer("She pays 1,200 + 34.\\n#### 1,234")
    '1234'
    >>> extract_answer("6 * 7 = 42\\nAnswer: 42.")
    '42'
    >>> extract_answer("Answer: 3\\n#### 4")
    '4'
    >>> extract_answer("no final answer here") is None
    True
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        value = normalize_answer(boxed)
        if value:
            return value
    return _last_nonempty(_GSM8K_RE, text) or _last_nonempty(_ANSWER_LINE_RE, text)


def _plain_number(value: str) -> Decimal | None:
    compact = normalize_answer(value.replace("$", "").replace(" ", ""))
    if not _PLAIN_NUMBER_RE.match(compact):
        return None
    try:
        return Decimal(compact)
    except InvalidOperation:
        return None


def _as_math(value: str) -> str:
    # math-verify finds LaTeX only between math delimiters; bare "Monday" or "\frac12" would
    # otherwise parse to nothing.
    return f"${value.replace('$', '').strip()}$"


def _log10_bound(expr: object) -> float:
    """A loose upper bound on log10|expr| for numeric subtrees (symbols count as 10)."""
    if isinstance(expr, MatrixBase):
        return max((_log10_bound(item) for item in expr), default=0.0)
    if not isinstance(expr, Basic):
        return 0.0
    if expr.is_Integer or expr.is_Rational:
        numerator = abs(int(expr.p))
        return math.log10(numerator) if numerator > 1 else 0.0
    if expr.is_Float:
        magnitude = abs(float(expr))
        return math.log10(magnitude) if magnitude > 1 else 0.0
    if expr.is_Symbol or not expr.args:
        return 1.0
    args = [_log10_bound(arg) for arg in expr.args]
    name = type(expr).__name__
    if expr.is_Pow:
        base, exponent = args
        return _times_pow10(max(base, 1.0), exponent)
    if name in {"factorial", "factorial2", "gamma", "subfactorial", "exp"}:
        return _times_pow10(max(args[0], 1.0), args[0])
    if expr.is_Mul:
        return sum(args)
    if expr.is_Add:
        return max(args) + 1.0
    return max(args)


def _times_pow10(factor: float, power: float) -> float:
    return math.inf if power > 300 else factor * 10.0**power


def _too_big(parsed: list[object]) -> bool:
    return any(_log10_bound(item) > MAX_ANSWER_DIGITS for item in parsed)


def _parse_math(value: str) -> list[object]:
    # None disables math-verify's signal-based timeout (see the module docstring).
    parsed = parse(_as_math(value), parsing_timeout=None)
    # Unparsed leftovers come back as raw strings; comparing those would be string equality,
    # which is what this grader exists to avoid (and would match garbage like "}{" to itself).
    return [item for item in parsed if isinstance(item, Basic | MatrixBase)]


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether a predicted final answer equals the reference, mathematically.

    Plain numbers compare exactly ("72" == "72.0" == "$72"); anything else goes through
    math-verify. Never raises: unparsable or pathological input is simply not a match.
    """
    if not isinstance(predicted, str) or not isinstance(reference, str):
        return False
    predicted, reference = predicted.strip(), reference.strip()
    if not predicted or not reference:
        return False
    if len(predicted) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    predicted_number, reference_number = _plain_number(predicted), _plain_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    try:
        gold = _parse_math(reference)
        target = _parse_math(predicted)
        if not gold or not target or _too_big(gold) or _too_big(target):
            return False
        # verify is not symmetric: the reference must go first.
        return bool(verify(gold, target, timeout_seconds=None))
    except Exception:  # a reward function must not crash a training step over one completion
        logger.debug("grading failed for %r vs %r", predicted, reference, exc_info=True)
        return False


def reader_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Generated token ids as the reader sees them: call commands (tags and body, closed or
    not) removed, other special tokens (EOS, chat markers) dropped. The text to grade and show.
    """
    open_id, close_id = tokenizer.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
    kept = drop_command_ids(list(token_ids), open_id, close_id)
    # A tokenizer without the tags as single tokens spells them as text: strip those too.
    return strip_calls(tokenizer.decode(kept, skip_special_tokens=True))


def is_correct(completion: str, reference_answer: str) -> bool:
    """Whether a completion's final answer matches the reference answer; call commands in the
    completion's text are not part of it.

    >>> is_correct("3+9=12\\nAnswer: <call>2</call>12", "12")
    True
    """
    return answers_match(extract_answer(strip_calls(completion)), reference_answer)
