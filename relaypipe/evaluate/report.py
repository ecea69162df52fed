"""From per-request rows to the reported numbers: summary.json, metrics.json, the trade-off
plot, report.md.

Library code of the ``report`` stage (``python -m relaypipe.stages.report``); cost definitions
are in relaypipe/evaluate/cost.py. The stage writes two JSON files: ``summary.json``, everything
below (:func:`build_metrics`; report.md and the plots are drawn from it), and ``metrics.json``,
the DVC metric: a dozen headline scalars taken from it (:func:`headline_metrics`, shape there),
so that ``dvc exp show`` stays narrow.

Shape of the summary (``M`` = accuracy, accuracy_ci_low/high, call_ratio, teacher_tokens,
student_tokens, teacher_prefill_tokens, teacher_context_tokens, flops, flops_uncached, cost_usd,
cost_usd_uncached, latency_s, ...; token, FLOP, money and latency values are means per request):

* ``benchmarks.<name>.<mode>.M``: one benchmark. ``random_router`` there is the router sweep
  interpolated at the relay's call ratio on that benchmark (the paper's "matched call ratio").
* ``modes.<mode>.M``: the macro average over benchmarks (each benchmark weighs the same, as the
  paper's "avg" column). Its accuracy interval is Wilson on the pooled counts (equal to the
  macro average when every benchmark has the same n).
* ``gap_recovered`` = (relay − student) / (teacher − student), on macro accuracies.
* ``cost_reduction_vs_matched_router`` = 1 − relay call ratio / call ratio of the router
  interpolated to the relay's macro accuracy (the paper's teacher-token measure), and
  ``..._flops`` the same on total FLOPs per request. ``matched_router`` holds that point.
* ``headline_by_benchmark.<name>``: the three headline numbers per benchmark.
* ``router_curve.<average|name>``: the router sweep, in p order, anchored by the student at
  p = 0 and the teacher at p = 1.
* ``relay_curve.<average|name>``: the relay's operating points, ``{call_bias, call_ratio,
  accuracy, mode}``, sorted by call ratio: the relay_sweep runs (one per bias of
  ``evaluate.call_bias_sweep``; on average, the biases every benchmark has) and the relay run
  itself (``mode`` says which). A bias is a number, or "inf" / "-inf" for a relay decoded
  with an infinite one (models.json ``decoding.call_bias``, when the table has no column).
* ``pareto.<average|name>``: ``{area_vs_router, share_range: [lo, hi], mean_gain}``: the area
  between the relay curve and the router curve over the relay's teacher-share range (the
  router read off ``router_curve`` at each relay point's call ratio by
  :func:`~relaypipe.evaluate.cost.interpolate_curve`; trapezoids between consecutive relay
  points), in accuracy × share units, and ``mean_gain`` = area / (hi − lo), the relay's mean
  accuracy advantage over that range. Null, with ``notes.pareto.<panel>``, with fewer than 2
  relay points, a range of width 0, or a router curve that does not cover the range (never
  extrapolated).
* ``cost_reduction_by_budget.<average|name>``: per relay point (as ``relay_curve``):
  ``router_accuracy_at_share`` (the router at that call ratio), ``router_call_ratio`` (the
  router matched in accuracy, :func:`~relaypipe.evaluate.cost.match_accuracy`) and
  ``cost_reduction`` = 1 − call ratio / router_call_ratio: null, with the reason in ``note``,
  where the router never reaches the point's accuracy (or only at call ratio 0).
* ``oracle_curve.<average|name>``: the oracle caller (evaluate.oracle_sweep; rows of mode
  ``oracle``), one point per threshold ``{oracle_tau, call_ratio, accuracy, calls_per_request,
  mode}`` by call ratio, anchored at 0 by the student (relaypipe/evaluate/oracle_curve.py); on
  average, the thresholds every benchmark has. Empty lists when the oracle did not run.
* ``relay_vs_oracle.<average|name>``: the relay run against the oracle at the relay's teacher
  share: ``{call_ratio, accuracy, oracle_accuracy, ratio, read}``, ``ratio`` = relay accuracy /
  oracle accuracy there (interpolated on the oracle curve, or the saturated oracle's above it;
  null, with ``notes.relay_vs_oracle.<panel>``, where neither applies). ``{}`` without the
  oracle. ``cost_reduction_by_budget`` entries carry ``oracle_accuracy_at_share`` the same way.
* ``notes.<key>``: why a number is null. A relay accuracy outside the router curve's accuracy
  range (below the student, i.e. p = 0, or above the best point) has no performance-matched
  router: the reduction is null, never extrapolated. So is a relay matched at call ratio 0
  (no more accurate than the student alone), a relay that made no teacher calls, and, with
  ``gap_recovered``, a teacher no better than the student: nothing to compare, never a
  negative "reduction".
* ``confidence``: of the Wilson intervals.
* ``call_bias``: the relay mode's call bias (models.json ``decoding.call_bias``; 0 when it has
  none), and ``calibration``: null unless evaluate calibrated it (``evaluate.calibrate``), else
  the target teacher share, the bias, the share on the held-out problems (``held_out``) and the
  *realised* teacher share of the relay mode on each benchmark and on average (macro, as
  ``modes.relay.call_ratio``), each with ``difference`` = |share − target|, and
  ``max_difference`` (the largest over the benchmarks). Calibrated per benchmark
  (``evaluate.calibrate.per_benchmark``; ``per_benchmark: true``), each benchmark's entry also
  carries its own ``bias``, ``reached`` and ``held_out`` (its calibration set), and the top-level
  ``bias`` and ``held_out`` are null; ``reached`` is true only if every benchmark reached.
* ``warnings``: the earlier stages' ``warnings`` (degenerate runs kept with ``allow_degenerate``,
  see relaypipe/checks.py) and the report's own (a relay that never called, no gap, a relay no
  more accurate than the random router at its teacher share); report.md opens with them.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from relaypipe.checks import no_better_than_router, no_calls, no_gap
from relaypipe.evaluate.cost import (
    CostModel,
    Interpolated,
    interpolate_curve,
    match_accuracy,
    request_costs,
    summarize_requests,
    wilson_interval,
)
from relaypipe.evaluate.oracle_curve import (
    macro_oracle,
    oracle_at,
    oracle_points,
    relay_vs_oracle,
)
from relaypipe.evaluate.suite import NOT_A_ROUTER
from relaypipe.schemas import ORACLE_MODE

log = logging.getLogger(__name__)

__all__ = [
    "MODE_ORDER",
    "TRAINING_HEADLINE",
    "build_metrics",
    "headline_metrics",
    "plot_points",
    "render_markdown",
    "render_png",
    "training_number",
]

# Row order of the report (the paper's: baselines, the method, the teacher last).
MODE_ORDER = ("student", "warmup", "teacher_free", "random_router", "relay", "teacher")
MODE_TITLES = {
    "student": "student (bootstrap)",
    "warmup": "warm-up student, teacher-free",
    "teacher_free": "RelayLLM student, teacher-free",
    "random_router": "random router at relay's call ratio",
    "relay": "RelayLLM (relay)",
    "teacher": "teacher",
}
_SIGNIFICANT = 6


def _round(value: Any) -> Any:
    """Six significant digits: stable JSON bytes, and tiny dollar amounts keep their value."""
    if isinstance(value, float):
        return float(f"{value:.{_SIGNIFICANT}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _router_curve(
    routers: Sequence[dict[str, float]], modes: Mapping[str, dict[str, float]]
) -> list[dict[str, float]]:
    """The sweep in p order, anchored at p = 0 by ``student`` and p = 1 by ``teacher``.

    The anchors are exact, not assumed: the router at p = 0 is the bootstrap student decoding
    alone, at p = 1 the teacher writing everything. A measured router point at 0 or 1 wins.
    """
    points = {r["router_p"]: r for r in routers}
    if 0.0 not in points and "student" in modes:
        points[0.0] = {**modes["student"], "router_p": 0.0}
    if 1.0 not in points and "teacher" in modes:
        points[1.0] = {**modes["teacher"], "router_p": 1.0}
    return [points[p] for p in sorted(points)]


def _with_ci(values: dict[str, float], n: float, confidence: float) -> dict[str, float]:
    # An interpolated accuracy is not a count; Wilson at that proportion with the benchmark's n
    # is the interval a router measured at exactly that point would get.
    low, high = wilson_interval(values["accuracy"] * n, n, confidence)
    return {**values, "n": n, "accuracy_ci_low": low, "accuracy_ci_high": high}


def _ratio_reduction(relay: float, router: float, what: str) -> tuple[float | None, str | None]:
    if router <= 0:
        # p = 0 already matches the relay: relative to zero teacher use, no ratio exists.
        return None, f"the matched router's {what} is 0 (it needs no teacher): no ratio"
    return 1 - relay / router, None


def _headline(
    modes: Mapping[str, dict[str, float]], curve: Sequence[dict[str, float]]
) -> tuple[dict[str, Any], dict[str, str], Interpolated | None]:
    """gap_recovered and the cost reductions against the performance-matched router."""
    out: dict[str, Any] = {
        "gap_recovered": None,
        "cost_reduction_vs_matched_router": None,
        "cost_reduction_vs_matched_router_flops": None,
    }
    notes: dict[str, str] = {}
    if "relay" not in modes:
        for key in out:
            notes[key] = "the relay mode was not evaluated"
        return out, notes, None
    relay = modes["relay"]
    costs = ("cost_reduction_vs_matched_router", "cost_reduction_vs_matched_router_flops")
    # A teacher no better than the student leaves no gap (the ratio would be noise), and a
    # router curve with nothing to buy; a relay that never called has no teacher use to reduce.
    gapless = no_gap(modes)
    if "student" in modes and "teacher" in modes:
        if gapless:
            notes["gap_recovered"] = gapless
        else:
            gap = modes["teacher"]["accuracy"] - modes["student"]["accuracy"]
            out["gap_recovered"] = (relay["accuracy"] - modes["student"]["accuracy"]) / gap
    else:
        notes["gap_recovered"] = "needs the student and teacher modes"
    nothing = no_calls(modes) or gapless
    if nothing:
        notes.update(dict.fromkeys(costs, nothing))
        return out, notes, None
    matched = match_accuracy(curve, relay["accuracy"])
    if not matched.ok:
        notes.update(dict.fromkeys(costs, f"no performance-matched router: relay {matched.reason}"))
        return out, notes, matched
    assert matched.values is not None
    if matched.values["call_ratio"] <= 0:
        # Matched where the router hands the teacher nothing (the student alone, p = 0): the
        # relay buys no accuracy with its calls, and 1 - cost / student's cost is no reduction.
        notes.update(
            dict.fromkeys(
                costs,
                f"the relay ({relay['accuracy']:.4g}) is no more accurate than the router at "
                "call ratio 0 (the student alone): its teacher use bought nothing to compare",
            )
        )
        return out, notes, None
    for key, metric in (
        ("cost_reduction_vs_matched_router", "call_ratio"),
        ("cost_reduction_vs_matched_router_flops", "flops"),
    ):
        out[key], note = _ratio_reduction(relay[metric], matched.values[metric], metric)
        if note:
            notes[key] = note
    return out, notes, matched


def _relay_point(values: Mapping[str, float], bias: Any, mode: str) -> dict[str, Any]:
    return {
        "call_bias": bias,
        "call_ratio": float(values["call_ratio"]),
        "accuracy": float(values["accuracy"]),
        "mode": mode,
    }


def _relay_points(
    sweep: Mapping[float, Mapping[str, float]],
    relay: Mapping[str, float] | None,
    relay_bias: Any,
) -> list[dict[str, Any]]:
    """The relay curve: the sweep's points (by bias) and the relay run's, by call ratio."""
    points = [_relay_point(v, float(b), "relay_sweep") for b, v in sweep.items()]
    if relay is not None:
        points.append(_relay_point(relay, relay_bias, "relay"))
    return sorted(points, key=lambda p: (p["call_ratio"], p["accuracy"]))


def _pareto(
    points: Sequence[Mapping[str, Any]], curve: Sequence[Mapping[str, float]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The area between the relay curve (``points``, by call ratio) and the router ``curve``
    over the relay's share range, or None and why (module docstring)."""
    if len(points) < 2:
        return None, (
            f"{len(points)} relay point(s): a curve needs 2 or more (mode relay_sweep, "
            "evaluate.call_bias_sweep)"
        )
    xs = [p["call_ratio"] for p in points]
    lo, hi = xs[0], xs[-1]
    if hi <= lo:
        return None, f"every relay point has call ratio {lo:.4g}: a range of width 0"
    gains = []
    for p in points:
        at = interpolate_curve(curve, "call_ratio", p["call_ratio"], label="random-router")
        if not at.ok:
            return None, (
                f"the router curve does not cover the relay's call ratios [{lo:.4g}, {hi:.4g}]: "
                f"{at.reason}"
            )
        assert at.values is not None
        gains.append(p["accuracy"] - at.values["accuracy"])
    area = sum((xs[i + 1] - xs[i]) * (gains[i] + gains[i + 1]) / 2 for i in range(len(points) - 1))
    return {"area_vs_router": area, "share_range": [lo, hi], "mean_gain": area / (hi - lo)}, None


def _by_budget(
    points: Sequence[Mapping[str, Any]],
    curve: Sequence[Mapping[str, float]],
    oracle: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Per relay point, the cost reduction against the router matched in accuracy, and the
    oracle's accuracy at its share (null without an oracle curve or where it cannot be read)."""
    out = []
    for p in points:
        at = interpolate_curve(curve, "call_ratio", p["call_ratio"], label="random-router")
        entry: dict[str, Any] = {
            **p,
            "router_accuracy_at_share": at.values["accuracy"] if at.values else None,
            "router_call_ratio": None,
            "cost_reduction": None,
            "note": None,
            "oracle_accuracy_at_share": oracle_at(oracle, p["call_ratio"]).accuracy,
        }
        matched = match_accuracy(curve, p["accuracy"])
        if not matched.ok:
            entry["note"] = f"no performance-matched router: relay {matched.reason}"
        else:
            assert matched.values is not None
            router = matched.values["call_ratio"]
            entry["router_call_ratio"] = router
            entry["cost_reduction"], entry["note"] = _ratio_reduction(
                p["call_ratio"], router, "call_ratio"
            )
        out.append(entry)
    return out


def _macro_relay(
    per_benchmark: Mapping[str, Mapping[float, Mapping[str, float]]], names: Sequence[str]
) -> dict[float, dict[str, float]]:
    """The sweep averaged over benchmarks at each bias every benchmark has."""
    common = set.intersection(*(set(per_benchmark[b]) for b in names)) if names else set()
    return {
        bias: {
            k: sum(per_benchmark[b][bias][k] for b in names) / len(names)
            for k in ("call_ratio", "accuracy")
        }
        for bias in sorted(common)
    }


def _held_out(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """Where one calibration landed on the problems it decoded."""
    share = float(calibration["share"])
    return {
        "share": share,
        "difference": abs(share - float(calibration["target_share"])),
        "accuracy": float(calibration["accuracy"]),
        "n_problems": int(calibration["n_problems"]),
    }


def _calibration(
    decoding: Mapping[str, Any],
    benchmarks: Mapping[str, Mapping[str, dict[str, float]]],
    macro: Mapping[str, dict[str, float]],
) -> dict[str, Any] | None:
    """summary.json's ``calibration``: the target against the relay's realised shares, from
    models.json's ``decoding`` (one calibration, or one per benchmark)."""
    pooled = decoding.get("calibration")
    each = decoding.get("calibration_by_benchmark")
    if pooled is None and each is None:
        return None
    first = pooled if pooled is not None else next(iter(each.values()))
    target = float(first["target_share"])

    def against(values: Mapping[str, float] | None) -> dict[str, float | None]:
        if values is None:
            return {"share": None, "difference": None}
        share = float(values["call_ratio"])
        return {"share": share, "difference": abs(share - target)}

    per_benchmark = {name: against(modes.get("relay")) for name, modes in benchmarks.items()}
    if each is not None:
        for name, entry in per_benchmark.items():
            own = each[name]
            entry.update(
                bias=float(own["bias"]), reached=bool(own["reached"]), held_out=_held_out(own)
            )
    differences = [e["difference"] for e in per_benchmark.values() if e["difference"] is not None]
    return {
        "target_share": target,
        "tol": float(first["tol"]),
        "per_benchmark": each is not None,
        "bias": None if pooled is None else float(pooled["bias"]),
        "reached": (
            bool(pooled["reached"])
            if pooled is not None
            else all(bool(c["reached"]) for c in each.values())
        ),
        "held_out": None if pooled is None else _held_out(pooled),
        "benchmarks": per_benchmark,
        "average": against(macro.get("relay")),
        "max_difference": max(differences) if differences else None,
    }


def build_metrics(
    requests: pd.DataFrame,
    models: Mapping[str, CostModel],
    confidence: float = 0.95,
    upstream_warnings: Sequence[str] = (),
    decoding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's content (see the module docstring) from an EvalRequestSchema table.

    ``upstream_warnings``: what earlier stages recorded under ``warnings`` (runs they kept
    because of ``allow_degenerate``); they head the report's own warnings. ``decoding``:
    models.json's ``decoding`` (the relay call bias and its calibration), if any.
    """
    if requests.empty:
        raise ValueError("the requests table is empty: nothing to report")
    df = request_costs(requests, models)
    names = sorted(df["benchmark"].unique())
    benchmarks: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    sweeps: dict[str, dict[float, dict[str, float]]] = {}
    oracles: dict[str, dict[float, dict[str, float]]] = {}
    notes: dict[str, str] = {}
    decoding = decoding or {}
    for name in names:
        sub = df[df["benchmark"] == name]
        single = sub[
            (sub["router_p"] == NOT_A_ROUTER) & ~sub["mode"].isin(["relay_sweep", ORACLE_MODE])
        ]
        modes = {
            mode: summarize_requests(rows, confidence) for mode, rows in single.groupby("mode")
        }
        swept = sub[sub["mode"] == "relay_sweep"]  # (the schema: they have call_bias)
        sweeps[name] = {
            float(b): summarize_requests(rows, confidence)
            for b, rows in (swept.groupby("call_bias") if len(swept) else ())
        }
        judged = sub[sub["mode"] == ORACLE_MODE]  # (the schema: they have oracle_tau)
        oracles[name] = {
            float(t): summarize_requests(rows, confidence)
            for t, rows in (judged.groupby("oracle_tau") if len(judged) else ())
        }
        routers = [
            {**summarize_requests(rows, confidence), "router_p": float(p)}
            for p, rows in sub[sub["mode"] == "random_router"].groupby("router_p")
        ]
        curves[name] = _router_curve(routers, modes)
        if routers and "relay" in modes:
            at = interpolate_curve(
                curves[name], "call_ratio", modes["relay"]["call_ratio"], label="random-router"
            )
            if at.ok:
                assert at.values is not None
                modes["random_router"] = _with_ci(at.values, modes["relay"]["n"], confidence)
            else:
                notes[f"{name}.random_router"] = f"relay {at.reason}"
        benchmarks[name] = modes

    macro = _macro(benchmarks, names, confidence, notes)
    macro_curve = _macro_curve(curves, names)
    headline, headline_notes, matched = _headline(macro, macro_curve)
    notes.update(headline_notes)
    by_benchmark = {}
    for name in names:
        h, h_notes, _ = _headline(benchmarks[name], curves[name])
        by_benchmark[name] = h
        notes.update({f"{name}.{k}": v for k, v in h_notes.items()})

    relay_bias = decoding.get("call_bias", _table_bias(requests))
    panels = {
        "average": (macro, _macro_relay(sweeps, names), macro_curve, macro_oracle(oracles, names))
    }
    panels.update({b: (benchmarks[b], sweeps[b], curves[b], oracles[b]) for b in names})
    relay_curves, pareto, by_budget, oracle_curves, vs_oracle = {}, {}, {}, {}, {}
    for panel, (modes, sweep, curve, by_tau) in panels.items():
        points = _relay_points(sweep, modes.get("relay"), relay_bias)
        relay_curves[panel] = points
        pareto[panel], why = _pareto(points, curve)
        if why:
            notes[f"pareto.{panel}"] = why
        oracle_curves[panel] = oracle_points(by_tau, modes.get("student"))
        by_budget[panel] = _by_budget(points, curve, oracle_curves[panel])
        if oracle_curves[panel]:
            vs_oracle[panel], why = relay_vs_oracle(modes.get("relay"), oracle_curves[panel])
            if why:
                notes[f"relay_vs_oracle.{panel}"] = why

    calibration = _calibration(decoding, benchmarks, macro)
    metrics: dict[str, Any] = {
        "modes": {m: _round(v) for m, v in macro.items()},
        "benchmarks": {b: {m: _round(v) for m, v in ms.items()} for b, ms in benchmarks.items()},
        **_round(headline),
        "matched_router": _round(matched.values) if matched and matched.ok else None,
        "headline_by_benchmark": {b: _round(h) for b, h in by_benchmark.items()},
        "router_curve": {
            "average": [_round(p) for p in macro_curve],
            **{b: [_round(p) for p in c] for b, c in curves.items()},
        },
        "relay_curve": {k: [_round(p) for p in v] for k, v in relay_curves.items()},
        "pareto": {k: _round(v) if v is not None else None for k, v in pareto.items()},
        "cost_reduction_by_budget": {k: [_round(p) for p in v] for k, v in by_budget.items()},
        "oracle_curve": {k: [_round(p) for p in v] for k, v in oracle_curves.items()},
        "relay_vs_oracle": {k: _round(v) for k, v in vs_oracle.items()},
        "notes": notes,
        "confidence": confidence,
        "call_bias": decoding.get("call_bias", 0.0),  # a number, or "inf" / "-inf"
        "calibration": _round(calibration) if calibration is not None else None,
        # A run that learned nothing must not read like a success: these head report.md.
        "warnings": [
            *upstream_warnings,
            *(
                f"report: {why}"
                for why in (no_calls(macro), no_gap(macro), no_better_than_router(macro))
                if why
            ),
        ],
    }
    return metrics


def _table_bias(requests: pd.DataFrame) -> float:
    """The relay rows' call_bias (0 when the table has no such column or no relay rows)."""
    if "call_bias" not in requests.columns:
        return 0.0
    values = requests.loc[requests["mode"] == "relay", "call_bias"]
    return float(values.iloc[0]) if len(values) else 0.0


# The training stages' headline numbers: metrics.json key -> (stage, path in its metrics file).
# sft's and grpo's end-of-stage checks measure the relay accuracy of their model on held-out
# eval problems (relaypipe/stages/sft.py check_warmup, relaypipe/stages/grpo.py check_relay).
TRAINING_HEADLINE: dict[str, tuple[str, tuple[str, ...]]] = {
    "warmup_relay_accuracy": ("sft", ("warmup_relay", "accuracy")),
    "grpo_relay_accuracy": ("grpo", ("relay", "accuracy")),
}


def training_number(metrics: Mapping[str, Any], path: Sequence[str]) -> float | None:
    """The number at ``path`` in a stage's metrics, or None when it has none there."""
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _accuracy(modes: Mapping[str, Any], mode: str) -> float | None:
    values = modes.get(mode)
    return None if values is None else values["accuracy"]


def headline_metrics(
    summary: Mapping[str, Any], stage_summaries: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """metrics.json, the DVC metric: the headline scalars of ``summary`` (what
    :func:`build_metrics` returns, summary.json) and of the training stages, a dozen columns
    in ``dvc exp show`` rather than hundreds.

    ``stage_summaries``: the earlier stages' metrics files by stage name (``sft``, ``grpo``,
    ...); a stage not in it (its file missing: it never ran) gives no key. Shape:

    * ``relay_accuracy``, ``teacher_share`` (the relay's share of generated tokens written by
      the teacher, the paper's call ratio), ``student_accuracy``, ``teacher_accuracy``: macro
      averages over benchmarks (summary.json ``modes.<mode>``);
    * ``gap_recovered``, ``cost_reduction`` (teacher-token share against the random router
      matched in accuracy), ``cost_reduction_flops``: on macro averages (summary.json
      ``gap_recovered``, ``cost_reduction_vs_matched_router``, ``..._flops``);
    * ``gap_recovered_by_benchmark.<name>``: summary.json ``headline_by_benchmark``;
    * ``warmup_relay_accuracy`` (sft), ``grpo_relay_accuracy`` (grpo): the relay accuracy their
      end-of-stage checks measured (see TRAINING_HEADLINE);
    * ``warnings``: how many warnings summary.json (and report.md) holds;
    * ``calibration`` (only when evaluate calibrated the call bias): ``target_share`` and
      ``realised_share`` (the relay's macro teacher share);
    * ``relay_vs_oracle`` (only when evaluate ran the oracle caller): the relay's macro
      accuracy as a fraction of the oracle's at its teacher share (summary.json
      ``relay_vs_oracle.average.ratio``).

    A null means summary.json has no value: its ``notes`` say why (a mode not evaluated at all
    has no note: it is simply absent from summary.json's ``modes``).
    """
    modes = summary["modes"]
    relay = modes.get("relay")
    out: dict[str, Any] = {
        "relay_accuracy": _accuracy(modes, "relay"),
        "teacher_share": None if relay is None else relay["call_ratio"],
        "gap_recovered": summary["gap_recovered"],
        "cost_reduction": summary["cost_reduction_vs_matched_router"],
        "cost_reduction_flops": summary["cost_reduction_vs_matched_router_flops"],
        "gap_recovered_by_benchmark": {
            name: h["gap_recovered"] for name, h in summary["headline_by_benchmark"].items()
        },
        "student_accuracy": _accuracy(modes, "student"),
        "teacher_accuracy": _accuracy(modes, "teacher"),
    }
    for key, (stage, path) in TRAINING_HEADLINE.items():
        if stage_summaries and stage in stage_summaries:
            out[key] = training_number(stage_summaries[stage], path)
    out["warnings"] = len(summary["warnings"])
    calibration = summary.get("calibration")
    if calibration is not None:
        out["calibration"] = {
            "target_share": calibration["target_share"],
            "realised_share": calibration["average"]["share"],
        }
    average = summary.get("relay_vs_oracle", {}).get("average")
    if summary.get("oracle_curve", {}).get("average"):
        out["relay_vs_oracle"] = None if average is None else average["ratio"]
    return _round(out)


def _macro(
    benchmarks: Mapping[str, Mapping[str, dict[str, float]]],
    names: Sequence[str],
    confidence: float,
    notes: dict[str, str],
) -> dict[str, dict[str, float]]:
    """Per mode, the unweighted mean over benchmarks; a mode missing anywhere is left out."""
    out: dict[str, dict[str, float]] = {}
    for mode in MODE_ORDER:
        have = [b for b in names if mode in benchmarks[b]]
        if len(have) < len(names):
            # A mode evaluated nowhere is simply absent; one missing somewhere (the router when
            # the relay's call ratio is off its curve) gets a reason rather than a partial mean.
            missing = sorted(set(names) - set(have))
            if have or any(f"{b}.{mode}" in notes for b in missing):
                notes[f"modes.{mode}"] = f"no value on {', '.join(missing)}: no average"
            continue
        rows = [benchmarks[b][mode] for b in names]
        avg = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "n"}
        n = sum(r["n"] for r in rows)
        # Pooled counts for the interval (see the module docstring).
        pooled = sum(r["accuracy"] * r["n"] for r in rows)
        avg["accuracy_ci_low"], avg["accuracy_ci_high"] = wilson_interval(pooled, n, confidence)
        avg["n"] = n
        out[mode] = avg
    return out


def _macro_curve(
    curves: Mapping[str, Sequence[dict[str, float]]], names: Sequence[str]
) -> list[dict[str, float]]:
    """The router curve averaged over benchmarks at each p that every benchmark has."""
    common = set.intersection(*({p["router_p"] for p in curves[b]} for b in names))
    out = []
    for p in sorted(common):
        rows = [next(q for q in curves[b] if q["router_p"] == p) for b in names]
        keys = [k for k in rows[0] if all(isinstance(r.get(k), int | float) for r in rows)]
        out.append({k: sum(r[k] for r in rows) / len(rows) for k in keys})
    return out


# ------------------------------------------------------------------------- plots and report


def plot_points(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """tradeoff.json rows (macro averages): every mode, every router p, every relay_sweep
    bias and every oracle threshold (``mode`` says which)."""
    rows = []
    for point in metrics["router_curve"]["average"]:
        p = point["router_p"]
        rows.append(
            {
                "name": f"router p={p:g}",
                "mode": "random_router_sweep",
                "router_p": p,
                "call_ratio": point["call_ratio"],
                "accuracy": point["accuracy"],
            }
        )
    for mode, values in metrics["modes"].items():
        rows.append(
            {
                "name": mode,
                "mode": mode,
                "router_p": NOT_A_ROUTER,
                "call_ratio": values["call_ratio"],
                "accuracy": values["accuracy"],
            }
        )
    for point in metrics.get("relay_curve", {}).get("average", []):
        if point["mode"] != "relay_sweep":
            continue  # the relay run is the "relay" row above
        rows.append(
            {
                "name": f"relay bias={_bias_text(point['call_bias'])}",
                "mode": "relay_sweep",
                "router_p": NOT_A_ROUTER,
                "call_ratio": point["call_ratio"],
                "accuracy": point["accuracy"],
            }
        )
    for point in metrics.get("oracle_curve", {}).get("average", []):
        if point["mode"] != ORACLE_MODE:
            continue  # the student anchor is the "student" row above
        rows.append(
            {
                "name": f"oracle tau={point['oracle_tau']:g}",
                "mode": ORACLE_MODE,
                "router_p": NOT_A_ROUTER,
                "call_ratio": point["call_ratio"],
                "accuracy": point["accuracy"],
            }
        )
    return rows


def render_png(metrics: Mapping[str, Any]) -> bytes:
    """Accuracy against call ratio: the router sweep, the relay sweep and the oracle caller as
    curves, each mode as a point."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines and GPU workers
    import matplotlib.pyplot as plt

    panels = ["average", *metrics["benchmarks"]]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        modes = metrics["modes"] if panel == "average" else metrics["benchmarks"][panel]
        curve = metrics["router_curve"][panel]
        if curve:
            ax.plot(
                [p["call_ratio"] for p in curve],
                [p["accuracy"] for p in curve],
                "-o",
                color="0.6",
                ms=3,
                label="random router (p sweep)",
            )
        relay = metrics.get("relay_curve", {}).get(panel, [])
        if len(relay) >= 2:
            ax.plot(
                [p["call_ratio"] for p in relay],
                [p["accuracy"] for p in relay],
                "-s",
                color="tab:purple",  # the relay point's colour when every mode is drawn
                ms=4,
                alpha=0.8,
                label="relay (bias sweep)",
            )
        oracle = metrics.get("oracle_curve", {}).get(panel, [])
        if oracle:
            ax.plot(
                [p["call_ratio"] for p in oracle],
                [p["accuracy"] for p in oracle],
                "--^",
                color="tab:green",
                ms=4,
                alpha=0.8,
                label="oracle caller (τ sweep)",
            )
        for mode in MODE_ORDER:
            if mode not in modes:
                continue
            v = modes[mode]
            # max(0, .): rounding can put a bound a hair inside an accuracy of exactly 0 or 1
            err = [
                [max(0.0, v["accuracy"] - v["accuracy_ci_low"])],
                [max(0.0, v["accuracy_ci_high"] - v["accuracy"])],
            ]
            ax.errorbar(v["call_ratio"], v["accuracy"], yerr=err, fmt="o", capsize=3, label=mode)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.001, 1.05)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel)
        ax.set_xlabel("call ratio (teacher tokens / all tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy ({round(100 * metrics['confidence'])} % Wilson)")
    # One legend for all panels, below them, so it never hides a point.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _cell(values: Mapping[str, float] | None) -> str:
    if values is None:
        return "–"
    return f"{100 * values['accuracy']:.2f} ({100 * values['call_ratio']:.2f})"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "null" if value is None else format(value * scale, spec)


def _bias_text(value: Any) -> str:
    if isinstance(value, str):  # "inf" / "-inf"
        return value if value.startswith("-") else f"+{value}"
    return "0" if value == 0 else f"{value:+.4g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _calibration_lines(metrics: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """report.md: the relay's call bias; when calibrated, the target against the realised
    teacher share on each benchmark and on average."""
    cal = metrics.get("calibration")
    bias = metrics.get("call_bias", 0.0)
    if cal is None:
        if bias == 0:
            return []
        return [
            "",
            f"The relay mode decoded with call bias {_bias_text(bias)} (evaluate.call_bias).",
        ]
    rows = [*(cal["benchmarks"][b] for b in names), cal["average"]]
    target = f"a teacher share of {_pct(cal['target_share'])} % (± {_pct(cal['tol'])})"
    if cal.get("per_benchmark"):
        reached = "every one reached" if cal["reached"] else "**not every one reached**"
        intro = (
            f"Call bias calibrated per benchmark to {target}, each on held-out problems of its "
            f"own kind (its calibration set); {reached}."
        )
        own = [
            "| call bias | " + " | ".join(_bias_text(r["bias"]) for r in rows[:-1]) + " | |",
            "| share on its calibration set % | "
            + " | ".join(_pct(r["held_out"]["share"]) for r in rows[:-1])
            + " | |",
        ]
    else:
        held = cal["held_out"]
        reached = "reached" if cal["reached"] else "**not reached**: the closest bias seen was used"
        intro = (
            f"Call bias calibrated to {target} on {held['n_problems']} held-out problems: bias "
            f"{_bias_text(cal['bias'])}, {_pct(held['share'])} % there ({reached})."
        )
        own = []
    lines = [
        "",
        intro + " The relay mode's realised teacher share against that target:",
        "",
        "| | " + " | ".join(names) + " | average |",
        "|---|" + "---:|" * (len(names) + 1),
        *own,
    ]
    lines.append(
        f"| teacher share % (target {_pct(cal['target_share'])}) | "
        + " | ".join(_pct(r["share"]) for r in rows)
        + " |"
    )
    lines.append(
        "| abs(share − target), points | " + " | ".join(_pct(r["difference"]) for r in rows) + " |"
    )
    return lines


def render_markdown(metrics: Mapping[str, Any], run_command: str = "") -> str:
    """report.md: the paper-shaped table, the headline, the honest cost, the router sweep."""
    names = list(metrics["benchmarks"])
    modes = metrics["modes"]
    conf = round(100 * metrics["confidence"])
    lines = ["# Evaluation report", ""]
    if run_command:
        lines += [f"Produced by `{run_command}`.", ""]
    if metrics.get("warnings"):
        lines += [
            "## Warnings: this run is degenerate",
            "",
            "Parts of this run learned or measured nothing (relaypipe/checks.py); read every "
            "number below with that in mind:",
            "",
            *(f"- {w}" for w in metrics["warnings"]),
            "",
        ]
    ns = ", ".join(
        f"{b} n={int(next(iter(metrics['benchmarks'][b].values()))['n'])}" for b in names
    )
    lines += [
        f"Accuracy % (call ratio % in parentheses) per benchmark ({ns}); "
        "average = unweighted mean over benchmarks.",
        "",
        "| mode | " + " | ".join(names) + " | average |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for mode in MODE_ORDER:
        if mode not in modes and not any(mode in metrics["benchmarks"][b] for b in names):
            continue
        cells = [_cell(metrics["benchmarks"][b].get(mode)) for b in names]
        cells.append(_cell(modes.get(mode)))
        lines.append(f"| {MODE_TITLES[mode]} | " + " | ".join(cells) + " |")

    lines += _calibration_lines(metrics, names)

    notes = metrics["notes"]
    lines += ["", "## Headline", ""]
    headline = [
        ("gap recovered (relay − student) / (teacher − student)", "gap_recovered"),
        (
            "cost reduction vs performance-matched router (call ratio)",
            "cost_reduction_vs_matched_router",
        ),
        (
            "cost reduction vs performance-matched router (FLOPs)",
            "cost_reduction_vs_matched_router_flops",
        ),
    ]
    lines += ["| | " + " | ".join(names) + " | average |", "|---|" + "---:|" * (len(names) + 1)]
    for title, key in headline:
        per = [_fmt(metrics["headline_by_benchmark"][b][key], ".3f") for b in names]
        lines.append(f"| {title} | " + " | ".join(per) + f" | {_fmt(metrics[key], '.3f')} |")
    matched = metrics["matched_router"]
    if matched:
        lines += [
            "",
            "The router matching the relay's average accuracy "
            f"({100 * matched['accuracy']:.2f} %) runs at p = {matched['router_p']:.3f}, call "
            f"ratio {100 * matched['call_ratio']:.2f} %, {matched['flops']:.4g} FLOPs per request.",
        ]
    lines += [
        "",
        "The matched router is read off the sweep (anchored by the student at p = 0 and the "
        "teacher at p = 1) as its cheapest point, in p order, that reaches the relay's accuracy, "
        "by linear interpolation between swept points. Where the relay's accuracy is outside the "
        "sweep's range, below the cheapest point (the student alone at p = 0 is already more "
        "accurate) or above every point, there is no performance-matched router: the reduction "
        "is reported as null with the reason, never extrapolated.",
    ]
    if notes:
        lines += ["", "Nulls and why:", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(notes.items())]

    lines += [
        "",
        "## What each mode costs (average over benchmarks, per request)",
        "",
        f"| mode | accuracy % [{conf} % CI] | call % | teacher tokens | student tokens | teacher "
        "prefill, cached | teacher prefill, uncached | FLOPs | FLOPs, uncached teacher | "
        "USD per 1k requests | USD per 1k, uncached | latency ms |",
        "|---|" + "---:|" * 11,
    ]
    for mode in [m for m in MODE_ORDER if m in modes]:
        v = modes[mode]
        lines.append(
            f"| {MODE_TITLES[mode]} | {100 * v['accuracy']:.2f} "
            f"[{100 * v['accuracy_ci_low']:.1f}, {100 * v['accuracy_ci_high']:.1f}] "
            f"| {100 * v['call_ratio']:.2f} | {v['teacher_tokens']:.1f} "
            f"| {v['student_tokens']:.1f} "
            f"| {v['teacher_prefill_tokens']:.1f} | {v['teacher_context_tokens']:.1f} "
            f"| {v['flops']:.4g} | {v['flops_uncached']:.4g} | {1000 * v['cost_usd']:.4g} "
            f"| {1000 * v['cost_usd_uncached']:.4g} | {1000 * v['latency_s']:.1f} |"
        )
    lines += [
        "",
        "FLOPs = 2·params per processed token (generated + prefilled) for each model; "
        '"uncached" charges the teacher its full context at every call instead of what its KV '
        "cache left to prefill. Money: prefill tokens at the input price, generated tokens at "
        "the output price (`report.prices` of the preset). Latency: request wall time in batched "
        "decoding. See relaypipe/evaluate/cost.py.",
        "",
        "## Random-router sweep (average over benchmarks)",
        "",
        "| p | accuracy % | call % | FLOPs | USD per 1k requests |",
        "|---:|---:|---:|---:|---:|",
    ]
    for point in metrics["router_curve"]["average"]:
        lines.append(
            f"| {point['router_p']:g} | {100 * point['accuracy']:.2f} | "
            f"{100 * point['call_ratio']:.2f} | {point['flops']:.4g} | "
            f"{1000 * point['cost_usd']:.4g} |"
        )
    lines += [
        "",
        "p = 0 is the student mode and p = 1 the teacher mode (what the router is at those p).",
    ]
    lines += _pareto_lines(metrics, names)
    lines += ["", "![accuracy against call ratio](tradeoff.png)", ""]
    return "\n".join(lines)


def _pareto_lines(metrics: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """report.md's Pareto section: per benchmark and on average, the relay's points (the
    relay_sweep runs and the relay run) against the router, and the area between the curves.
    Nothing when no relay_sweep ran."""
    curves = metrics.get("relay_curve", {})
    oracle = metrics.get("oracle_curve", {})
    has_oracle = any(oracle.values())
    if not has_oracle and not any(p["mode"] == "relay_sweep" for c in curves.values() for p in c):
        return []
    lines = [
        "",
        "## Pareto: relay vs random router",
        "",
        "The relay decoded at each `<call>` logit bias of `evaluate.call_bias_sweep` (mode "
        "relay_sweep, same bounds and budgets) and at its own bias (the relay row, marked *). "
        "Router accuracy at the relay's teacher share is read off the router sweep; the cost "
        "reduction is 1 − relay share / share of the router matched in accuracy (null where "
        "the router does not reach it; summary.json cost_reduction_by_budget says why). "
        "Area: between the relay and router curves over the relay's share range "
        "(trapezoids; accuracy × share), and the mean accuracy gain (area / width of the "
        "range).",
    ]
    if has_oracle:
        lines += [
            "",
            "The oracle caller (`evaluate.oracle_sweep`; relaypipe/evaluate/oracle.py): the "
            "bootstrap student with the teacher judging every step: the teacher writes each "
            "step where it would have written another token and gives the student's token a "
            "probability below τ, under the relay's budgets. It peeks at the teacher at every "
            "step, so it is a reference for *where* to call, not a deployable cost. Its "
            "accuracy at a share is read off its curve (anchored at 0 by the student; above "
            "it, the saturated oracle's, τ ≥ 0.5); relay / oracle is the relay's accuracy as a "
            "fraction of it.",
        ]
    notes = metrics["notes"]
    for panel in ["average", *names]:
        entries = metrics["cost_reduction_by_budget"].get(panel, [])
        extra = " oracle accuracy % at that share |" if has_oracle else ""
        lines += [
            "",
            f"### {panel}",
            "",
            "| bias | teacher share % | accuracy % | router accuracy % at that share | "
            f"cost reduction vs router at equal accuracy |{extra}",
            "|---:|---:|---:|---:|---:|" + ("---:|" if has_oracle else ""),
        ]
        for e in entries:
            star = " *" if e["mode"] == "relay" else ""
            cell = f" {_pct(e.get('oracle_accuracy_at_share'))} |" if has_oracle else ""
            lines.append(
                f"| {_bias_text(e['call_bias'])}{star} | {_pct(e['call_ratio'])} | "
                f"{_pct(e['accuracy'])} | {_pct(e['router_accuracy_at_share'])} | "
                f"{_fmt(e['cost_reduction'], '.3f')} |{cell}"
            )
        area = metrics["pareto"].get(panel)
        if area is None:
            why = notes.get(f"pareto.{panel}", "no relay points")
            lines += ["", f"Area vs router: null ({why})."]
        else:
            lo, hi = area["share_range"]
            lines += [
                "",
                f"Area vs router over teacher share [{_pct(lo)} %, {_pct(hi)} %]: "
                f"{area['area_vs_router']:.4g}; mean accuracy gain "
                f"{100 * area['mean_gain']:+.2f} points.",
            ]
        if oracle.get(panel):
            lines += ["", *_oracle_lines(metrics, panel)]
    return lines


def _oracle_lines(metrics: Mapping[str, Any], panel: str) -> list[str]:
    """report.md: one panel's oracle curve and the relay against it."""
    points = "; ".join(
        f"τ {p['oracle_tau']:g}{' (student)' if p['mode'] != ORACLE_MODE else ''}: "
        f"{_pct(p['call_ratio'])} % → {_pct(p['accuracy'])} %"
        for p in metrics["oracle_curve"][panel]
    )
    vs = metrics.get("relay_vs_oracle", {}).get(panel)
    if vs is None:
        verdict = "relay / oracle: null (the relay mode was not evaluated)."
    elif vs["ratio"] is None:
        why = metrics["notes"].get(f"relay_vs_oracle.{panel}", "")
        verdict = f"relay / oracle at the relay's share: null ({why})."
    else:
        verdict = (
            f"relay / oracle at the relay's share ({_pct(vs['call_ratio'])} %): "
            f"{_pct(vs['accuracy'])} % / {_pct(vs['oracle_accuracy'])} % = **{vs['ratio']:.3f}** "
            f"(oracle {vs['read']})."
        )
    return [f"Oracle caller (teacher share → accuracy): {points}. {verdict}"]
