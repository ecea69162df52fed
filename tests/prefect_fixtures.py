"""One Prefect test server per session for the orchestration tests (a pytest plugin).

Each user module says ``pytest_plugins = ["tests.prefect_fixtures"]`` (and never imports this
module), so the session fixture is one server for all of them rather than one per module. Stage
processes that ``dvc`` starts reach it through ``PREFECT_API_URL`` (tests/flow_helpers.py
``flow_env``); without it every stage would start a temporary server of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

import flows  # noqa: F401  (quiet-server defaults into os.environ, inherited by the harness)

# A cold start (new SQLite database, migrations) on a busy 2-core machine takes 20-40 s;
# prefect_test_harness's own default of 30 s fails there for no reason.
SERVER_STARTUP_TIMEOUT = 300


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A Prefect server with a temporary database for the whole session; yields its API URL."""
    with prefect_test_harness(server_startup_timeout=SERVER_STARTUP_TIMEOUT):
        url = PREFECT_API_URL.value()
        assert url and url.startswith("http://127.0.0.1:")
        yield url
