"""Helpers of the orchestration tests: environments for flow processes, bounded commands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.pipeline_helpers import tool_env


def flow_env(api_url: str | None, **extra: str) -> dict[str, str]:
    """tool_env() whose Prefect server is ``api_url`` (None: no server configured at all)."""
    env = tool_env()
    env.pop("PREFECT_API_URL", None)
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def run(
    *cmd: str | os.PathLike[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a time limit; on failure the error shows the output's tail."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({proc.returncode})\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


# Things a clean run must never print (the noise this integration set out to remove).
NOISE = ("Traceback", "database is locked", "| ERROR", "Failed to send telemetry")


def assert_quiet(output: str) -> None:
    found = [marker for marker in NOISE if marker in output]
    assert not found, f"noise {found} in output:\n{output[-4000:]}"
