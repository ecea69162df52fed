"""``relaypipe bench``: relay decoding speed against its floor (see :mod:`relaypipe.bench`).

relaypipe bench --batch-sizes 1,8,32 --router-ps 0,0.05,0.2 --out bench.json
relaypipe bench --pair realistic --batch-sizes 1,8 --router-ps 0.05 --repeats 5
relaypipe bench --pair realistic --schedule rounds --forward model   # the alternatives
relaypipe bench --pair realistic --batch-sizes 8 --teacher-hold 8    # a fixed teacher hold

The options are defined here rather than taken from :mod:`relaypipe.bench` (which imports
torch) so that ``relaypipe --help`` stays fast; tests/test_cli_fast.py checks that both define
the same options with the same defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from relaypipe.bounds import add_bound_arguments, add_call_bias_argument, add_prompt_arguments

DEFAULT_PROBLEMS = "data/problems/eval.parquet"  # relaypipe.bench.DEFAULT_PROBLEMS
DEFAULT_STUDENT = "data/models/student"  # relaypipe.bench.DEFAULT_STUDENT
DEFAULT_TEACHER = "data/models/teacher"  # relaypipe.bench.DEFAULT_TEACHER
PAIRS = ("micro", "realistic")  # relaypipe.bench.PAIRS
SCHEDULES = ("continuous", "rounds")  # relaypipe.relay.decoder.SCHEDULES


def teacher_hold(text: str) -> int | str:
    """``--teacher-hold``: ``auto`` or a whole number of student steps >= 0."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"'auto' or an integer >= 0, not {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (those of ``relaypipe.bench.add_arguments``, with help)."""
    p.add_argument(
        "--pair",
        choices=PAIRS,
        default="micro",
        help="micro: the --student/--teacher model directories (default: the micro pair); "
        "realistic: a built-in pair of random-weight Llamas (5.3M / 50.4M parameters, the "
        "teacher ~9.6x the student's FLOPs per token; micro tokenizer, nothing read from disk)",
    )
    p.add_argument(
        "--student", default=None, help=f"student model directory (default: {DEFAULT_STUDENT})"
    )
    p.add_argument(
        "--teacher", default=None, help=f"teacher model directory (default: {DEFAULT_TEACHER})"
    )
    p.add_argument(
        "--problems",
        default=None,
        help=f"parquet with a question column (default: {DEFAULT_PROBLEMS}; with --pair "
        "realistic: built-in arithmetic questions)",
    )
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--router-ps", default="0,0.05,0.2", help="comma-separated random_router p")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts decoded per measurement")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="continuous",
        help="the relay decoder's schedule: continuous (each step, one forward per model for "
        "the requests it holds) or rounds (the earlier one: every request with a model waits "
        "for the batch's longest call), for comparison",
    )
    p.add_argument(
        "--teacher-hold",
        type=teacher_hold,
        default="auto",
        help="student steps a new hand-off may wait, while the student has work, so that "
        "several share the teacher's forward: auto (as many as one teacher step costs, measured "
        "as it decodes) or a number (0: none)",
    )
    p.add_argument(
        "--forward",
        choices=("lean", "model"),
        default="lean",
        help="lean: the hand-written Llama forward where it applies; model: the model's own",
    )
    p.add_argument(
        "--refill",
        action="store_true",
        help="keep batch-size requests decoding, the next prompt joining as one finishes "
        "(a server's continuous batching), instead of chunks of batch-size",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="write the results as JSON here (None: don't)"
    )
    # absent: the student's relay.json (its training bounds and prompt format), else defaults
    add_bound_arguments(p)
    add_prompt_arguments(p)
    # absent: the student's call_bias.json (relaypipe calibrate), else 0; for the calls decode
    add_call_bias_argument(p)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="measure relay decoding speed (student, teacher, relay, generate) and its floor",
        description="Relay, student-only, teacher-only and plain generate() throughput, "
        "relay wall time over its floor (and the floor's parts), and the random router's "
        "requested p and realised teacher share, on a student/teacher pair.",
    )
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from relaypipe.bench import run as run_bench

    return run_bench(args)
