"""The oracle curve and the relay against it (relaypipe/evaluate/oracle_curve.py), on numbers
computed by hand."""

from __future__ import annotations

import pytest

from relaypipe.evaluate.oracle_curve import (
    macro_oracle,
    oracle_at,
    oracle_points,
    relay_vs_oracle,
)

STUDENT = {"call_ratio": 0.0, "accuracy": 0.3, "calls": 0.0}
# thresholds -> (share, accuracy); .5 is saturated (every disagreement)
BY_TAU = {
    0.5: {"call_ratio": 0.06, "accuracy": 0.9, "calls": 2.0},
    0.001: {"call_ratio": 0.02, "accuracy": 0.5, "calls": 1.0},
    0.01: {"call_ratio": 0.04, "accuracy": 0.8, "calls": 1.5},
}


def curve(by_tau=BY_TAU, student=STUDENT):
    return oracle_points(by_tau, student)


def test_the_curve_is_sorted_by_share_and_anchored_by_the_student():
    points = curve()
    assert [p["oracle_tau"] for p in points] == [0.0, 0.001, 0.01, 0.5]
    assert [p["mode"] for p in points] == ["student", "oracle", "oracle", "oracle"]
    assert [p["call_ratio"] for p in points] == [0.0, 0.02, 0.04, 0.06]
    assert points[2]["calls_per_request"] == 1.5
    # a decoded tau = 0 is its own anchor; no oracle run, no curve
    decoded = {**BY_TAU, 0.0: {"call_ratio": 0.0, "accuracy": 0.28, "calls": 0.0}}
    assert [p["accuracy"] for p in curve(decoded)][:1] == [0.28]
    assert len(curve(decoded)) == 4
    assert oracle_points({}, STUDENT) == []
    assert [p["mode"] for p in oracle_points(BY_TAU, None)] == ["oracle"] * 3


@pytest.mark.parametrize(
    ("share", "accuracy", "read"),
    [
        (0.0, 0.3, "interpolated"),  # the student
        (0.01, 0.4, "interpolated"),  # halfway from (0, .3) to (.02, .5)
        (0.03, 0.65, "interpolated"),  # halfway from (.02, .5) to (.04, .8)
        (0.055, 0.875, "interpolated"),  # three quarters from (.04, .8) to (.06, .9)
        (0.06, 0.9, "interpolated"),
        (0.12, 0.9, "saturated"),  # past the curve: the oracle at tau .5 is as accurate
    ],
)
def test_the_oracle_is_read_off_its_curve(share, accuracy, read):
    at = oracle_at(curve(), share)
    assert at.accuracy == pytest.approx(accuracy) and at.read == read and at.reason is None


def test_no_extrapolation_without_a_saturated_point_or_below_the_curve():
    unsaturated = {t: v for t, v in BY_TAU.items() if t < 0.5}
    at = oracle_at(curve(unsaturated), 0.05)
    assert at.accuracy is None and "above the oracle curve's range (up to 0.04)" in at.reason
    assert "saturated" in at.reason
    # no student anchor: a share below the first point is not extrapolated either
    at = oracle_at(curve(student=None), 0.01)
    assert at.accuracy is None and "below the oracle curve's range" in at.reason
    at = oracle_at([], 0.01)
    assert at.accuracy is None and "oracle_sweep is empty" in at.reason


def test_relay_as_a_fraction_of_the_oracle_at_its_share():
    # relay: .6 at share .03, where the oracle is at .65: 12/13
    entry, why = relay_vs_oracle({"call_ratio": 0.03, "accuracy": 0.6}, curve())
    assert why is None
    assert entry == {
        "call_ratio": 0.03,
        "accuracy": 0.6,
        "oracle_accuracy": pytest.approx(0.65),
        "ratio": pytest.approx(0.6 / 0.65),
        "read": "interpolated",
    }
    # above the curve: against the saturated oracle's .9
    entry, why = relay_vs_oracle({"call_ratio": 0.11, "accuracy": 0.855}, curve())
    assert entry["ratio"] == pytest.approx(0.95) and entry["read"] == "saturated"
    # nothing to read, an oracle never right, no relay: null and why
    entry, why = relay_vs_oracle({"call_ratio": 0.11, "accuracy": 0.5}, curve({0.01: BY_TAU[0.01]}))
    assert entry["ratio"] is None and entry["oracle_accuracy"] is None
    assert why.startswith("no oracle at the relay's teacher share: share 0.11 is above")
    zero = {0.5: {"call_ratio": 0.06, "accuracy": 0.0, "calls": 1.0}}
    entry, why = relay_vs_oracle(
        {"call_ratio": 0.0, "accuracy": 0.0}, curve(zero, {**STUDENT, "accuracy": 0.0})
    )
    assert entry["ratio"] is None and "right on no problem" in why
    assert relay_vs_oracle(None, curve()) == (None, "the relay mode was not evaluated")


def test_the_average_takes_the_thresholds_every_benchmark_has():
    per = {
        "a": {0.01: {"call_ratio": 0.02, "accuracy": 0.6, "calls": 1.0}, 0.5: BY_TAU[0.5]},
        "b": {0.01: {"call_ratio": 0.04, "accuracy": 0.8, "calls": 2.0}},
    }
    assert macro_oracle(per, ["a", "b"]) == {
        0.01: {"call_ratio": pytest.approx(0.03), "accuracy": 0.7, "calls": 1.5}
    }
    assert macro_oracle(per, []) == {}
