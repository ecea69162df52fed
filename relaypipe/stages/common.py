"""What every stage entry point shares: argument parsing, its params section, logging."""

from __future__ import annotations

import argparse
import logging
from typing import TypeVar

from relaypipe.config import build
from relaypipe.io import load_yaml_section

T = TypeVar("T")


def stage_params(section: str, cls: type[T], argv: list[str] | None = None) -> T:
    """Parse ``--params FILE`` (default params.yaml) and build ``cls`` from ``section``."""
    parser = argparse.ArgumentParser(prog=f"relaypipe.stages.{section}")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return build(cls, load_yaml_section(args.params, section), f"{args.params}:{section}")
