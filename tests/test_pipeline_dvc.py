"""A real ``dvc repro`` of the pipeline in a temporary git repository, with shrunk params."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml

from relaypipe import presets
from tests.pipeline_helpers import make_repo, sh

pytestmark = pytest.mark.slow


REPRO_LOG: list[str] = []  # what the first `dvc repro` printed


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = make_repo(tmp_path_factory.mktemp("pipeline"))
    proc = sh("dvc", "repro", cwd=path)
    REPRO_LOG.append(proc.stdout + proc.stderr)
    return path


def test_stage_logs_carry_no_bytecode(repo):
    """dill disassembles functions for datasets' fingerprints into a captured stdout; with
    Prefect's log_prints that bytecode went to the run's logs."""
    (log,) = REPRO_LOG
    assert "Running stage 'sft'" in log and "Running stage 'grpo'" in log
    assert not re.search(r"\b(LOAD_GLOBAL|LOAD_FAST|RESUME)\b", log)


def test_repro_writes_every_artifact(repo):
    train = pd.read_parquet(repo / "data/problems/train.parquet")
    evaluation = pd.read_parquet(repo / "data/problems/eval.parquet")
    assert len(train) == 300 and len(evaluation) == 24
    assert not set(train.question) & set(evaluation.question)
    for role in ("student", "teacher"):
        assert (repo / f"data/models/{role}/model.safetensors").is_file()
        assert (repo / f"data/models/{role}/tokenizer.json").is_file()
    metrics = json.loads((repo / "data/models/bootstrap.json").read_text())
    assert metrics["n_eval"] == 24
    assert 0.0 <= metrics["student_accuracy"] <= 1.0 and 0.0 <= metrics["teacher_accuracy"] <= 1.0
    assert metrics["teacher_params"] > metrics["student_params"]
    for stage in ("filter", "warmup", "sft", "grpo"):
        assert json.loads((repo / f"data/{stage}/metrics.json").read_text())
    for stage, model in (("sft", "warmup"), ("grpo", "relay")):  # the model carries them too
        assert (repo / f"data/models/{model}/training.json").read_bytes() == (
            repo / f"data/{stage}/metrics.json"
        ).read_bytes()
    assert (repo / "data/models/relay/model.safetensors").is_file()
    assert (repo / "data/grpo/live/metrics.json").is_file()  # DVCLive summary
    assert not (repo / "data/checkpoints/grpo").exists()  # removed after a finished run
    for name in ("arith-d1t6", "arith-d1t8"):
        bench = pd.read_parquet(repo / f"data/problems/benchmarks/{name}.parquet")
        assert len(bench) == 6 and set(bench.split) == {"benchmark"}
        assert not set(bench.question) & set(train.question)
    requests = pd.read_parquet(repo / "data/eval/requests.parquet")
    # 2 benchmarks x 6 problems x (5 modes + 2 router p + 2 relay biases + 2 oracle thresholds)
    assert len(requests) == 2 * 6 * 11
    assert set(requests[requests["mode"] == "relay_sweep"]["call_bias"]) == {-2.0, 2.0}
    assert set(requests[requests["mode"] == "oracle"]["oracle_tau"]) == {0.01, 0.5}
    report = json.loads((repo / "data/eval/summary.json").read_text())
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
    for mode in modes[:-1]:  # the matched router may be null (off its curve): see notes
        assert set(keys) <= set(report["modes"][mode])
        for name in ("arith-d1t6", "arith-d1t8"):
            assert set(keys) <= set(report["benchmarks"][name][mode])
    assert "random_router" in report["modes"] or "modes.random_router" in report["notes"]
    for key in (
        "gap_recovered",
        "cost_reduction_vs_matched_router",
        "cost_reduction_vs_matched_router_flops",
    ):
        assert key in report and (report[key] is not None or key in report["notes"])
    for panel in ("average", "arith-d1t6", "arith-d1t8"):
        assert [p["oracle_tau"] for p in report["oracle_curve"][panel]][-1] in (0.01, 0.5)
        assert panel in report["relay_vs_oracle"]
    head = json.loads((repo / "data/eval/metrics.json").read_text())  # the DVC metrics
    assert set(head["gap_recovered_by_benchmark"]) == {"arith-d1t6", "arith-d1t8"}
    assert "relay_vs_oracle" in head
    assert head["gap_recovered"] == report["gap_recovered"]
    assert isinstance(head["warnings"], int) and head["warnings"] >= 1  # allow_degenerate runs
    assert len(flat_leaves(head)) <= 13  # 2 benchmarks, the oracle, no calibration
    assert (repo / "data/eval/report.md").read_text().startswith("# Evaluation report")
    assert (repo / "data/eval/tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = sh("dvc", "metrics", "show", "--json", cwd=repo).stdout
    assert "relay_accuracy" in shown and "teacher_share" in shown  # (nulls are left out)
    assert json.loads((repo / "data/eval/plots/tradeoff.json").read_text())


def test_committed_run_shows_its_metrics_in_exp_show(repo):
    """Metrics are DVC-cached outputs (git ignores data/), so a commit's row is filled in."""
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "first run", cwd=repo)
    rows = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    (baseline,) = [row for row in rows if row["rev"] != "workspace"]
    metrics = baseline["data"]["metrics"]
    assert list(metrics) == ["data/eval/metrics.json"]  # the headline only
    evaluated = metrics["data/eval/metrics.json"]["data"]
    assert 0.0 <= evaluated["relay_accuracy"] <= 1.0  # (exp show drops null values)
    assert 0.0 <= evaluated["teacher_share"] <= 1.0
    assert evaluated["teacher_accuracy"] >= 0.0
    params = baseline["data"]["params"]["params.yaml"]["data"]
    assert params["preset"] == "micro"  # params and metrics side by side
    assert params["overrides"]["grpo"]["allow_degenerate"] is True


# docs/orchestration.md's recipe for comparing runs in a terminal
HEADLINE = r"^(relay_accuracy|teacher_share|gap_recovered)$"


def flat_leaves(d: dict, prefix: str = "") -> list[str]:
    """Dotted leaf keys, as DVC flattens metrics and params into columns."""
    out = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out += flat_leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def exp_show_header(repo, *args: str) -> list[str]:
    """The columns of `dvc exp show`'s table (its markdown form; no pager, no width limit)."""
    table = sh("dvc", "exp", "show", "--md", *args, cwd=repo).stdout.splitlines()
    return [cell.strip() for cell in table[0].strip().strip("|").split("|")]


def test_plain_exp_show_fits_40_columns(repo):
    """`dvc exp show` with no options, after a run: the preset, the headline and one column
    per dependency path (configure's deps, the config files, the data stages pass along)."""
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "a run", "--allow-empty", cwd=repo)
    header = exp_show_header(repo)
    assert header[:2] == ["Experiment", "Created"]
    assert "preset" in header and "relay_accuracy" in header and "teacher_share" in header
    head = json.loads((repo / "data/eval/metrics.json").read_text())
    if head["gap_recovered"] is not None:  # DVC leaves null metrics out (no gap here: none)
        assert "gap_recovered" in header
    assert "overrides.grpo.allow_degenerate" in header  # what this run changed is visible
    # The count for the micro preset (3 benchmarks, no overrides) is this one minus the
    # overrides this test repo sets plus the one benchmark more.
    overrides = [c for c in header if c.startswith("overrides.")]
    assert len(header) - len(overrides) + 1 <= 40, header


def test_headline_recipe_fits_a_terminal(repo):
    args = ["--only-changed", "--drop", "^(relaypipe|flows|data|presets)(/|$)", "--keep", HEADLINE]
    header = exp_show_header(repo, *args)
    assert "relay_accuracy" in header
    assert not any(c.startswith(("data/", "relaypipe", "flows")) for c in header)
    assert len(header) <= 40, header


def test_plots_render_offline(repo):
    """dvc plots show: the trade-off image and the training curves, with no script fetched."""
    if not (repo / ".dvc/plots/offline.html").is_file():
        pytest.skip(
            "no .dvc/plots/offline.html: make setup builds it with npm (python -m flows.plots)"
        )
    sh("dvc", "plots", "show", cwd=repo)
    page = (repo / "dvc_plots/index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page), "a script is loaded from elsewhere"
    assert "cdn." not in page and "vega-embed@6.18.2" in page
    assert 'src="static/workspace_data_eval_tradeoff.png"' in page
    assert (repo / "dvc_plots/static/workspace_data_eval_tradeoff.png").is_file()
    for stage in ("sft", "grpo"):  # every training curve DVCLive wrote is drawn
        curves = sorted((repo / f"data/{stage}/live/plots/metrics").rglob("*.tsv"))
        assert curves, f"{stage} wrote no training curve"
        for curve in curves:
            assert str(curve.relative_to(repo)) in page
    assert "dvc_plots/" not in sh("git", "status", "--porcelain", cwd=repo).stdout


def test_second_repro_does_nothing_and_a_param_change_reruns_only_its_stage(repo):
    again = sh("dvc", "repro", cwd=repo)
    assert "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["overrides"]["grpo"]["reward"] = "accuracy"  # a GRPO knob re-runs GRPO only
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    changed = sh("dvc", "repro", cwd=repo)
    ran = [line for line in changed.stdout.splitlines() if line.startswith("Running stage")]
    # configure first (params changed; only grpo's config file with them), then grpo, and what
    # reads its model if the model changed (evaluate, then report).
    assert ran[:2] == ["Running stage 'configure':", "Running stage 'grpo':"]
    assert ran[2:] in ([], ["Running stage 'evaluate':", "Running stage 'report':"])
    assert sh("dvc", "status", cwd=repo).stdout.strip() in (
        "",
        "Data and pipelines are up to date.",
    )


def test_stage_refuses_a_table_that_violates_its_schema(repo, tmp_path):
    bad = pd.read_parquet(repo / "data/problems/train.parquet")
    bad.loc[3, "difficulty"] = -1
    problems = tmp_path / "problems"
    problems.mkdir()
    bad.to_parquet(problems / "train.parquet")
    pd.read_parquet(repo / "data/problems/eval.parquet").to_parquet(problems / "eval.parquet")
    params = presets.resolve(repo / "params.yaml")  # one section per stage
    params["bootstrap"]["problems_dir"] = str(problems)
    params["bootstrap"]["out_dir"] = str(tmp_path / "models")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh(
        "python",
        "-m",
        "relaypipe.stages.bootstrap",
        "--params",
        str(tmp_path / "params.yaml"),
        cwd=repo,
        check=False,
    )
    assert proc.returncode != 0
    assert "train.parquet" in proc.stderr and "difficulty" in proc.stderr and "row 3" in proc.stderr
    assert not (tmp_path / "models").exists()


def test_malformed_params_fail_with_the_key_named(repo, tmp_path):
    params = presets.resolve(repo / "params.yaml")
    params["bootstrap"]["teacher_train"]["stepz"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh(
        "python",
        "-m",
        "relaypipe.stages.bootstrap",
        "--params",
        str(tmp_path / "params.yaml"),
        cwd=repo,
        check=False,
    )
    assert proc.returncode != 0
    assert "bootstrap.teacher_train: unknown key(s) stepz" in proc.stderr
