"""The micro trainer: loss-masked context commands (``TrainSpec.command_context``) and withheld
problems (``TrainSpec.withhold``)."""

from __future__ import annotations

import random
import re

import pytest

from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.micro.train_lm import (
    IGNORE,
    TrainSpec,
    add_context_commands,
    collate,
    withhold_problems,
)
from relaypipe.relay.grammar import strip_calls
from relaypipe.tasks.arith import ArithSpec, generate

TOK = build_char_tokenizer()


def examples(n: int = 40) -> list[tuple[list[int], int]]:
    out = []
    for p in generate(ArithSpec(difficulty=1, terms=4), n, seed=3, split="t"):
        prompt = TOK(f"Q: {p.question}\nA: ", add_special_tokens=False).input_ids
        body = TOK(p.solution, add_special_tokens=False).input_ids
        out.append((prompt + body + [TOK.eos_token_id], len(prompt)))
    return out


def test_commands_are_inserted_inside_the_solution_and_masked_exactly():
    plain = examples()
    mixed = add_context_commands(plain, TOK, 1.0, (1, 2, 4), random.Random(0))
    for (ids, prompt_len), (new, new_prompt_len, masked) in zip(plain, mixed, strict=True):
        assert new_prompt_len == prompt_len and new[:prompt_len] == ids[:prompt_len]
        assert new[-1] == TOK.eos_token_id  # EOS stays last, never behind a command
        text = TOK.decode(new[prompt_len:-1])
        assert 1 <= text.count("<call>") <= 3
        assert strip_calls(text) == TOK.decode(ids[prompt_len:-1])  # nothing else changed
        commands = {j for j, t in enumerate(new) if TOK.decode([t]) in ("<call>", "</call>")}
        assert commands <= masked  # tags are masked, and so are the n digits between them
        assert all(new_prompt_len < j < len(new) - 1 for j in masked)
        inserted = re.findall(r"<call>\d+</call>", text)
        assert len(masked) == sum(len(TOK(c, add_special_tokens=False).input_ids) for c in inserted)


def test_fraction_zero_changes_nothing_and_collate_ignores_masked_positions():
    plain = examples(5)
    same = add_context_commands(plain, TOK, 0.0, (1,), random.Random(0))
    assert [(i, p) for i, p, _ in same] == plain and all(not m for *_, m in same)
    mixed = add_context_commands(plain, TOK, 1.0, (2,), random.Random(1))
    input_ids, attention, labels = collate(mixed, TOK.pad_token_id)
    for row, (ids, prompt_len, masked) in enumerate(mixed):
        for j in range(len(ids)):
            expected = IGNORE if j < prompt_len or j in masked else ids[j]
            assert labels[row, j].item() == expected
        assert attention[row, : len(ids)].all() and input_ids[row, : len(ids)].tolist() == ids


@pytest.mark.parametrize("bad", [{"command_context": 1.5}, {"command_n_values": (0,)}])
def test_bad_command_context_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TrainSpec(steps=1, **bad)


def test_withhold_leaves_out_exactly_the_matching_problems():
    problems = generate(ArithSpec(difficulty=1, terms=4), 200, seed=5, split="t")
    kept = withhold_problems(problems, r"\+7=")
    assert kept and len(kept) < len(problems)
    assert all("+7=" not in p.solution for p in kept)
    assert [p for p in problems if "+7=" not in p.solution] == kept  # order kept, none lost
    assert withhold_problems(problems, None) is problems


def test_withhold_refuses_a_bad_pattern_and_one_that_leaves_nothing():
    with pytest.raises(ValueError, match="regular expression"):
        TrainSpec(steps=1, withhold="(+7")
    problems = generate(ArithSpec(difficulty=1, terms=4), 20, seed=5, split="t")
    with pytest.raises(ValueError, match="leaves no training problem"):
        withhold_problems(problems, r"Answer")


def test_withhold_matches_the_question_too():
    """The smollm2-cpu student never sees a question naming v-z (the answer line's 'w' of
    "Answer" must not count: the pattern is a whole-word letter)."""
    problems = generate(ArithSpec(difficulty=1, terms=3, letters=26), 300, seed=0, split="t")
    kept = withhold_problems(problems, r"\b[v-z]\b")
    assert 0 < len(kept) < len(problems)
    assert all(not set(p.question.split("+")) & set("vwxyz") for p in kept)
    assert len(kept) == sum(not set(p.question.split("+")) & set("vwxyz") for p in problems)
