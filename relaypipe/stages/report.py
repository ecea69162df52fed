"""Stage ``report``: accuracy, honest cost and the matched-router headline, from the eval table.

Run: ``python -m relaypipe.stages.report`` (reads ``params.yaml:report``) or
``dvc repro report``; ``dvc metrics show`` and ``dvc plots show`` read what it writes.
Reads ``data/eval/requests.parquet`` (EvalRequestSchema) and ``data/eval/models.json`` (from
``evaluate``), and the earlier stages' metrics files (``stage_metrics``: their warnings, and
sft's and grpo's headline accuracy). Writes, all under ``data/eval/``:

* ``summary.json``: everything the report computed (a plain output, not a DVC metric):
  ``modes.<mode>.<metric>`` (macro average over benchmarks),
  ``calibration`` (when evaluate calibrated the relay's call bias: the target teacher share
  against the realised one on each benchmark and on average, and their difference),
  ``benchmarks.<name>.<mode>.<metric>``, ``gap_recovered``, ``cost_reduction_vs_matched_router``
  (teacher-token share, the paper's measure), ``cost_reduction_vs_matched_router_flops``, with
  95 % Wilson intervals for every accuracy, ``router_curve``, the relay's Pareto curve
  (``relay_curve``: the relay_sweep runs at each call bias and the relay run;
  ``pareto``: the area between it and the router curve over the relay's share range;
  ``cost_reduction_by_budget``: per relay point, against the router matched in accuracy, and
  the oracle caller's accuracy at its share), the oracle caller's curve (``oracle_curve``, when
  evaluate ran ``oracle_sweep``) and the relay against it (``relay_vs_oracle``: the relay's
  accuracy as a fraction of the oracle's at the relay's teacher share), ``notes`` saying why
  any number is null (nothing to compare: no matched router, a relay that never called, no gap) and
  ``warnings`` (those the earlier stages recorded in ``stage_metrics``, plus the report's own;
  they head report.md) (relaypipe/evaluate/report.py has the full shape);
* ``metrics.json``: the DVC metric, headline scalars only (about a dozen columns in
  ``dvc exp show``): the relay's, student's and teacher's average accuracy, the relay's teacher
  share, gap recovered (on average and per benchmark), the two cost reductions, sft's and grpo's
  relay accuracy, the number of warnings, when calibrated the target and realised teacher
  share, and when the oracle ran ``relay_vs_oracle`` (relaypipe/evaluate/report.py
  ``headline_metrics`` has the shape; nulls are explained in summary.json's ``notes``);
* ``plots/tradeoff.json``: accuracy against call ratio for every mode, router p, relay_sweep
  bias and oracle threshold (DVC plot);
* ``tradeoff.png``: the same drawn with matplotlib, per benchmark and averaged (the router
  sweep, the relay sweep and the oracle caller as curves);
* ``report.md``: the paper-shaped table (rows: modes; columns: benchmarks + average; call % in
  parentheses), the headline, a per-mode cost table, the router sweep and, when evaluate ran
  relay_sweep or the oracle, the section "Pareto: relay vs random router" (with the oracle
  caller's curve and the relay's fraction of it per benchmark).

Departures from the paper: cost counts teacher prefill (with and without prefix caching),
FLOPs, money and latency besides the generated-token share; the matched router is interpolated
without extrapolation (null + reason outside the sweep), see relaypipe/evaluate/cost.py.

Its inputs are checked first (relaypipe/stages/inputs.py) and its five outputs are
published together (relaypipe/publish.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from relaypipe.bounds import TRAINING_RECORD
from relaypipe.evaluate.cost import CostModel, ModelCost, Price
from relaypipe.evaluate.report import (
    TRAINING_HEADLINE,
    build_metrics,
    headline_metrics,
    plot_points,
    render_markdown,
    render_png,
    training_number,
)
from relaypipe.publish import together
from relaypipe.schemas import EvalRequestSchema
from relaypipe.stages.common import stage_params
from relaypipe.stages.inputs import StageInputError, check_json, check_table

log = logging.getLogger(__name__)

# Where bootstrap, filter, warmup_data, sft and grpo record their metrics (and warnings).
# Which stage wrote a file is told by its name (bootstrap.json) or its folder (see _stage_name).
# sft's and grpo's are read from the model folders they wrote (the same metrics as
# data/{sft,grpo}/metrics.json): evaluate depends on those folders already, so the report's
# dependencies add no column to `dvc exp show`.
STAGE_METRICS = (
    "data/models/bootstrap.json",
    "data/filter/metrics.json",
    "data/warmup/metrics.json",
    "data/models/warmup/training.json",
    "data/models/relay/training.json",
)


@dataclass(frozen=True)
class Prices:
    """USD per million tokens, per model (input = prefill tokens, output = generated)."""

    student: Price = field(default_factory=Price)
    teacher: Price = field(default_factory=Price)


@dataclass(frozen=True)
class ReportParams:
    prices: Prices = field(default_factory=Prices)
    confidence: float = 0.95  # of the Wilson intervals
    requests: str = "data/eval/requests.parquet"
    models: str = "data/eval/models.json"
    # earlier stages' metrics: their ``warnings`` head report.md, sft's and grpo's relay
    # accuracy goes to metrics.json (a missing file is skipped)
    stage_metrics: list[str] = field(default_factory=lambda: list(STAGE_METRICS))
    out_dir: str = "data/eval"

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


def cost_models(models: dict, prices: Prices) -> dict[str, CostModel]:
    """Per mode, its student's and the teacher's size and price (models.json from evaluate)."""
    try:
        teacher = ModelCost(int(models["teacher"]["params"]), prices.teacher)
        return {
            mode: CostModel(
                student=ModelCost(int(models["students"][role]["params"]), prices.student),
                teacher=teacher,
            )
            for mode, role in models["modes"].items()
        }
    except KeyError as err:
        raise ValueError(f"models.json lacks {err}: re-run the evaluate stage") from err


_STAGE_BY_FOLDER = {"filter": "filter", "warmup": "warmup_data", "sft": "sft", "grpo": "grpo"}
_STAGE_BY_MODEL = {"warmup": "sft", "relay": "grpo"}


def _stage_name(path: str) -> str | None:
    """Which stage writes a stage-metrics file (by its name, as in STAGE_METRICS), if known."""
    p = Path(path)
    if p.name == "bootstrap.json":
        return "bootstrap"
    if p.name == TRAINING_RECORD:  # in the model folder sft or grpo wrote
        return _STAGE_BY_MODEL.get(p.parent.name)
    return _STAGE_BY_FOLDER.get(p.parent.name)


def _stage_of(path: str) -> str:
    """Which stage writes a stage-metrics file, in words."""
    stage = _stage_name(path)
    return f"the {stage} stage" if stage else "the stage that writes it"


def read_stage_metrics(paths: list[str]) -> tuple[list[str], dict[str, dict]]:
    """The ``warnings`` that earlier stages recorded (runs kept with ``allow_degenerate``) and
    their metrics by stage name (for metrics.json's training headline: sft's and grpo's must
    hold their number, see TRAINING_HEADLINE). A missing file is skipped (that stage has not
    run); a broken one fails, naming it."""
    warnings_out: list[str] = []
    by_stage: dict[str, dict] = {}
    needed = {stage: (key, path) for key, (stage, path) in TRAINING_HEADLINE.items()}
    for path in paths:
        if not Path(path).is_file():
            log.info("%s not found: no warnings from it", path)
            continue
        made_by = _stage_of(path)
        data = check_json(path, param="report.stage_metrics", made_by=made_by)
        warnings = data.get("warnings", [])
        if not isinstance(warnings, list):
            raise StageInputError(
                f"{path} (report.stage_metrics): 'warnings' must be a list of strings, got "
                f"{warnings!r}; it is written by {made_by}: re-run it"
            )
        warnings_out += [str(w) for w in warnings]
        stage = _stage_name(path)
        if stage is None:
            continue
        if stage in needed and training_number(data, needed[stage][1]) is None:
            raise StageInputError(
                f"{path} (report.stage_metrics): '{'.'.join(needed[stage][1])}' must be a "
                f"number (metrics.json's {needed[stage][0]}); it is written by {made_by}: "
                "re-run it"
            )
        by_stage[stage] = data
    return warnings_out, by_stage


CALIBRATION_KEYS = {
    "target_share": float,
    "tol": float,
    "bias": float,
    "share": float,
    "accuracy": float,
    "reached": bool,
    "n_problems": int,
}


def _is(value: object, kind: type) -> bool:
    """A JSON value of ``kind`` (an integer counts as a float; a boolean as nothing else)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def decoding_of(raw: dict, path: str) -> dict:
    """models.json's ``decoding`` (older ones have none: {}), its calibration checked."""
    decoding = raw.get("decoding") or {}
    calibration = decoding.get("calibration") if isinstance(decoding, dict) else None
    good = isinstance(decoding, dict) and (
        calibration is None
        or (
            isinstance(calibration, dict)
            and all(_is(calibration.get(k), t) for k, t in CALIBRATION_KEYS.items())
        )
    )
    if not good:
        raise StageInputError(
            f"{path} (report.models): 'decoding.calibration' must be null or a calibration "
            f"({', '.join(CALIBRATION_KEYS)}); it is written by the evaluate stage: re-run it"
        )
    return decoding


def read_inputs(
    params: ReportParams,
) -> tuple[pd.DataFrame, dict, list[str], dict, dict[str, dict]]:
    """Every input, checked: the eval table (not empty), models.json (its cost models and its
    ``decoding``: the relay call bias and calibration) and the earlier stages' metrics (their
    warnings, and each by stage name)."""
    requests = check_table(
        params.requests,
        EvalRequestSchema,
        param="report.requests",
        made_by="the evaluate stage",
        empty=(
            "the evaluate stage decoded no request (its evaluate.benchmarks, evaluate.modes "
            "and evaluate.limit select nothing); re-run evaluate"
        ),
    )
    raw = check_json(
        params.models,
        param="report.models",
        made_by="the evaluate stage",
        keys=("teacher", "students", "modes"),
    )
    try:
        models = cost_models(raw, params.prices)
    except (ValueError, TypeError) as err:
        raise StageInputError(
            f"{params.models} (report.models): {err}; it is written by the evaluate stage"
        ) from err
    unknown = sorted(set(requests["mode"]) - set(models))
    if unknown:
        raise StageInputError(
            f"{params.models} (report.models) has no model for mode(s) {', '.join(unknown)} of "
            f"{params.requests}: the two come from different evaluate runs; re-run evaluate"
        )
    decoding = decoding_of(raw, params.models)
    upstream, stages = read_stage_metrics(params.stage_metrics)
    return requests, models, upstream, decoding, stages


def run(params: ReportParams) -> dict:
    """Write the report; returns metrics.json's content (the headline)."""
    # Everything is read and computed before anything is written, and the five outputs land
    # together: a bad input or a failure anywhere leaves the previous report as it was.
    requests, models, upstream, decoding, stages = read_inputs(params)
    summary = build_metrics(requests, models, params.confidence, upstream, decoding)
    headline = headline_metrics(summary, stages)
    markdown = render_markdown(summary, "python -m relaypipe.stages.report")
    png = render_png(summary)
    out = Path(params.out_dir)
    with together() as pub:
        pub.json(out / "plots" / "tradeoff.json", plot_points(summary))
        pub.bytes(out / "tradeoff.png", png)
        pub.text(out / "report.md", markdown)
        pub.json(out / "summary.json", summary)
        pub.json(out / "metrics.json", headline)  # DVC's metric marks a finished report
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    return headline


def main(argv: list[str] | None = None) -> None:
    log.info("report: %s", run(stage_params("report", ReportParams, argv)))


if __name__ == "__main__":
    main()
