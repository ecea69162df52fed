"""relaypipe.evaluate.cost: FLOPs, money, prefill, Wilson intervals and the matched router,
each checked against numbers worked out by hand in the comments."""

from __future__ import annotations

import pandas as pd
import pytest

from relaypipe.evaluate.cost import (
    CostModel,
    ModelCost,
    Price,
    interpolate_curve,
    match_accuracy,
    request_costs,
    summarize_requests,
    wilson_interval,
)

MODELS = {
    "relay": CostModel(
        student=ModelCost(1_000, Price(input=1.0, output=2.0)),
        teacher=ModelCost(10_000, Price(input=10.0, output=20.0)),
    )
}


def request(**overrides) -> dict:
    row = {
        "benchmark": "b",
        "mode": "relay",
        "router_p": -1.0,
        "problem_id": "p0",
        "correct": True,
        "student_tokens": 30,  # 4 of them a command
        "teacher_tokens": 10,
        "command_tokens": 4,
        "calls": 2,
        "teacher_prefill_tokens": 40,  # with its KV cache
        "teacher_context_tokens": 100,  # full context at both calls, summed
        "student_prefill_tokens": 50,
        "latency_s": 0.5,
    }
    return {**row, **overrides}


def test_flops_and_money_of_one_request():
    df = request_costs(pd.DataFrame([request()]), MODELS)
    row = df.iloc[0]
    # student: 2 * 1,000 * (30 generated + 50 prefilled) = 160,000
    assert row.student_flops == 160_000
    # teacher: 2 * 10,000 * (10 generated + 40 prefilled with the cache) = 1,000,000
    assert row.teacher_flops == 1_000_000
    assert row.flops == 1_160_000
    # uncached teacher reads 100 context tokens: 160,000 + 2 * 10,000 * (10 + 100) = 2,360,000
    assert row.flops_uncached == 2_360_000
    # USD: (50 * 1 + 30 * 2 + 40 * 10 + 10 * 20) / 1e6 = 710e-6
    assert row.cost_usd == pytest.approx(710e-6)
    # uncached: the teacher is billed 100 input tokens: (50 + 60 + 1000 + 200) / 1e6
    assert row.cost_usd_uncached == pytest.approx(1310e-6)
    assert row.generated_tokens == 40


def test_summary_call_ratio_is_token_weighted_and_means_are_per_request():
    rows = [
        request(),
        request(
            problem_id="p1",
            correct=False,
            student_tokens=10,
            teacher_tokens=0,
            command_tokens=0,
            calls=0,
            teacher_prefill_tokens=0,
            teacher_context_tokens=0,
            student_prefill_tokens=6,
            latency_s=1.5,
        ),
    ]
    s = summarize_requests(request_costs(pd.DataFrame(rows), MODELS))
    # 10 teacher tokens of 40 + 10 generated = 0.2 (not the mean of 0.25 and 0 = 0.125)
    assert s["call_ratio"] == pytest.approx(0.2)
    assert s["accuracy"] == 0.5 and s["n"] == 2
    assert s["teacher_tokens"] == 5 and s["student_tokens"] == 20
    assert s["teacher_prefill_tokens"] == 20 and s["teacher_context_tokens"] == 50
    assert s["latency_s"] == pytest.approx(1.0)
    # second request: 2 * 1,000 * (10 + 6) = 32,000 FLOPs; mean (1,160,000 + 32,000) / 2
    assert s["flops"] == 596_000


def test_unknown_mode_has_no_cost_model():
    with pytest.raises(KeyError, match="teacher"):
        request_costs(pd.DataFrame([request(mode="teacher")]), MODELS)


def test_wilson_interval_matches_hand_computation():
    # z = 1.959964, z^2 = 3.841459; 8 of 10: p = 0.8, denom = 1 + z^2/10 = 1.3841459
    # center = (0.8 + z^2/20) / denom = 0.992073 / 1.3841459 = 0.716741
    # half = z / denom * sqrt(0.8 * 0.2 / 10 + z^2 / 400) = 1.416008 * 0.160011 = 0.226577
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490164, abs=1e-5)
    assert high == pytest.approx(0.943318, abs=1e-5)
    # 0 of 10: low is exactly 0; high = 2 * z^2/20 / denom = 0.277533
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277533, abs=1e-5)
    low, high = wilson_interval(10, 10)  # the mirror image
    assert high == 1.0 and low == pytest.approx(1 - 0.277533, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # 90 %: z = 1.644854, narrower than 95 %
    low90, high90 = wilson_interval(8, 10, 0.90)
    assert 0.490164 < low90 < high90 < 0.943318


CURVE = [  # router p, call ratio, accuracy, FLOPs (p = 0: student, p = 1: teacher)
    {"router_p": 0.0, "call_ratio": 0.0, "accuracy": 0.3, "flops": 100.0},
    {"router_p": 0.1, "call_ratio": 0.1, "accuracy": 0.3, "flops": 300.0},
    {"router_p": 0.3, "call_ratio": 0.3, "accuracy": 0.5, "flops": 500.0},
    {"router_p": 1.0, "call_ratio": 1.0, "accuracy": 1.0, "flops": 1000.0},
]


def test_matched_router_interpolates_between_swept_points():
    m = match_accuracy(CURVE, 0.4)
    # segment p 0.1 -> 0.3, t = (0.4 - 0.3) / (0.5 - 0.3) = 0.5
    assert m.ok and m.reason is None
    assert m.values["router_p"] == pytest.approx(0.2)
    assert m.values["call_ratio"] == pytest.approx(0.2)
    assert m.values["flops"] == pytest.approx(400.0)  # 300 + 0.5 * (500 - 300)
    # equal to the student's accuracy: the flat first segment gives p = 0 (no teacher)
    assert match_accuracy(CURVE, 0.3).values["call_ratio"] == 0.0
    # exactly the teacher's: p = 1
    assert match_accuracy(CURVE, 1.0).values["router_p"] == pytest.approx(1.0)


@pytest.mark.parametrize(("accuracy", "word"), [(1.2, "above"), (0.2, "below")])
def test_matched_router_out_of_range_is_null_with_a_reason(accuracy, word):
    m = match_accuracy(CURVE, accuracy)
    assert not m.ok and m.values is None
    assert word in m.reason and "not extrapolated" in m.reason


def test_matched_router_takes_the_cheapest_crossing_and_never_goes_below_p0():
    dip = [dict(p) for p in CURVE]
    dip[1]["accuracy"] = 0.1  # the router gets worse before it gets better
    # 0.2 is inside [0.1, 1.0] but below p = 0 (0.3), which is cheaper and better: no match
    assert not match_accuracy(dip, 0.2).ok
    # 0.4: the first segment reaching it is p 0.1 -> 0.3 (0.1 -> 0.5): t = 0.75, p = 0.25
    assert match_accuracy(dip, 0.4).values["router_p"] == pytest.approx(0.25)


def test_router_at_a_call_ratio():
    at = interpolate_curve(CURVE, "call_ratio", 0.05)
    # p 0 -> 0.1, t = 0.5: accuracy 0.3, FLOPs 200
    assert at.values["accuracy"] == pytest.approx(0.3)
    assert at.values["flops"] == pytest.approx(200.0)
    assert not interpolate_curve(CURVE[1:], "call_ratio", 0.05).ok  # below p = 0.1's 0.1
    assert not interpolate_curve([], "call_ratio", 0.05).ok
