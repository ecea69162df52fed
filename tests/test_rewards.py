"""The difficulty-aware reward on hand-worked groups (every row of DESIGN.md §1's table)."""

from __future__ import annotations

import pytest

from relaypipe.train.rewards import (
    accuracy_reward,
    difficulty_aware_reward,
    make_cost_penalised_reward,
    reward_by_name,
)

RIGHT, WRONG = "1+1=2\nAnswer: 2", "1+1=3\nAnswer: 3"


def reward(rows, pid="p"):
    """rows: (completion, teacher_tokens, generated_tokens)."""
    return difficulty_aware_reward(
        [r[0] for r in rows],
        answer=["2"] * len(rows),
        problem_id=[pid] * len(rows) if isinstance(pid, str) else pid,
        teacher_tokens=[r[1] for r in rows],
        generated_tokens=[r[2] for r in rows],
    )


def test_group_with_a_solo_right_rollout():
    # right-solo 1.5; right-called 1 - 4/20 = 0.8; wrong-solo 0; wrong-called 0
    rows = [(RIGHT, 0, 20), (RIGHT, 4, 20), (WRONG, 0, 20), (WRONG, 5, 20)]
    assert reward(rows) == pytest.approx([1.5, 0.8, 0.0, 0.0])


def test_group_right_only_with_calls():
    # right-called 1 - 10/40 = 0.75; wrong-solo -1 (should have asked); wrong-called 0
    rows = [(RIGHT, 10, 40), (WRONG, 0, 40), (WRONG, 8, 40)]
    assert reward(rows) == pytest.approx([0.75, -1.0, 0.0])


def test_group_with_no_right_rollout_rewards_asking_by_its_ratio():
    # wrong-solo 0; wrong-called = call ratio 6/30 = 0.2
    rows = [(WRONG, 0, 30), (WRONG, 6, 30)]
    assert reward(rows) == pytest.approx([0.0, 0.2])


def test_cut_off_rollouts_earn_nothing_for_asking_unless_the_paper_table_is_asked_for():
    # no right rollout; the second asked and finished (0.2), the third asked until it was cut off
    kwargs = {
        "answer": ["2"] * 3,
        "problem_id": ["p"] * 3,
        "teacher_tokens": [0, 6, 15],
        "generated_tokens": [30, 30, 30],
        "finished": [True, True, False],
    }
    completions = [WRONG, WRONG, WRONG]
    assert difficulty_aware_reward(completions, **kwargs) == pytest.approx([0.0, 0.2, 0.0])
    paper = reward_by_name("difficulty_aware", pay_unfinished=True)
    assert paper(completions, **kwargs) == pytest.approx([0.0, 0.2, 0.5])
    # the guard only touches that row: a cut-off right answer (impossible here) keeps its reward
    kwargs["finished"] = [False] * 3
    assert difficulty_aware_reward([RIGHT, WRONG, WRONG], **kwargs)[0] == pytest.approx(1.5)


def test_call_ratio_is_capped_and_uses_delivered_tokens():
    # 50 delivered of 40 generated cannot happen in a trace, but a cap keeps the reward sane
    assert reward([(RIGHT, 50, 40)]) == pytest.approx([0.0])
    assert reward([(WRONG, 0, 0), (WRONG, 3, 0)]) == pytest.approx([0.0, 0.0])


def test_difficulty_is_judged_per_group_not_per_batch():
    # Group a has a solo right answer, group b does not: b's wrong-solo gets -1, a's gets 0.
    rows = [(RIGHT, 0, 20), (WRONG, 0, 20), (RIGHT, 5, 20), (WRONG, 0, 20)]
    out = reward(rows, pid=["a", "a", "b", "b"])
    assert out == pytest.approx([1.5, 0.0, 0.75, -1.0])
    # A batch-level judgement (the reference's) would have given b's wrong-solo 0.


def test_accuracy_and_cost_penalised_with_budget():
    assert accuracy_reward([RIGHT, WRONG, "no answer"], answer=["2"] * 3) == [1.0, 0.0, 0.0]
    fn = make_cost_penalised_reward(cost_weight=0.5, budget_penalty=1.0)
    out = fn(
        [RIGHT, RIGHT, WRONG],
        answer=["2"] * 3,
        teacher_tokens=[0, 10, 4],
        generated_tokens=[20, 20, 20],
        budget_events=[0, 1, 0],
    )
    # 1 - 0; 1 - 0.5*0.5 - 1 (asked beyond budget); 0 - 0.5*0.2
    assert out == pytest.approx([1.0, -0.25, -0.1])


def test_conversational_completions_and_names():
    msgs = [[{"role": "assistant", "content": RIGHT}]]
    assert accuracy_reward(msgs, answer=["2"]) == [1.0]
    assert reward_by_name("cost_penalised").__name__ == "cost_penalised_reward"
    with pytest.raises(ValueError, match="unknown reward"):
        reward_by_name("nope")
