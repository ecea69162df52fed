"""What every stage entry point shares: argument parsing, its params section, logging, errors.

``python -m relaypipe.stages.<stage>`` reports bad input (a params key, a missing or broken
input file) in a few lines and exits 2; ``-v`` or ``RELAYPIPE_TRACEBACK=1`` shows the full
traceback as well (see :mod:`relaypipe.errors`).
"""

from __future__ import annotations

import argparse
import logging
from typing import TypeVar

from relaypipe import errors, presets
from relaypipe.config import build

T = TypeVar("T")


def stage_parser(section: str) -> argparse.ArgumentParser:
    """The command line of ``python -m relaypipe.stages.<section>``."""
    parser = argparse.ArgumentParser(
        prog=f"relaypipe.stages.{section}",
        description=f"Run the {section} stage on its section of a params file.",
        epilog=f"Bad input (params, input files) is reported in a line or two with exit status "
        f"{errors.EXIT_INPUT}; -v or {errors.TRACEBACK_ENV}=1 adds the traceback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"on an error, show the full traceback (as {errors.TRACEBACK_ENV}=1 does)",
    )
    return parser


def stage_params(section: str, cls: type[T], argv: list[str] | None = None) -> T:
    """Parse ``--params FILE`` (default params.yaml) and build ``cls`` from ``section``.

    Called with ``argv=None`` (the stage's command line), it also installs the brief report of
    input errors for the rest of the process (:func:`relaypipe.errors.install_excepthook`).
    """
    args = stage_parser(section).parse_args(argv)
    if args.verbose:
        errors.want_tracebacks()
    if argv is None:
        errors.install_excepthook(f"relaypipe.stages.{section}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return build(cls, presets.section(args.params, section), presets.where(args.params, section))
