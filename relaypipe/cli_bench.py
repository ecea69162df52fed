"""``relaypipe bench``: relay decoding speed against its floor (see :mod:`relaypipe.bench`).

relaypipe bench --batch-sizes 1,8,32 --router-ps 0,0.05,0.2 --out bench.json
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from relaypipe.bench import add_arguments

    p = sub.add_parser(
        "bench",
        help="measure relay decoding speed (student, teacher, relay, generate) and its floor",
        description="Relay, student-only, teacher-only and plain generate() throughput, and "
        "relay wall time over its floor, on a student/teacher pair.",
    )
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from relaypipe.bench import run as run_bench

    return run_bench(args)
