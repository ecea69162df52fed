"""The pipeline deployment for real: prefect.yaml -> ``prefect deploy`` -> a process worker.

Everything a GPU machine does, on loopback and in tmp_path: ``prefect server start`` with its own
database (flows/server.py), ``prefect work-pool create gpu --type process``, the project's own
prefect.yaml deployed with ``prefect deploy --all`` (its ``git_clone`` pull step reads the
repository URL from ``RELAYPIPE_GIT_URL``, here a ``file://`` URL of a bare repository, so the
clone is the same shallow ``git clone --depth 1`` a worker makes from GitHub), ``prefect worker
start --pool gpu`` as a subprocess, and ``prefect deployment run ... --param`` with a parameter
override. The run is checked where its results must end up once the worker's temporary
directory is gone: the experiment's git ref in the origin repository and its outputs in the DVC
remote (a local directory, same code path as S3 minus the network; tests/test_remote_s3.py
covers S3).

Only ``prepare`` runs (``targets=["prepare"]``), so the test costs the orchestration, not
training. Server and worker are process groups that are always stopped at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from flows.server import LocalServer, local_server, stop_process_group
from tests.flow_helpers import flow_env, run
from tests.pipeline_helpers import ROOT, make_repo

POOL = "gpu"  # the work pool prefect.yaml names
DEPLOYMENT = "relaypipe-pipeline/relaypipe-gpu"
EXP_NAME = "deployed-train60"
N_TRAIN = 60  # SMALL_PARAMS has 300: the override must show in the experiment's outputs


def prefect_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LocalServer]:
    """``prefect server start`` on 127.0.0.1 with a new database, stopped after the module."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    with local_server(home=home, log_path=home / "server.log") as srv:
        yield srv


@pytest.fixture
def origin(tmp_path) -> tuple[Path, Path, Path]:
    """(work repo, bare origin, DVC remote dir): the project with small params, prefect.yaml and
    a DVC remote in its committed config, pushed to a bare repository that workers clone."""
    repo = make_repo(tmp_path / "repo")
    shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
    storage = tmp_path / "dvc-storage"
    env = flow_env(None)
    run("dvc", "remote", "add", "-d", "store", storage, cwd=repo, env=env)
    run("git", "add", "prefect.yaml", ".dvc/config", cwd=repo, env=env)
    run("git", "commit", "-qm", "deployment and DVC remote", cwd=repo, env=env)
    bare = tmp_path / "origin.git"
    run("git", "clone", "-q", "--bare", repo, bare, cwd=tmp_path, env=env)
    return repo, bare, storage


@pytest.fixture
def cli_env(server, tmp_path) -> dict[str, str]:
    """Environment of the prefect CLI and the worker: this server, a throwaway PREFECT_HOME."""
    return flow_env(
        server.api_url,
        PREFECT_HOME=str(tmp_path / "prefect-client-home"),
        # Poll for scheduled runs every second instead of every 10 s.
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
    )


@pytest.fixture
def worker(cli_env, origin, tmp_path) -> Iterator[Path]:
    """``prefect worker start --pool gpu`` (a process group, always stopped); yields its log."""
    _, bare, _ = origin
    run(*prefect_cli("work-pool", "create", POOL, "--type", "process"), cwd=tmp_path, env=cli_env)
    log_path = tmp_path / "worker.log"
    # The worker's environment is the flow runs' environment: the git URL of the pull step is
    # resolved there at run time.
    env = {**cli_env, "RELAYPIPE_GIT_URL": bare.as_uri()}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            prefect_cli("worker", "start", "--pool", POOL, "--name", "test-gpu-worker"),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield log_path
    finally:
        stop_process_group(proc)


def api(server: LocalServer, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.request(method, f"{server.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def flow_run_logs(server: LocalServer, flow_run_id: str) -> list[str]:
    logs = api(
        server,
        "POST",
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    return [entry["message"] for entry in logs]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_from_prefect_yaml_runs_on_a_process_worker(
    server, origin, cli_env, worker, tmp_path
):
    repo, bare, storage = origin

    # prefect deploy, as a user runs it: from the checkout, non-interactive. The git URL is
    # NOT in the deploy environment: the pull step keeps its template for the worker.
    deploy_env = {k: v for k, v in cli_env.items() if k != "RELAYPIPE_GIT_URL"}
    run(*prefect_cli("deploy", "--all", "--no-prompt"), cwd=repo, env=deploy_env, timeout=300)
    flow_name, deployment_name = DEPLOYMENT.split("/")
    deployment = api(server, "GET", f"/deployments/name/{flow_name}/{deployment_name}")
    assert deployment["work_pool_name"] == POOL
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["parameters"] == {"pull": True, "push": True}
    clone_step = deployment["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    assert clone_step["repository"] == "{{ $RELAYPIPE_GIT_URL }}"
    assert deployment["job_variables"]["env"]["TOKENIZERS_PARALLELISM"] == "false"

    started = run(
        *prefect_cli(
            "deployment",
            "run",
            DEPLOYMENT,
            "--param",
            'targets=["prepare"]',
            "--param",
            f'set_params=["prepare.n_train={N_TRAIN}"]',
            "--param",
            f"exp_name={EXP_NAME}",
            "--watch",
            "--watch-timeout",
            "600",
        ),
        cwd=tmp_path,
        env=cli_env,
        timeout=660,
        check=False,
    )
    output = started.stdout + started.stderr
    flow_run_id = next(
        line.split("UUID:")[1].strip() for line in output.splitlines() if "UUID:" in line
    )
    logs = flow_run_logs(server, flow_run_id)
    assert started.returncode == 0, (
        f"deployment run failed:\n{output[-3000:]}\nflow run logs:\n"
        + "\n".join(logs[-60:])
        + f"\nworker log:\n{worker.read_text(errors='replace')[-3000:]}"
    )
    flow_run = api(server, "GET", f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"]["set_params"] == [f"prepare.n_train={N_TRAIN}"]
    text = "\n".join(logs)
    assert any(line.startswith("$ ") and " pull --allow-missing" in line for line in logs)
    assert "Running stage 'prepare'" in text
    assert f"Ran experiment(s): {EXP_NAME}" in text
    (summary,) = [line for line in logs if line.startswith("pipeline: ")]
    assert "'pushed': True" in summary and "'exp_pushed': True" in summary
    assert str(repo) not in summary  # it ran in the worker's clone, not in the work repo

    # The stage ran as its own flow run on the same server, tagged with the pipeline run.
    stage_runs = api(
        server,
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"tags": {"all_": [f"pipeline-run:{flow_run_id}"]}}},
    )
    assert [r["state"]["type"] for r in stage_runs] == ["COMPLETED"]

    # The worker's checkout is gone; the experiment lives on in origin (dvc exp push) ...
    refs = run("git", "ls-remote", bare, "refs/exps/*", cwd=tmp_path, env=cli_env).stdout
    (exp_ref,) = [line.split()[1] for line in refs.splitlines() if line.endswith(EXP_NAME)]
    params = yaml.safe_load(
        run("git", "show", f"{exp_ref}:params.yaml", cwd=bare, env=cli_env).stdout
    )
    assert params["overrides"]["prepare"]["n_train"] == N_TRAIN  # set_params -> ++overrides
    lock = yaml.safe_load(run("git", "show", f"{exp_ref}:dvc.lock", cwd=bare, env=cli_env).stdout)
    outs = {o["path"]: o["md5"] for o in lock["stages"]["prepare"]["outs"]}

    # ... and its outputs in the DVC remote (dvc push), with the override applied.
    md5 = outs["data/problems/train.parquet"]
    pushed = storage / "files" / "md5" / md5[:2] / md5[2:]
    assert pushed.is_file(), f"{pushed} not in the DVC remote"
    assert len(pd.read_parquet(pushed)) == N_TRAIN
    # The work repo itself was never touched: the worker cloned from origin.
    assert not (repo / "data" / "problems" / "train.parquet").exists()
