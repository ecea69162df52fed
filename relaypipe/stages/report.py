"""Stage ``report``: accuracy, honest cost and the matched-router headline, from the eval table.

Run: ``python -m relaypipe.stages.report`` (reads ``params.yaml:report``) or
``dvc repro report``; ``dvc metrics show`` and ``dvc plots show`` read what it writes.
Reads ``data/eval/requests.parquet`` (EvalRequestSchema) and ``data/eval/models.json`` (from
``evaluate``). Writes, all under ``data/eval/``:

* ``metrics.json``: ``modes.<mode>.<metric>`` (macro average over benchmarks),
  ``benchmarks.<name>.<mode>.<metric>``, ``gap_recovered``, ``cost_reduction_vs_matched_router``
  (teacher-token share, the paper's measure), ``cost_reduction_vs_matched_router_flops``, with
  95 % Wilson intervals for every accuracy, ``notes`` saying why any number is null
  (nothing to compare: no matched router, a relay that never called, no gap) and ``warnings``
  (those the earlier stages recorded in ``stage_metrics``, plus the report's own; they head
  report.md) (relaypipe/evaluate/report.py has the full shape);
* ``plots/tradeoff.json``: accuracy against call ratio for every mode and router p (DVC plot);
* ``tradeoff.png``: the same drawn with matplotlib, per benchmark and averaged;
* ``report.md``: the paper-shaped table (rows: modes; columns: benchmarks + average; call % in
  parentheses), the headline, a per-mode cost table and the router sweep.

Departures from the paper: cost counts teacher prefill (with and without prefix caching),
FLOPs, money and latency besides the generated-token share; the matched router is interpolated
without extrapolation (null + reason outside the sweep), see relaypipe/evaluate/cost.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from relaypipe.evaluate.cost import CostModel, ModelCost, Price
from relaypipe.evaluate.report import build_metrics, plot_points, render_markdown, render_png
from relaypipe.io import atomic_path, read_json, read_table, write_json
from relaypipe.schemas import EvalRequestSchema
from relaypipe.stages.common import stage_params

log = logging.getLogger(__name__)

# Where bootstrap, warmup_data, sft and grpo record their metrics (and warnings).
STAGE_METRICS = (
    "data/models/bootstrap.json",
    "data/warmup/metrics.json",
    "data/sft/metrics.json",
    "data/grpo/metrics.json",
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
    # earlier stages' metrics: their ``warnings`` head report.md (a missing file is skipped)
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


def stage_warnings(paths: list[str]) -> list[str]:
    """The ``warnings`` that earlier stages recorded: runs kept with ``allow_degenerate``."""
    out: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            log.info("%s not found: no warnings from it", path)
            continue
        warnings = read_json(path).get("warnings", [])
        if not isinstance(warnings, list):
            raise ValueError(f"{path}: 'warnings' must be a list of strings, got {warnings!r}")
        out += [str(w) for w in warnings]
    return out


def run(params: ReportParams) -> dict:
    # Everything is computed before anything is written: a bad input leaves no partial report.
    requests = read_table(params.requests, EvalRequestSchema)
    models = cost_models(read_json(params.models), params.prices)
    upstream = stage_warnings(params.stage_metrics)
    metrics = build_metrics(requests, models, params.confidence, upstream)
    markdown = render_markdown(metrics, "python -m relaypipe.stages.report")
    png = render_png(metrics)
    out = Path(params.out_dir)
    write_json(out / "plots" / "tradeoff.json", plot_points(metrics))
    with atomic_path(out / "tradeoff.png") as tmp:
        tmp.write_bytes(png)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    write_json(out / "metrics.json", metrics)  # last: DVC's metric marks a finished report
    headline = {
        k: metrics[k]
        for k in (
            "gap_recovered",
            "cost_reduction_vs_matched_router",
            "cost_reduction_vs_matched_router_flops",
        )
    }
    headline["accuracy"] = {m: v["accuracy"] for m, v in metrics["modes"].items()}
    headline["warnings"] = metrics["warnings"]
    for warning in metrics["warnings"]:
        log.warning("%s", warning)
    return headline


def main(argv: list[str] | None = None) -> None:
    log.info("report: %s", run(stage_params("report", ReportParams, argv)))


if __name__ == "__main__":
    main()
