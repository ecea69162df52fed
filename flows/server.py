"""A Prefect server on loopback for the lifetime of a ``with`` block.

Used by ``python -m flows repro`` (one server for a whole ``dvc repro`` instead of a temporary
one per stage) and by the tests (a real server for deployments and workers). The server is
``prefect server start --host 127.0.0.1`` in its own process group, with its output in a log
file, and it is always stopped (SIGTERM, then SIGKILL) when the block exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows import apply_prefect_defaults

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` (a ``/health`` endpoint) until it answers 200; fail fast if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the group ``proc`` leads (started with ``start_new_session``), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:  # it exited between poll() and killpg()
        pass


@dataclass(frozen=True)
class LocalServer:
    api_url: str  # what PREFECT_API_URL must be set to
    ui_url: str
    log_path: Path
    pid: int


@contextmanager
def local_server(
    *,
    port: int | None = None,
    home: str | os.PathLike[str] | None = None,
    startup_timeout: float = 300.0,
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[LocalServer]:
    """Run ``prefect server start`` on 127.0.0.1 (a free port by default) inside the block.

    ``home`` sets ``PREFECT_HOME`` (its SQLite database) for the server; by default it is the
    user's, so runs stay visible to a later ``prefect server start``. The first start on a new
    database migrates it, which takes tens of seconds on a small machine, hence the timeout.
    """
    port = port or free_port()
    env = dict(os.environ)
    apply_prefect_defaults(env)
    env.pop("PREFECT_API_URL", None)  # a server does not talk to another one
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    own_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"prefect-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_file = Path(log_path)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://{HOST}:{port}"
    try:
        try:
            wait_for_health(f"{address}/api/health", startup_timeout, proc)
        except (RuntimeError, TimeoutError) as err:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Prefect server did not start: {err}\n{log_file}:\n{tail}") from err
        yield LocalServer(f"{address}/api", address, log_file, proc.pid)
    finally:
        stop_process_group(proc)
        if own_log:
            log_file.unlink(missing_ok=True)
