"""The report: summary.json shape and headline numbers from a small synthetic requests table,
metrics.json's few headline scalars (DVC's columns), report.md's paper-shaped table, the PNG,
and a bad table refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from relaypipe.evaluate.cost import wilson_interval
from relaypipe.evaluate.report import build_metrics
from relaypipe.io import SchemaViolation, write_json, write_table
from relaypipe.schemas import EvalRequestSchema
from relaypipe.stages.inputs import StageInputError
from relaypipe.stages.report import Prices, ReportParams, read_inputs, run

# student 100 parameters, teacher 1,000; FLOPs = 2 * N * (generated + prefilled) per model.
MODELS_JSON = {
    "teacher": {"path": "t", "params": 1000},
    "students": {
        "student": {"path": "s", "params": 100},
        "warmup": {"path": "w", "params": 100},
        "relay": {"path": "r", "params": 100},
    },
    "modes": {
        "student": "student",
        "warmup": "warmup",
        "relay": "relay",
        "teacher_free": "relay",
        "teacher": "student",
        "random_router": "student",
    },
}


def rows(benchmark, mode, correct, *, p=-1.0, s=10, t=0, sp=10, tp=0, ctx=0, calls=0):
    """One row per entry of ``correct``, all with the same token counts."""
    return [
        {
            "benchmark": benchmark,
            "mode": mode,
            "router_p": p,
            "problem_id": f"q{i}",
            "correct": bool(c),
            "student_tokens": s,
            "teacher_tokens": t,
            "command_tokens": 0,
            "calls": calls,
            "teacher_prefill_tokens": tp,
            "teacher_context_tokens": ctx,
            "student_prefill_tokens": sp,
            "latency_s": 0.25,
        }
        for i, c in enumerate(correct)
    ]


def benchmark_rows(name: str, relay_correct=(1, 1, 0, 0)) -> list[dict]:
    return [
        *rows(name, "student", [1, 0, 0, 0]),  # 0.25
        *rows(name, "warmup", [1, 0, 0, 0]),
        *rows(name, "teacher_free", [1, 0, 0, 0]),
        *rows(name, "teacher", [1, 1, 1, 1], s=0, t=10, sp=0, tp=5, ctx=5, calls=1),
        # relay: call ratio 1 / 10 = 0.1; FLOPs 2*100*(9+10) + 2*1000*(1+10) = 25,800
        *rows(name, "relay", relay_correct, s=9, t=1, tp=10, ctx=12, calls=1),
        # p = 0.2: call ratio 0.2, accuracy 0.25; FLOPs 2*100*(8+10) + 2*1000*(2+10) = 27,600
        *rows(name, "random_router", [1, 0, 0, 0], p=0.2, s=8, t=2, tp=10, ctx=20, calls=2),
        # p = 0.6: call ratio 0.6, accuracy 0.75; FLOPs 2*100*(4+10) + 2*1000*(6+20) = 54,800
        *rows(name, "random_router", [1, 1, 1, 0], p=0.6, s=4, t=6, tp=20, ctx=40, calls=5),
    ]


def write_inputs(
    tmp_path: Path, table: list[dict], models: dict = MODELS_JSON, stage_metrics=()
) -> ReportParams:
    write_table(pd.DataFrame(table), tmp_path / "requests.parquet", EvalRequestSchema)
    write_json(tmp_path / "models.json", models)
    return ReportParams(
        prices=Prices(),
        requests=str(tmp_path / "requests.parquet"),
        models=str(tmp_path / "models.json"),
        stage_metrics=list(stage_metrics),
        out_dir=str(tmp_path / "out"),
    )


def test_metrics_shape_and_headline_numbers(tmp_path):
    params = write_inputs(tmp_path, benchmark_rows("b1") + benchmark_rows("b2"))
    run(params)
    out = tmp_path / "out"
    m = json.loads((out / "summary.json").read_text())
    modes = ("student", "warmup", "relay", "teacher_free", "teacher", "random_router")
    keys = (
        "accuracy",
        "accuracy_ci_low",
        "accuracy_ci_high",
        "call_ratio",
        "teacher_tokens",
        "student_tokens",
        "teacher_prefill_tokens",
        "flops",
        "cost_usd",
        "latency_s",
    )
    for mode in modes:
        assert set(keys) <= set(m["modes"][mode]), mode
        for b in ("b1", "b2"):
            assert set(keys) <= set(m["benchmarks"][b][mode]), (b, mode)
    relay = m["modes"]["relay"]
    assert relay["accuracy"] == 0.5 and relay["call_ratio"] == pytest.approx(0.1)
    assert relay["flops"] == 25_800
    # the interval of a macro average is Wilson on pooled counts: 4 of 8
    assert (relay["accuracy_ci_low"], relay["accuracy_ci_high"]) == pytest.approx(
        wilson_interval(4, 8), abs=1e-6
    )
    # gap recovered: (0.5 - 0.25) / (1 - 0.25) = 1/3
    assert m["gap_recovered"] == pytest.approx(1 / 3, abs=1e-6)
    # the router at the relay's call ratio 0.1: halfway p 0 -> 0.2, accuracy 0.25 either side
    router = m["modes"]["random_router"]
    assert router["call_ratio"] == pytest.approx(0.1) and router["accuracy"] == pytest.approx(0.25)
    # matched at accuracy 0.5: halfway p 0.2 -> 0.6 (0.25 -> 0.75): call ratio 0.4, p 0.4,
    # FLOPs (27,600 + 54,800) / 2 = 41,200
    matched = m["matched_router"]
    assert matched["call_ratio"] == pytest.approx(0.4) and matched["router_p"] == pytest.approx(0.4)
    assert matched["flops"] == pytest.approx(41_200)
    assert m["cost_reduction_vs_matched_router"] == pytest.approx(1 - 0.1 / 0.4)  # 0.75
    assert m["cost_reduction_vs_matched_router_flops"] == pytest.approx(
        1 - 25_800 / 41_200, abs=1e-6
    )
    assert m["headline_by_benchmark"]["b1"]["cost_reduction_vs_matched_router"] == pytest.approx(
        0.75
    )
    # no relay_sweep ran: one relay point, no Pareto area (its only nulls)
    assert set(m["notes"]) == {"pareto.average", "pareto.b1", "pareto.b2"}
    assert m["pareto"] == {"average": None, "b1": None, "b2": None}

    md = (out / "report.md").read_text()
    assert "Pareto" not in md
    assert "| mode | b1 | b2 | average |" in md
    # accuracy % with call % in parentheses
    assert "| RelayLLM (relay) | 50.00 (10.00) | 50.00 (10.00) | 50.00 (10.00) |" in md
    assert "| teacher | 100.00 (100.00) |" in md
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((out / "plots" / "tradeoff.json").read_text())
    assert {p["name"] for p in points} >= {"relay", "teacher", "router p=0.2", "router p=0"}
    assert all({"call_ratio", "accuracy"} <= set(p) for p in points)


def test_macro_average_is_unweighted_over_benchmarks(tmp_path):
    # b2's relay gets 1 of 4: macro accuracy (0.5 + 0.25) / 2
    params = write_inputs(tmp_path, benchmark_rows("b1") + benchmark_rows("b2", (1, 0, 0, 0)))
    m = json.loads(json.dumps(run(params)))
    assert m["relay_accuracy"] == pytest.approx(0.375)
    assert m == json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_relay_below_the_router_curve_gives_null_and_a_reason(tmp_path):
    # relay 0 of 4, below the student alone (p = 0, 0.25): no performance-matched router
    params = write_inputs(tmp_path, benchmark_rows("b1", (0, 0, 0, 0)))
    run(params)
    m = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert m["cost_reduction_vs_matched_router"] is None
    assert m["cost_reduction_vs_matched_router_flops"] is None
    assert m["matched_router"] is None
    assert "below" in m["notes"]["cost_reduction_vs_matched_router"]
    assert m["gap_recovered"] == pytest.approx(-1 / 3, abs=1e-6)  # (0 - 0.25) / 0.75
    md = (tmp_path / "out" / "report.md").read_text()
    assert "null" in md and "never extrapolated" in md
    headline = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert headline["cost_reduction"] is None and headline["cost_reduction_flops"] is None
    assert headline["gap_recovered"] == m["gap_recovered"]


def test_report_refuses_a_bad_requests_table_and_writes_nothing(tmp_path):
    params = write_inputs(tmp_path, benchmark_rows("b1"))
    bad = pd.read_parquet(tmp_path / "requests.parquet")
    bad.loc[2, "teacher_tokens"] = -3
    bad.loc[5, "router_p"] = 0.5  # a student row with a router probability
    bad.to_parquet(tmp_path / "requests.parquet")
    with pytest.raises(SchemaViolation) as err:
        run(params)
    message = str(err.value)
    assert "teacher_tokens" in message and "row 2" in message
    assert "router_p in [0, 1] for random_router rows" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ metrics.json: the headline


def flat(value, prefix=""):
    """Leaves of a JSON value by dotted name, as DVC flattens a metrics file into columns
    (lists flattened by index too, the stricter count)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


SFT_METRICS = {
    "bootstrap": {"accuracy": 0.25, "call_ratio": 0.0},
    "warmup": {"accuracy": 0.25, "call_ratio": 0.0},
    "warmup_relay": {"accuracy": 0.4167, "call_ratio": 0.05},
    "accuracy_drop_teacher_free": 0.0,
    "warnings": [],
}
GRPO_METRICS = {
    "relay": {"accuracy": 0.5833, "call_ratio": 0.1},
    "teacher_free": {"accuracy": 0.25, "call_ratio": 0.0},
    "gap_recovered": 0.4444,
    "warnings": ["grpo: kept a degenerate run"],
}
BENCHMARKS_3 = ("b1", "b2", "b3")


def three_benchmarks(tmp_path: Path, models: dict = MODELS_JSON, **stages: dict) -> ReportParams:
    """b2's relay gets 3 of 4 (gap recovered 2/3), the others 2 of 4 (1/3)."""
    paths = []
    for stage, metrics in stages.items():
        path = tmp_path / stage / "metrics.json"
        write_json(path, metrics)
        paths.append(str(path))
    table = [
        *benchmark_rows("b1"),
        *benchmark_rows("b2", (1, 1, 1, 0)),
        *benchmark_rows("b3"),
    ]
    return write_inputs(tmp_path, table, models, stage_metrics=paths)


def test_metrics_json_holds_a_few_headline_scalars_and_summary_json_the_rest(tmp_path):
    params = three_benchmarks(tmp_path, sft=SFT_METRICS, grpo=GRPO_METRICS)
    returned = run(params)
    out = tmp_path / "out"
    headline = json.loads((out / "metrics.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert returned == headline

    # summary.json is exactly what build_metrics returns (written the same way)
    requests, models, upstream, decoding, _ = read_inputs(params)
    expected = build_metrics(requests, models, params.confidence, upstream, decoding)
    write_json(tmp_path / "expected.json", expected)
    assert (out / "summary.json").read_text() == (tmp_path / "expected.json").read_text()
    assert len(flat(summary)) > 100  # what DVC showed before, one column per leaf

    leaves = flat(headline)
    assert len(leaves) <= 13, sorted(leaves)
    assert set(leaves) == {
        "relay_accuracy",
        "teacher_share",
        "gap_recovered",
        "cost_reduction",
        "cost_reduction_flops",
        *(f"gap_recovered_by_benchmark.{b}" for b in BENCHMARKS_3),
        "student_accuracy",
        "teacher_accuracy",
        "warmup_relay_accuracy",
        "grpo_relay_accuracy",
        "warnings",
    }
    assert all(v is None or isinstance(v, int | float) for v in leaves.values())
    # gap recovered, per benchmark and on average, as summary.json has it
    assert headline["gap_recovered_by_benchmark"] == {
        b: summary["headline_by_benchmark"][b]["gap_recovered"] for b in BENCHMARKS_3
    }
    assert headline["gap_recovered_by_benchmark"]["b2"] == pytest.approx(2 / 3, abs=1e-5)
    assert headline["gap_recovered"] == summary["gap_recovered"]
    assert headline["gap_recovered"] == pytest.approx(4 / 9, abs=1e-5)  # (7/12 - 1/4) / (3/4)
    assert headline["cost_reduction"] == summary["cost_reduction_vs_matched_router"]
    assert headline["cost_reduction_flops"] == summary["cost_reduction_vs_matched_router_flops"]
    relay = summary["modes"]["relay"]
    assert headline["relay_accuracy"] == relay["accuracy"]
    assert headline["teacher_share"] == relay["call_ratio"] == pytest.approx(0.1)
    assert headline["student_accuracy"] == summary["modes"]["student"]["accuracy"] == 0.25
    assert headline["teacher_accuracy"] == summary["modes"]["teacher"]["accuracy"] == 1.0
    # the training stages' end-of-stage relay accuracy
    assert headline["warmup_relay_accuracy"] == 0.4167
    assert headline["grpo_relay_accuracy"] == 0.5833
    # a count of the warnings, whose text is in summary.json and report.md
    assert summary["warnings"] == ["grpo: kept a degenerate run"]
    assert headline["warnings"] == 1
    assert "calibration" not in headline and summary["calibration"] is None


def test_metrics_json_has_the_calibration_only_when_evaluate_calibrated(tmp_path):
    calibration = {
        "target_share": 0.1,
        "tol": 0.05,
        "bias": 1.5,
        "share": 0.12,
        "accuracy": 0.5,
        "reached": True,
        "n_problems": 12,
    }
    models = {**MODELS_JSON, "decoding": {"call_bias": 1.5, "calibration": calibration}}
    headline = run(three_benchmarks(tmp_path, models, sft=SFT_METRICS, grpo=GRPO_METRICS))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert headline["calibration"] == {
        "target_share": 0.1,
        "realised_share": summary["calibration"]["average"]["share"],
    }
    assert headline["calibration"]["realised_share"] == pytest.approx(0.1)
    assert len(flat(headline)) <= 13 + 2
    assert headline == json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_metrics_json_without_training_metrics_leaves_their_numbers_out(tmp_path):
    """A stage that never ran (its metrics file missing) gives no key; nothing warned."""
    params = three_benchmarks(tmp_path)
    params = ReportParams(
        requests=params.requests,
        models=params.models,
        stage_metrics=[str(tmp_path / "sft" / "metrics.json"), str(tmp_path / "grpo/x.json")],
        out_dir=params.out_dir,
    )
    headline = run(params)
    assert "warmup_relay_accuracy" not in headline and "grpo_relay_accuracy" not in headline
    assert headline["warnings"] == 0
    assert len(flat(headline)) == 11


def test_training_metrics_without_their_number_are_refused_and_nothing_written(tmp_path):
    broken = {k: v for k, v in SFT_METRICS.items() if k != "warmup_relay"}
    params = three_benchmarks(tmp_path, sft=broken, grpo=GRPO_METRICS)
    with pytest.raises(StageInputError) as err:
        run(params)
    message = str(err.value)
    assert str(tmp_path / "sft" / "metrics.json") in message
    assert "'warmup_relay.accuracy' must be a number" in message and "sft stage" in message
    assert not (tmp_path / "out").exists()


def test_stage_metrics_are_named_by_file_or_folder():
    """sft's and grpo's metrics are read from the model folders they wrote (training.json)."""
    from relaypipe.stages.report import STAGE_METRICS, _stage_name

    assert [_stage_name(p) for p in STAGE_METRICS] == [
        "bootstrap",
        "filter",
        "warmup_data",
        "sft",
        "grpo",
    ]
    assert _stage_name("x/sft/metrics.json") == "sft"
    assert _stage_name("x/other/training.json") is None


# ------------------------------------------------------------- the relay's Pareto curve


SWEEP_MODELS = {**MODELS_JSON, "modes": {**MODELS_JSON["modes"], "relay_sweep": "relay"}}


def sweep_rows(name: str) -> list[dict]:
    """relay_sweep at three biases: (call ratio, accuracy) (0.05, 0), (0.3, 0.75), (0.4, 0.75)."""
    return [
        *rows(name, "relay_sweep", [0, 0, 0, 0], s=19, t=1, tp=10, ctx=12, calls=1),
        *rows(name, "relay_sweep", [1, 1, 1, 0], s=7, t=3, tp=10, ctx=12, calls=1),
        *rows(name, "relay_sweep", [1, 1, 1, 0], s=6, t=4, tp=10, ctx=12, calls=1),
    ]


def with_bias(table: list[dict], sweep=(-2.0, 2.0, 4.0)) -> list[dict]:
    """call_bias on every row: the sweep rows (n per bias, in order) theirs, the others 0."""
    out, k = [], 0
    for r in table:
        if r["mode"] == "relay_sweep":
            out.append({**r, "call_bias": sweep[k // 4]})
            k += 1
        else:
            out.append({**r, "call_bias": 0.0})
    return out


def sweep_table(name: str, **kw) -> list[dict]:
    return [*benchmark_rows(name, **kw), *sweep_rows(name)]


def test_pareto_area_and_cost_reduction_by_budget_on_known_numbers(tmp_path):
    table = [*with_bias(sweep_table("b1")), *with_bias(sweep_table("b2"))]
    headline = run(write_inputs(tmp_path, table, SWEEP_MODELS))
    out = tmp_path / "out"
    m = json.loads((out / "summary.json").read_text())
    # router curve (student p=0, p=0.2, p=0.6, teacher p=1): (0, .25) (.2, .25) (.6, .75) (1, 1)
    # relay points by share: bias -2 (.05, 0), relay 0 (.1, .5), +2 (.3, .75), +4 (.4, .75)
    for panel in ("average", "b1", "b2"):
        curve = m["relay_curve"][panel]
        assert [p["call_bias"] for p in curve] == [-2.0, 0.0, 2.0, 4.0]
        assert [p["mode"] for p in curve] == ["relay_sweep", "relay", "relay_sweep", "relay_sweep"]
        assert [p["call_ratio"] for p in curve] == pytest.approx([0.05, 0.1, 0.3, 0.4])
        assert [p["accuracy"] for p in curve] == pytest.approx([0, 0.5, 0.75, 0.75])
        # router at those shares: .25, .25, .375 (a quarter of .2->.6), .5 (half of it)
        # gains -.25, .25, .375, .25; trapezoids .05*0/2 + .2*.625/2 + .1*.625/2 = .09375
        pareto = m["pareto"][panel]
        assert pareto["area_vs_router"] == pytest.approx(0.09375)
        assert pareto["share_range"] == pytest.approx([0.05, 0.4])
        assert pareto["mean_gain"] == pytest.approx(0.09375 / 0.35, abs=1e-6)
        assert f"pareto.{panel}" not in m["notes"]
        budget = m["cost_reduction_by_budget"][panel]
        assert [b["router_accuracy_at_share"] for b in budget] == pytest.approx(
            [0.25, 0.25, 0.375, 0.5]
        )
        # accuracy 0 is below the router at p = 0: no match
        assert budget[0]["cost_reduction"] is None and "below" in budget[0]["note"]
        # .5: router at .4 (halfway .2 -> .6); .75: router at .6
        assert [b["router_call_ratio"] for b in budget[1:]] == pytest.approx([0.4, 0.6, 0.6])
        assert [b["cost_reduction"] for b in budget[1:]] == pytest.approx(
            [1 - 0.1 / 0.4, 1 - 0.3 / 0.6, 1 - 0.4 / 0.6], abs=1e-6
        )
        assert all(b["note"] is None for b in budget[1:])
    # the sweep rows are not a mode of their own, and the headline is the relay run's
    assert "relay_sweep" not in m["modes"] and "relay_sweep" not in m["benchmarks"]["b1"]
    assert m["modes"]["relay"]["call_ratio"] == pytest.approx(0.1)
    assert m["cost_reduction_vs_matched_router"] == pytest.approx(0.75)
    # metrics.json, the DVC metric, is the same shape as without a sweep
    plain = run(write_inputs(tmp_path / "plain", benchmark_rows("b1") + benchmark_rows("b2")))
    assert set(headline) == set(plain)
    assert (
        headline["gap_recovered_by_benchmark"].keys() == plain["gap_recovered_by_benchmark"].keys()
    )

    md = (out / "report.md").read_text()
    assert "## Pareto: relay vs random router" in md
    assert "### average" in md and "### b1" in md and "### b2" in md
    assert "| -2 | 5.00 | 0.00 | 25.00 | null |" in md
    assert "| 0 * | 10.00 | 50.00 | 25.00 | 0.750 |" in md
    assert "| +4 | 40.00 | 75.00 | 50.00 | 0.333 |" in md
    assert (
        "Area vs router over teacher share [5.00 %, 40.00 %]: 0.09375; mean accuracy gain "
        "+26.79 points." in md
    )
    points = json.loads((out / "plots" / "tradeoff.json").read_text())
    sweep = [p for p in points if p["mode"] == "relay_sweep"]
    assert [p["name"] for p in sweep] == ["relay bias=-2", "relay bias=+2", "relay bias=+4"]
    assert [p["call_ratio"] for p in sweep] == pytest.approx([0.05, 0.3, 0.4])
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_is_null_with_a_note_where_the_router_does_not_cover_the_relay(tmp_path):
    # no teacher mode: the router curve ends at p = 0.2 (call ratio .2), short of .3 and .4
    table = [
        r
        for r in with_bias(sweep_table("b1"))
        if r["mode"] not in ("teacher", "random_router") or r["router_p"] == 0.2
    ]
    run(write_inputs(tmp_path, table, SWEEP_MODELS))
    m = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert m["pareto"]["b1"] is None and m["pareto"]["average"] is None
    assert "does not cover" in m["notes"]["pareto.b1"] and "above" in m["notes"]["pareto.b1"]
    budget = m["cost_reduction_by_budget"]["b1"]
    # the relay (.5) and the +2/+4 points (.75) are above the router's best accuracy (.25)
    assert [b["cost_reduction"] for b in budget] == [None] * 4
    assert "above" in budget[2]["note"]
    assert budget[2]["router_accuracy_at_share"] is None  # share .3 is past the router's end
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Area vs router: null (the router curve does not cover" in md


def test_pareto_needs_two_relay_points_and_a_width(tmp_path):
    # one sweep bias landing on the relay's own share: two points, width 0
    table = [*benchmark_rows("b1"), *rows("b1", "relay_sweep", [1, 0, 0, 0], s=9, t=1)]
    run(write_inputs(tmp_path, with_bias(table, sweep=(-1.0,)), SWEEP_MODELS))
    m = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(m["relay_curve"]["b1"]) == 2
    assert m["pareto"]["b1"] is None and "width 0" in m["notes"]["pareto.b1"]
    # no sweep at all: the relay alone
    run(write_inputs(tmp_path / "one", benchmark_rows("b1")))
    m = json.loads((tmp_path / "one" / "out" / "summary.json").read_text())
    assert len(m["relay_curve"]["b1"]) == 1 and m["pareto"]["b1"] is None
    assert "1 relay point(s)" in m["notes"]["pareto.b1"]
    assert m["cost_reduction_by_budget"]["b1"][0]["cost_reduction"] == pytest.approx(0.75)


def test_relay_sweep_rows_need_a_finite_call_bias(tmp_path):
    table = [*benchmark_rows("b1"), *sweep_rows("b1")]
    with pytest.raises(SchemaViolation, match="call_bias finite for relay_sweep rows"):
        write_table(pd.DataFrame(table), tmp_path / "r.parquet", EvalRequestSchema)
    frame = pd.DataFrame(with_bias(table))
    frame.loc[frame["mode"] == "relay_sweep", "call_bias"] = float("inf")
    with pytest.raises(SchemaViolation, match="call_bias"):
        write_table(frame, tmp_path / "r.parquet", EvalRequestSchema)
    # one row per problem per bias: the same bias twice is a duplicate
    twice = with_bias(table, sweep=(1.0, 1.0, 2.0))
    with pytest.raises(SchemaViolation, match="uniqueness"):
        write_table(pd.DataFrame(twice), tmp_path / "r.parquet", EvalRequestSchema)
    # a table from before the column (no sweep) is still valid
    write_table(pd.DataFrame(benchmark_rows("b1")), tmp_path / "old.parquet", EvalRequestSchema)


ORACLE_MODELS = {**SWEEP_MODELS, "modes": {**SWEEP_MODELS["modes"], "oracle": "student"}}


def oracle_rows(name: str) -> list[dict]:
    """The oracle at tau .01: (call ratio, accuracy) (0.05, 0.75); at tau .5: (0.2, 1.0)."""
    return [
        *(
            {**r, "oracle_tau": 0.01}
            for r in rows(name, "oracle", [1, 1, 1, 0], s=19, t=1, tp=20, ctx=200)
        ),
        *(
            {**r, "oracle_tau": 0.5}
            for r in rows(name, "oracle", [1, 1, 1, 1], s=8, t=2, tp=20, ctx=200)
        ),
    ]


def with_oracle(table: list[dict], name: str) -> list[dict]:
    """``table`` (call_bias set) with oracle_tau -1, and the oracle's rows of benchmark ``name``."""
    return [
        *({**r, "oracle_tau": -1.0} for r in table),
        *({**r, "call_bias": 0.0} for r in oracle_rows(name)),
    ]


def test_the_oracle_curve_and_the_relay_as_a_fraction_of_it_on_known_numbers(tmp_path):
    table = [
        *with_oracle(with_bias(sweep_table("b1")), "b1"),
        *with_oracle(with_bias(sweep_table("b2")), "b2"),
    ]
    headline = run(write_inputs(tmp_path, table, ORACLE_MODELS))
    out = tmp_path / "out"
    m = json.loads((out / "summary.json").read_text())
    for panel in ("average", "b1", "b2"):
        # anchored by the student (0, .25), then tau .01 (.05, .75) and tau .5 (.2, 1)
        curve = m["oracle_curve"][panel]
        assert [p["oracle_tau"] for p in curve] == [0.0, 0.01, 0.5]
        assert [p["mode"] for p in curve] == ["student", "oracle", "oracle"]
        assert [p["call_ratio"] for p in curve] == pytest.approx([0.0, 0.05, 0.2])
        assert [p["accuracy"] for p in curve] == pytest.approx([0.25, 0.75, 1.0])
        # the relay (.5 at share .1): the oracle a third of the way from .75 to 1, 5/6
        vs = m["relay_vs_oracle"][panel]
        assert vs["oracle_accuracy"] == pytest.approx(5 / 6, abs=1e-5)
        assert vs["ratio"] == pytest.approx(0.6, abs=1e-5) and vs["read"] == "interpolated"
        # per relay point: shares .05, .1 on the curve; .3 and .4 past it, the saturated 1.0
        budget = m["cost_reduction_by_budget"][panel]
        assert [b["oracle_accuracy_at_share"] for b in budget] == pytest.approx(
            [0.75, 5 / 6, 1.0, 1.0], abs=1e-5
        )
    # the oracle rows are no mode of their own, and change nothing else
    assert "oracle" not in m["modes"] and "oracle" not in m["benchmarks"]["b1"]
    plain = json.loads(
        (
            _run_to(tmp_path / "plain", with_bias(sweep_table("b1")) + with_bias(sweep_table("b2")))
            / "summary.json"
        ).read_text()
    )
    for key in ("modes", "benchmarks", "router_curve", "relay_curve", "pareto"):
        assert m[key] == plain[key]
    assert plain["oracle_curve"] == {"average": [], "b1": [], "b2": []}
    assert plain["relay_vs_oracle"] == {}
    # metrics.json: one leaf more, the average ratio
    assert headline["relay_vs_oracle"] == pytest.approx(0.6, abs=1e-5)
    assert "relay_vs_oracle" not in json.loads(
        (tmp_path / "plain" / "out" / "metrics.json").read_text()
    )

    md = (out / "report.md").read_text()
    assert "| 0 * | 10.00 | 50.00 | 25.00 | 0.750 | 83.33 |" in md
    assert "| +4 | 40.00 | 75.00 | 50.00 | 0.333 | 100.00 |" in md
    assert (
        "Oracle caller (teacher share → accuracy): τ 0 (student): 0.00 % → 25.00 %; τ 0.01: "
        "5.00 % → 75.00 %; τ 0.5: 20.00 % → 100.00 %. relay / oracle at the relay's share "
        "(10.00 %): 50.00 % / 83.33 % = **0.600** (oracle interpolated)."
    ) in md
    points = json.loads((out / "plots" / "tradeoff.json").read_text())
    oracle = [p for p in points if p["mode"] == "oracle"]
    assert [p["name"] for p in oracle] == ["oracle tau=0.01", "oracle tau=0.5"]
    assert [p["call_ratio"] for p in oracle] == pytest.approx([0.05, 0.2])
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_to(folder: Path, table: list[dict]) -> Path:
    folder.mkdir()
    run(write_inputs(folder, table, SWEEP_MODELS))
    return folder / "out"


def test_relay_vs_oracle_is_null_with_a_note_where_the_oracle_cannot_be_read(tmp_path):
    # only tau .01 (unsaturated, up to share .05): the relay at .1 is past it; no relay_sweep
    table = [
        *({**r, "call_bias": 0.0, "oracle_tau": -1.0} for r in benchmark_rows("b1")),
        *({**r, "call_bias": 0.0} for r in oracle_rows("b1") if r["oracle_tau"] == 0.01),
    ]
    headline = run(write_inputs(tmp_path, table, ORACLE_MODELS))
    m = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert m["relay_vs_oracle"]["b1"]["ratio"] is None
    assert m["relay_vs_oracle"]["b1"]["oracle_accuracy"] is None
    note = m["notes"]["relay_vs_oracle.b1"]
    assert "above the oracle curve's range" in note and "not extrapolated" in note
    assert headline["relay_vs_oracle"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Pareto: relay vs random router" in md  # the oracle alone opens the section
    assert "relay / oracle at the relay's share: null (no oracle at the relay's" in md


def test_oracle_rows_need_their_threshold(tmp_path):
    table = with_oracle(with_bias(benchmark_rows("b1")), "b1")
    frame = pd.DataFrame(table)
    frame.loc[frame["mode"] == "oracle", "oracle_tau"] = -1.0
    with pytest.raises(SchemaViolation, match=r"oracle_tau in \[0, 1\] for oracle rows"):
        write_table(frame, tmp_path / "r.parquet", EvalRequestSchema)
    frame = pd.DataFrame(table)
    frame.loc[frame["mode"] == "relay", "oracle_tau"] = 0.5
    with pytest.raises(SchemaViolation, match="-1 for all others"):
        write_table(frame, tmp_path / "r.parquet", EvalRequestSchema)
    # without the column there can be no oracle row
    frame = pd.DataFrame(table).drop(columns=["oracle_tau"])
    with pytest.raises(SchemaViolation, match="oracle_tau in"):
        write_table(frame, tmp_path / "r.parquet", EvalRequestSchema)
    # one row per problem per threshold
    twice = pd.DataFrame(table + [r for r in table if r.get("oracle_tau") == 0.5])
    with pytest.raises(SchemaViolation, match="uniqueness"):
        write_table(twice, tmp_path / "r.parquet", EvalRequestSchema)
