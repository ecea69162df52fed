"""The Prefect stage flows and the pipeline flow, run for real against a Prefect test server.

One session server (``prefect_test_harness``, tests/prefect_fixtures.py) serves the in-process
flows and, through ``PREFECT_API_URL``, the stage processes that ``dvc`` starts. Every DVC
repository here is a throwaway one in tmp_path with shrunk params (tests/pipeline_helpers.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from flows.pipeline import NETWORK_RETRIES, dvc_exp_push, dvc_pull, dvc_push, pipeline
from flows.stages import FLOWS, STAGES, params_class, run_stage
from tests.flow_helpers import assert_quiet, flow_env, run
from tests.pipeline_helpers import ROOT, make_repo

pytest_plugins = ["tests.prefect_fixtures"]

TINY_PREPARE = {
    "seed": 0,
    "difficulty": 1,
    "terms": 6,
    "n_train": 40,
    "n_eval": 8,
    "benchmarks": [{"name": "arith-d1t4", "difficulty": 1, "terms": 4, "n": 5}],
}


def tiny_params(tmp_path: Path, name: str = "params.yaml", **changes: object) -> Path:
    """A params file with only a ``prepare`` section, writing under tmp_path/<stem>/."""
    section = {**TINY_PREPARE, "out_dir": str(tmp_path / Path(name).stem / "problems"), **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"prepare": section}))
    return path


def read_problems(out_dir: Path) -> dict[str, pd.DataFrame]:
    names = ["train.parquet", "eval.parquet", "benchmarks/arith-d1t4.parquet"]
    return {name: pd.read_parquet(out_dir / name) for name in names}


def test_every_dvc_stage_runs_through_its_flow():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # configure first, then one registry line per stage, in pipeline order
    assert list(stages) == ["configure", *STAGES]
    for name in STAGES:
        config = f"data/config/{name}.yaml"
        assert stages[name]["cmd"] == f"python -m flows.stages {name} --params {config}"
        assert config in stages[name]["deps"]
        assert dataclasses.is_dataclass(params_class(name))
    # Retries only where the network is: pull/push, never a stage's compute.
    assert all(f.retries == 0 for f in FLOWS.values())
    assert all(t.retries == NETWORK_RETRIES for t in (dvc_pull, dvc_push, dvc_exp_push))
    assert all(f.persist_result is False for f in FLOWS.values())


def test_prepare_flow_runs_for_real(prefect_api_url, tmp_path):
    params = tiny_params(tmp_path)
    state = FLOWS["prepare"](params_path=str(params), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary == {"n_train": 40, "n_eval": 8, "benchmark/arith-d1t4": 5}
    tables = read_problems(tmp_path / "params" / "problems")
    assert [len(t) for t in tables.values()] == [40, 8, 5]
    assert not set(tables["train.parquet"].question) & set(tables["eval.parquet"].question)
    with get_client(sync_client=True) as client:
        run_record = client.read_flow_run(state.state_details.flow_run_id)
        assert run_record.state.is_completed()
        assert run_record.parameters == {"params_path": str(params)}
        assert client.read_flow(run_record.flow_id).name == "relaypipe-prepare"


def test_plain_function_matches_the_stage_module(tmp_path):
    """``.fn`` is the stage without Prefect; its tables equal ``python -m relaypipe.stages``."""
    summary = FLOWS["prepare"].fn(params_path=str(tiny_params(tmp_path, "a.yaml")))
    assert summary["n_train"] == 40
    assert run_stage("prepare", str(tiny_params(tmp_path, "b.yaml"))) == summary
    from relaypipe.stages import prepare

    prepare.main(["--params", str(tiny_params(tmp_path, "c.yaml"))])
    a, c = read_problems(tmp_path / "a" / "problems"), read_problems(tmp_path / "c" / "problems")
    for name in a:
        pd.testing.assert_frame_equal(a[name], c[name])


def test_stage_cli_is_quiet_and_fails_cleanly(prefect_api_url, tmp_path):
    env = flow_env(prefect_api_url)
    ok = run(
        sys.executable,
        "-m",
        "flows.stages",
        "prepare",
        "--params",
        tiny_params(tmp_path),
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert_quiet(ok.stdout + ok.stderr)
    assert "prepare: {'n_train': 40" in ok.stderr  # the summary is in the run's logs
    assert "Finished in state Completed()" in ok.stderr

    bad = tiny_params(tmp_path, "bad.yaml", n_trian=3)
    failed = run(
        sys.executable,
        "-m",
        "flows.stages",
        "prepare",
        "--params",
        bad,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert failed.returncode == 2  # bad input (relaypipe.errors.EXIT_INPUT)
    assert "prepare: unknown key(s) n_trian" in failed.stderr
    # Bad input is its message, no traceback (tests/test_cli_errors.py has the other cases).
    assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_stage_cli_without_a_server_starts_a_quiet_temporary_one(tmp_path):
    """What a user who configured nothing gets from ``dvc repro``: a temporary local server,
    first start on a new database included, and no tracebacks or SQLite lock errors."""
    env = flow_env(None, PREFECT_HOME=str(tmp_path / "prefect-home"))
    started = time.monotonic()
    proc = run(
        sys.executable,
        "-m",
        "flows.stages",
        "prepare",
        "--params",
        tiny_params(tmp_path),
        cwd=ROOT,
        env=env,
        timeout=400,
    )
    output = proc.stdout + proc.stderr
    assert "Starting temporary server" in output
    assert "Finished in state Completed()" in output
    assert_quiet(output)
    assert (tmp_path / "params" / "problems" / "train.parquet").is_file()
    print(f"stage with a temporary server: {time.monotonic() - started:.1f} s")


@pytest.fixture
def prepare_repo(tmp_path) -> Path:
    """A git + DVC repo of the project with shrunk params (only ``prepare`` is run here)."""
    return make_repo(tmp_path / "repo")


def test_dvc_exp_run_sets_a_param_and_exp_show_reports_it(prefect_api_url, prepare_repo):
    env = flow_env(prefect_api_url)
    out = run(
        "dvc",
        "exp",
        "run",
        "-S",
        "overrides.prepare.n_eval=30",
        "-n",
        "eval30",
        "prepare",
        cwd=prepare_repo,
        env=env,
        timeout=300,
    )
    assert "Running stage 'prepare'" in out.stdout
    assert len(pd.read_parquet(prepare_repo / "data/problems/eval.parquet")) == 30
    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=prepare_repo, env=env).stdout)
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    (exp,) = [e for e in exps if e["name"] == "eval30"]
    revs = exp["revs"][0]["data"]
    assert revs["params"]["params.yaml"]["data"]["overrides"]["prepare"]["n_eval"] == 30
    assert "metrics" in revs  # exp show puts params and metrics side by side


def test_pipeline_flow_repro_then_experiment_with_remotes(prefect_api_url, prepare_repo, tmp_path):
    """pull (empty remote) -> repro -> push; then an experiment, pushed to a git remote."""
    env = flow_env(prefect_api_url)
    origin = tmp_path / "origin.git"
    run("git", "clone", "-q", "--bare", prepare_repo, origin, cwd=tmp_path, env=env)
    run("git", "remote", "add", "origin", origin, cwd=prepare_repo, env=env)
    storage = tmp_path / "dvc-storage"
    run("dvc", "remote", "add", "-d", "store", storage, cwd=prepare_repo, env=env)
    run("git", "commit", "-qam", "remote", cwd=prepare_repo, env=env)

    first = pipeline(repo_dir=str(prepare_repo), targets=["prepare"])
    assert first["ran"] == ["configure", "prepare"] and first["experiment"] is None
    assert first["pulled"] and first["pushed"] and not first["exp_pushed"]
    assert any(storage.rglob("*")), "dvc push wrote nothing to the remote"

    state = pipeline(
        repo_dir=str(prepare_repo),
        targets=["prepare"],
        set_params=["prepare.n_train=50"],
        exp_name="train50",
        return_state=True,
    )
    assert state.is_completed(), state.message
    second = state.result()
    assert second["ran"] == ["configure", "prepare"] and second["experiment"] == "train50"
    assert second["exp_pushed"]
    assert len(pd.read_parquet(prepare_repo / "data/problems/train.parquet")) == 50
    refs = run("git", "ls-remote", origin, "refs/exps/*", cwd=tmp_path, env=env).stdout
    assert "train50" in refs

    # The stage process reported to this session's server, tagged with its pipeline run.
    tag = f"pipeline-run:{state.state_details.flow_run_id}"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
    assert [r.state.is_completed() for r in runs] == [True]


def test_set_params_need_an_experiment(tmp_path):
    with pytest.raises(ValueError, match="dvc repro"):
        pipeline.fn(repo_dir=str(tmp_path), set_params=["a.b=1"], experiment=False)
    with pytest.raises(ValueError, match=r"section\.key=value"):
        pipeline.fn(repo_dir=str(tmp_path), set_params=["a.b"])
    assert subprocess.run(
        [sys.executable, "-m", "flows", "stages"], capture_output=True, text=True, cwd=ROOT
    ).stdout.splitlines()[0] == ("prepare\trelaypipe.stages.prepare")


def test_flows_repro_passes_dvc_options_through(monkeypatch):
    """``python -m flows repro -f prepare`` runs ``dvc repro -f prepare`` (options first too)."""
    import flows.__main__ as cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "with_server", lambda cmd: calls.append(cmd[1:]) or 0)
    monkeypatch.setattr(cli, "dvc_up_to_date", lambda: True)
    for argv in (["repro", "-f"], ["repro", "-f", "prepare"], ["repro", "prepare", "-s"]):
        assert cli.main(argv) == 0
    assert cli.main(["repro"]) == 0  # up to date: no dvc, no server
    assert calls == [["repro", "-f"], ["repro", "-f", "prepare"], ["repro", "prepare", "-s"]]
    with pytest.raises(SystemExit):
        cli.main(["stages", "--bogus"])


def test_flows_exec_finds_this_environments_tools(monkeypatch, capsys):
    """``exec`` resolves the command on PATH with this interpreter's directory first (``dvc``
    from .venv without activating it); an unknown command is one line, no server, no traceback."""
    import flows.__main__ as cli

    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(["exec", "--", "no-such-command-relaypipe"]) == 127
    assert "command not found: no-such-command-relaypipe" in capsys.readouterr().err
    assert cli.dvc_exe() == str(Path(sys.executable).parent / "dvc")
