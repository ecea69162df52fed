"""Prefect flows around relaypipe's DVC stages, and a pipeline flow for deployments.

* ``flows.stages``: one thin flow per DVC stage (``python -m flows.stages prepare``); dvc.yaml
  runs every stage through it, so each stage run is a Prefect flow run with its logs.
* ``flows.pipeline``: ``dvc pull`` -> ``dvc repro`` / ``dvc exp run -S ...`` -> ``dvc push``, the
  flow that ``prefect.yaml`` deploys to the ``gpu`` work pool.
* ``python -m flows repro [dvc repro args]``: one local Prefect server for a whole ``dvc repro``
  (``make run`` uses it) instead of a temporary server per stage.

DVC owns the graph, the cache and the record of what was produced; Prefect owns execution and
never stores artifacts (flows return small dicts, results are not persisted).
See docs/orchestration.md.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Defaults for Prefect settings, applied when ``flows`` is imported, i.e. before Prefect reads
# its settings (a ``python -m flows...`` process imports this package first). Every value is a
# setdefault: a user's environment always wins. They only change how Prefect starts and logs,
# never what a stage writes, which is why this file is not a DVC dependency of the stages.
PREFECT_DEFAULTS: dict[str, str] = {
    # With no PREFECT_API_URL, Prefect starts a temporary server per process. Its default
    # 20 s start-up budget is too short for a cold start on a busy 2-core machine (measured:
    # 14-25 s), which fails the stage for no reason.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    # The server's telemetry heartbeat writes to SQLite while the server migrates and registers
    # blocks: that is the "database is locked" traceback of a plain run. Offline machines also
    # log a DNS error for it. Nothing here needs it.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # relaypipe's own INFO logs (stage progress, metrics) go to the flow run's logs in the UI.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "relaypipe",
}


def apply_prefect_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set :data:`PREFECT_DEFAULTS` in ``environ`` where the user has not set them."""
    for key, value in PREFECT_DEFAULTS.items():
        environ.setdefault(key, value)


apply_prefect_defaults()
