"""One thin Prefect flow per DVC stage: what every ``cmd:`` line of dvc.yaml runs.

Run: ``python -m flows.stages prepare`` (params.yaml's preset + overrides, section ``prepare``),
``python -m flows.stages grpo --params data/config/grpo.yaml`` (what dvc.yaml runs: the file
stage configure resolved), or ``dvc repro``. A params file is either a preset + overrides or
one section per stage (relaypipe/presets.py). In Python:
``FLOWS["prepare"](params_path="params.yaml")`` runs the flow, ``FLOWS["prepare"].fn(...)`` the
plain function without Prefect, :func:`run_stage` the stage itself.

Each flow builds the stage's frozen params dataclass from its own section of the params file
(the same ``relaypipe.config.build`` that ``python -m relaypipe.stages.<stage>`` uses, so both
entry points accept and reject exactly the same files), calls the stage's ``run(params)`` and
returns its small summary dict. Artifacts stay DVC's: ``persist_result=False`` and the summary is
never written anywhere by Prefect.

A new stage is one line in :data:`STAGES` (its module must have ``run(params: <Params>)``), plus
its ``cmd: python -m flows.stages <stage>`` in dvc.yaml.

Bad input (a params key, a missing or broken input file; :func:`relaypipe.errors.is_input_error`)
fails the flow run with the error's message as its state message, no traceback, and the command
line prints that message and exits 2; other exceptions are bugs, logged by Prefect with their
traceback, exit 1. ``-v`` (or ``RELAYPIPE_TRACEBACK=1``, e.g. for ``dvc repro``) logs the
traceback of bad input as well. Called in Python, a flow raises the stage's exception either way.

Where the runs are recorded: with ``PREFECT_API_URL`` set (a server, a worker's flow run, or
``python -m flows repro``), on that server; otherwise each process starts a temporary local
server (see ``flows/__init__.py`` for the settings that keep that quiet).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, get_type_hints

from prefect import Flow, flow, get_run_logger, tags
from prefect.context import FlowRunContext
from prefect.states import Failed

from relaypipe import errors, presets
from relaypipe.config import build

# Stage name (= its params.yaml section and dvc.yaml stage) -> module with ``run(params)``.
STAGES: dict[str, str] = {
    "prepare": "relaypipe.stages.prepare",
    "bootstrap": "relaypipe.stages.bootstrap",
    "filter": "relaypipe.stages.filter",
    "warmup_data": "relaypipe.stages.warmup_data",
    "sft": "relaypipe.stages.sft",
    "grpo": "relaypipe.stages.grpo",
    "evaluate": "relaypipe.stages.evaluate",
    "report": "relaypipe.stages.report",
}

# Set by flows.pipeline for the `dvc` commands it runs, so stage runs can be found from the
# pipeline run that caused them (a tag; they are separate processes, hence separate flow runs).
PIPELINE_RUN_ENV = "RELAYPIPE_PIPELINE_RUN"


def params_class(stage: str) -> type:
    """The params dataclass of ``stage``, read from its ``run`` signature (imports the stage)."""
    module = importlib.import_module(STAGES[stage])
    return get_type_hints(module.run)["params"]


def run_stage(stage: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """Run ``stage`` without Prefect: its section of ``params_path`` in, its summary out."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    cls = params_class(stage)
    params = build(cls, presets.section(params_path, stage), presets.where(params_path, stage))
    return importlib.import_module(STAGES[stage]).run(params)


def stage_flow(stage: str) -> Flow[..., dict[str, Any]]:
    """The Prefect flow for ``stage``; its one parameter is the params file path."""

    def stage_body(params_path: str = "params.yaml") -> dict[str, Any]:
        try:
            summary = run_stage(stage, params_path)
        except Exception as err:
            if (
                not errors.is_input_error(err)
                or errors.traceback_wanted()
                or FlowRunContext.get() is None  # .fn(): a plain call raises
            ):
                raise  # in a flow run, Prefect logs it with its traceback
            # Bad input: the run fails with the message alone. data=err: state.result() and a
            # plain call of the flow raise the stage's exception itself, as a raise would.
            return Failed(message=errors.describe(err), data=err)  # type: ignore[return-value]
        run_log = get_run_logger() if FlowRunContext.get() else logging.getLogger(__name__)
        run_log.info("%s: %s", stage, summary)  # the summary, in the run's logs
        return summary

    stage_body.__name__ = stage_body.__qualname__ = f"{stage}_flow"
    stage_body.__doc__ = f"DVC stage ``{stage}`` (module {STAGES[stage]}): params file in."
    # No retries: a stage is local, deterministic compute. A failure there is a bug or bad
    # params, and a crashed training resumes from its checkpoints on the next `dvc repro`.
    # Retries belong to network I/O (flows.pipeline's pull/push).
    return flow(
        stage_body,
        name=f"relaypipe-{stage.replace('_', '-')}",
        # Not log_prints: it patches print(), which dill (under datasets' fingerprinting)
        # uses to disassemble functions into a captured stdout; the bytecode ended up in the
        # run's logs.
        log_prints=False,
        persist_result=False,
        retries=0,
    )


FLOWS: dict[str, Flow[..., dict[str, Any]]] = {stage: stage_flow(stage) for stage in STAGES}


def run_tags() -> list[str]:
    """Tags for a stage run: the stage's pipeline run and DVC experiment, when there is one."""
    out = []
    if parent := os.environ.get(PIPELINE_RUN_ENV):
        out.append(f"pipeline-run:{parent}")
    if exp := os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run` for its stages
        out.append(f"exp:{exp}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.stages",
        description="Run one DVC stage as a Prefect flow.",
        epilog=f"Bad input (params, input files) is reported in a line or two with exit status "
        f"{errors.EXIT_INPUT}; -v or {errors.TRACEBACK_ENV}=1 adds the traceback. A bug: its "
        f"traceback, exit status {errors.EXIT_BUG}.",
    )
    parser.add_argument("stage", choices=list(STAGES), help="stage (= params section)")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"log the traceback of bad input too (as {errors.TRACEBACK_ENV}=1 does) "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.verbose:
        errors.want_tracebacks()
    logging.getLogger("relaypipe").setLevel(logging.INFO)
    with tags("relaypipe", f"stage:{args.stage}", *run_tags()):
        # return_state: a failure is logged once by Prefect (a bug with its traceback), then
        # we exit non-zero for DVC instead of printing the same traceback a second time.
        state = FLOWS[args.stage](params_path=args.params, return_state=True)
    if state.is_completed():
        return 0
    return failure_status(state, prog=f"python -m flows.stages {args.stage}")


def failure_status(state: Any, *, prog: str) -> int:
    """The exit status of a failed stage run: 2 after printing the message of bad input, 1 for
    anything else (Prefect has logged it, traceback and all)."""
    try:
        state.result(raise_on_failure=True)
    except Exception as err:
        if errors.is_input_error(err):
            errors.report(err, prog)
            return errors.EXIT_INPUT
    return errors.EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
