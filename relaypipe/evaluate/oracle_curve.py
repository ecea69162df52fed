"""The oracle caller's curve, and the relay's accuracy as a fraction of the oracle's at the
relay's teacher share.

Library code of the report (relaypipe/evaluate/report.py); the oracle itself is
relaypipe/evaluate/oracle.py (rows of mode ``oracle``, one run per threshold ``oracle_tau``).

The curve (``oracle_curve.<panel>``): one point per threshold, ``{oracle_tau, call_ratio,
accuracy, calls_per_request, mode}``, sorted by call ratio. It is anchored at call ratio 0 by
the ``student`` mode (``mode: "student"``, ``oracle_tau`` 0) unless tau = 0 was decoded: the
oracle at tau = 0 never calls, and is then the bootstrap student alone, as the router at p = 0.

Reading the oracle at a share x (:func:`oracle_at`):

* inside the curve's share range: linear interpolation between the points around x (the
  first segment, in share order, that holds x; :func:`~relaypipe.evaluate.cost.interpolate_curve`);
* above it, when the curve has a *saturated* point (tau >= 0.5: the oracle called at every step
  where the teacher would have written another token, so its transcript is the teacher's own
  up to its budgets): that point's accuracy. More teacher tokens, at steps where the two
  models agree, would write the same tokens, so the oracle at any larger share is exactly that
  accurate; this is no extrapolation (``read: "saturated"``);
* otherwise (below the curve, or above an unsaturated one): null and the reason, never
  extrapolated.

``relay_vs_oracle.<panel>`` = ``{call_ratio, accuracy, oracle_accuracy, ratio, read}`` for the
relay run: ``ratio`` = relay accuracy / oracle accuracy at the relay's share (the issue's bar:
>= 0.95); null, with the reason in the report's ``notes``, where the oracle cannot be read
there or is never right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relaypipe.evaluate.cost import interpolate_curve
from relaypipe.evaluate.oracle import SATURATED_TAU

__all__ = ["OracleRead", "macro_oracle", "oracle_at", "oracle_points", "relay_vs_oracle"]


def _point(values: Mapping[str, float], tau: float, mode: str) -> dict[str, Any]:
    return {
        "oracle_tau": float(tau),
        "call_ratio": float(values["call_ratio"]),
        "accuracy": float(values["accuracy"]),
        "calls_per_request": float(values.get("calls", 0.0)),
        "mode": mode,
    }


def oracle_points(
    by_tau: Mapping[float, Mapping[str, float]], student: Mapping[str, float] | None
) -> list[dict[str, Any]]:
    """The curve: the oracle's point at each threshold (``by_tau``: summaries with
    ``call_ratio``, ``accuracy`` and the mean ``calls``), anchored at tau = 0 by ``student``
    when tau = 0 was not decoded; sorted by call ratio (then tau). No oracle run: []."""
    if not by_tau:
        return []
    points = [_point(v, tau, "oracle") for tau, v in by_tau.items()]
    if 0.0 not in by_tau and student is not None:
        points.append(_point(student, 0.0, "student"))
    return sorted(points, key=lambda p: (p["call_ratio"], p["oracle_tau"]))


def macro_oracle(
    per_benchmark: Mapping[str, Mapping[float, Mapping[str, float]]], names: Sequence[str]
) -> dict[float, dict[str, float]]:
    """The oracle averaged over benchmarks (unweighted) at each threshold every one has."""
    if not names:
        return {}
    common = set.intersection(*(set(per_benchmark[b]) for b in names))
    return {
        tau: {
            k: sum(per_benchmark[b][tau][k] for b in names) / len(names)
            for k in ("call_ratio", "accuracy", "calls")
        }
        for tau in sorted(common)
    }


@dataclass(frozen=True)
class OracleRead:
    """The oracle's accuracy at a share, how it was read, or why there is none."""

    accuracy: float | None
    read: str | None = None  # "interpolated" | "saturated"
    reason: str | None = None


def oracle_at(curve: Sequence[Mapping[str, Any]], share: float) -> OracleRead:
    """The oracle's accuracy at teacher share ``share`` (module docstring)."""
    if not curve:
        return OracleRead(None, reason="no oracle points (evaluate.oracle_sweep is empty)")
    top = max(p["call_ratio"] for p in curve)
    if share > top:
        saturated = [p for p in curve if p["mode"] == "oracle" and p["oracle_tau"] >= SATURATED_TAU]
        if saturated:
            best = max(saturated, key=lambda p: (p["oracle_tau"], p["call_ratio"]))
            return OracleRead(float(best["accuracy"]), read="saturated")
        return OracleRead(
            None,
            reason=(
                f"share {share:.4g} is above the oracle curve's range (up to {top:.4g}) and no "
                f"threshold there is saturated (tau >= {SATURATED_TAU:g}): not extrapolated"
            ),
        )
    at = interpolate_curve(curve, "call_ratio", share, label="oracle")
    if not at.ok:
        return OracleRead(None, reason=at.reason)
    assert at.values is not None
    return OracleRead(at.values["accuracy"], read="interpolated")


def relay_vs_oracle(
    relay: Mapping[str, float] | None, curve: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The relay run against the oracle at its share, or None and why (no relay run)."""
    if relay is None:
        return None, "the relay mode was not evaluated"
    share, accuracy = float(relay["call_ratio"]), float(relay["accuracy"])
    at = oracle_at(curve, share)
    entry: dict[str, Any] = {
        "call_ratio": share,
        "accuracy": accuracy,
        "oracle_accuracy": at.accuracy,
        "ratio": None,
        "read": at.read,
    }
    if at.accuracy is None:
        return entry, f"no oracle at the relay's teacher share: {at.reason}"
    if at.accuracy <= 0:
        return entry, "the oracle is right on no problem at the relay's share: no ratio"
    entry["ratio"] = accuracy / at.accuracy
    return entry, None
