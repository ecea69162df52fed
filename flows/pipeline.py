"""The pipeline flow that deployments run: ``dvc pull`` -> ``dvc repro`` / ``dvc exp run`` -> push.

Run locally: ``python -m flows pipeline --set grpo.cost_weight=0.3`` (see ``python -m flows
pipeline -h``), or in Python ``pipeline(set_params=["grpo.cost_weight=0.3"])``. Deployed:
``prefect deploy --all`` (prefect.yaml) then ``prefect deployment run
relaypipe-pipeline/relaypipe-gpu --param 'set_params=["grpo.cost_weight=0.3"]'``; see
docs/orchestration.md.

Steps, each a Prefect task whose output lines stream into the run's logs:

1. check-out: the deployment's pull step (prefect.yaml ``git_clone``) has put the repository in
   the working directory; ``repo_dir`` points elsewhere when needed.
2. ``dvc pull --allow-missing`` from the repository's DVC remote: an empty remote (the first run
   anywhere) is not an error, the stages whose outputs are missing simply run.
3. ``dvc repro [targets]``, or ``dvc exp run -S ... [targets]`` when ``set_params`` is given
   (``grpo.cost_weight=0.3`` becomes ``-S ++overrides.grpo.cost_weight=0.3``; ``preset=name``
   picks a preset; ``dvc repro`` takes no overrides; an experiment also records them next to
   its metrics for ``dvc exp show``).
4. ``dvc push``, and ``dvc exp push <git_remote> <exp>`` for an experiment when the repository
   has that git remote, so ``dvc exp show`` / ``dvc exp pull`` elsewhere see it.

Only pull and push talk to the network, so only they retry. Results are never persisted by
Prefect: every task and the flow return small dicts, artifacts live in the DVC remote.
The stage commands that ``dvc`` runs (``python -m flows.stages <stage>``) report to the same
Prefect server as this flow (its ``PREFECT_API_URL`` is passed down, even a temporary one) and
are tagged ``pipeline-run:<this run's id>``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from flows.stages import PIPELINE_RUN_ENV

# Network I/O: three more tries, spaced out (a flaky S3 endpoint or a token refresh).
NETWORK_RETRIES = 3
NETWORK_RETRY_DELAYS = [10, 60, 180]

_RUNNING_STAGE = re.compile(r"^Running stage '([^']+)'")
_RAN_EXPERIMENT = re.compile(r"^Ran experiment\(s\): (\S+)")


class CommandFailed(RuntimeError):
    """A ``dvc``/``git`` command exited non-zero; the message carries its output's tail."""


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run ``cmd``, logging each output line as it comes; return all lines, raise on failure."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                logger.info("%s", line)
                lines.append(line)
                tail.append(line)
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise CommandFailed(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}")
    return lines


def tool_path() -> str:
    """PATH with this interpreter's directory first: dvc.yaml's ``python -m flows.stages`` and
    ``dvc`` itself must come from the environment this flow runs in (a worker's PATH may not
    have the virtual environment in it)."""
    bindir = str(Path(sys.executable).parent)
    return os.pathsep.join([bindir, os.environ.get("PATH", "")])


def dvc_exe() -> str:
    return shutil.which("dvc", path=tool_path()) or "dvc"


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def child_env(repo: Path) -> dict[str, str]:
    """The environment of the ``dvc`` commands: this run's Prefect server and a git identity."""
    env = dict(os.environ)
    env["PATH"] = tool_path()
    ctx = FlowRunContext.get()
    if ctx is not None:
        if ctx.flow_run is not None:
            env[PIPELINE_RUN_ENV] = str(ctx.flow_run.id)
        if ctx.client is not None and "PREFECT_API_URL" not in env:
            # Without a configured server this flow runs against a temporary one; the stage
            # processes reuse it instead of starting one each (tens of seconds apiece).
            env["PREFECT_API_URL"] = str(ctx.client.api_url).rstrip("/")
    if not _git(repo, "config", "user.email"):
        # `dvc exp run` commits the experiment; a fresh worker has no git identity.
        host = socket.gethostname() or "worker"
        for role in ("AUTHOR", "COMMITTER"):
            env.setdefault(f"GIT_{role}_NAME", "relaypipe pipeline")
            env.setdefault(f"GIT_{role}_EMAIL", f"relaypipe@{host}")
    return env


def dvc_remotes(repo: Path) -> list[str]:
    """Names of the DVC remotes configured for ``repo`` (any config level)."""
    out = subprocess.run(
        [dvc_exe(), "remote", "list"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _remote_args(remote: str | None) -> list[str]:
    return ["-r", remote] if remote else []


@task(
    name="dvc-pull",
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
    persist_result=False,
    cache_policy=NO_CACHE,
)
def dvc_pull(repo: Path, remote: str | None, targets: list[str]) -> dict[str, Any]:
    """Fetch what the remote has for the pipeline (or ``targets`` and their upstream)."""
    cmd = [dvc_exe(), "pull", "--allow-missing", *_remote_args(remote)]
    if targets:
        cmd += ["--with-deps", *targets]
    lines = run_logged(cmd, repo, child_env(repo))
    return {"lines": len(lines)}


def dvc_override(setting: str) -> str:
    """``stage.key=value`` -> ``++overrides.stage.key=value`` (params.yaml is a preset plus
    overrides; ``++`` adds the key or changes it). Anything else (``preset=name``,
    ``++overrides...``) goes to ``dvc exp run -S`` as it is."""
    from flows.stages import STAGES

    key = setting.split("=", 1)[0]
    if key.split(".")[0] in STAGES:
        return f"++overrides.{setting}"
    return setting


@task(name="dvc-run", persist_result=False, cache_policy=NO_CACHE)
def dvc_run(
    repo: Path,
    targets: list[str],
    set_params: list[str],
    experiment: bool,
    exp_name: str | None,
    force: bool,
) -> dict[str, Any]:
    """``dvc repro`` or ``dvc exp run``; returns the stages that ran and the experiment name."""
    if experiment:
        cmd = [dvc_exe(), "exp", "run"]
        if exp_name:
            cmd += ["--name", exp_name]
        for override in set_params:
            cmd += ["-S", dvc_override(override)]
    else:
        cmd = [dvc_exe(), "repro"]
    if force:
        cmd.append("--force")
    cmd += targets
    lines = run_logged(cmd, repo, child_env(repo))
    ran = [m.group(1) for line in lines if (m := _RUNNING_STAGE.match(line))]
    name = exp_name
    for line in lines:
        if m := _RAN_EXPERIMENT.match(line):
            name = m.group(1)
    return {"command": cmd, "ran": ran, "experiment": name if experiment else None}


@task(
    name="dvc-push",
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
    persist_result=False,
    cache_policy=NO_CACHE,
)
def dvc_push(repo: Path, remote: str | None, targets: list[str]) -> dict[str, Any]:
    """Upload this workspace's outputs (of ``targets`` and their upstream, if given)."""
    cmd = [dvc_exe(), "push", *_remote_args(remote)]
    if targets:
        cmd += ["--with-deps", *targets]
    lines = run_logged(cmd, repo, child_env(repo))
    return {"lines": len(lines)}


@task(
    name="dvc-exp-push",
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
    persist_result=False,
    cache_policy=NO_CACHE,
)
def dvc_exp_push(repo: Path, git_remote: str, exp_name: str) -> dict[str, Any]:
    """Push the experiment's git ref; its outputs went up with ``dvc push`` already."""
    run_logged(
        [dvc_exe(), "exp", "push", "--no-cache", git_remote, exp_name], repo, child_env(repo)
    )
    return {"git_remote": git_remote, "experiment": exp_name}


@flow(name="relaypipe-pipeline", log_prints=True, persist_result=False)
def pipeline(
    repo_dir: str = ".",
    targets: list[str] | None = None,
    set_params: list[str] | None = None,
    experiment: bool | None = None,
    exp_name: str | None = None,
    remote: str | None = None,
    git_remote: str = "origin",
    pull: bool = True,
    push: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Reproduce the DVC pipeline in ``repo_dir`` with its artifacts synced to the DVC remote.

    Args:
        repo_dir: the git + DVC repository (default: the working directory, where the
            deployment's pull step checked it out).
        targets: stages to reproduce with their upstream (default: the whole pipeline).
        set_params: ``"stage.key=value"`` each (an override of the preset, as ``dvc exp run -S
            ++overrides.stage.key=value``) or ``"preset=name"``.
        experiment: run ``dvc exp run`` (default: when ``set_params`` is given), else
            ``dvc repro``.
        exp_name: the experiment's name (default: DVC picks one).
        remote: the DVC remote (default: the repository's default remote).
        git_remote: where ``dvc exp push`` sends experiments, when the repository has it.
        pull: ``dvc pull`` first.
        push: ``dvc push`` (and ``dvc exp push``) after.
        force: reproduce even stages that are up to date.
    """
    targets = list(targets or [])
    set_params = list(set_params or [])
    if experiment is None:
        experiment = bool(set_params)
    bad = [p for p in set_params if "=" not in p]
    if bad:
        raise ValueError(f"set_params entries must look like section.key=value, got {bad}")
    if set_params and not experiment:
        raise ValueError("set_params needs experiment=True: `dvc repro` takes no overrides")
    repo = Path(repo_dir).resolve()
    if not (repo / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{repo}: no dvc.yaml (is the repository checked out here?)")

    logger = get_run_logger()
    remotes = dvc_remotes(repo)
    has_remote = bool(remote) or bool(remotes)
    if not has_remote:
        logger.warning("no DVC remote configured in %s: nothing is pulled or pushed", repo)

    pulled = pull and has_remote
    if pulled:
        dvc_pull(repo, remote, targets)
    result = dvc_run(repo, targets, set_params, experiment, exp_name, force)
    pushed = push and has_remote
    if pushed:
        dvc_push(repo, remote, targets)
    exp_pushed = False
    if pushed and experiment and result["experiment"]:
        if git_remote in _git(repo, "remote").split():
            dvc_exp_push(repo, git_remote, result["experiment"])
            exp_pushed = True
        else:
            logger.info("no git remote %r: %s stays local", git_remote, result["experiment"])
    summary = {
        "repo": str(repo),
        "rev": _git(repo, "rev-parse", "HEAD"),
        "command": " ".join(result["command"]),
        "ran": result["ran"],
        "experiment": result["experiment"],
        "pulled": pulled,
        "pushed": pushed,
        "exp_pushed": exp_pushed,
    }
    print(f"pipeline: {summary}")
    return summary
