"""``relaypipe calibrate``: the call bias that gives a target teacher share, kept with the student.

    relaypipe calibrate --student data/models/relay --teacher data/models/teacher \\
        --target-share 0.05

decodes the first ``--n`` held-out problems of ``--problems`` (default
``data/problems/eval.parquet``) at several values of ``RelayConfig.call_bias`` (a logit bias
on the student's ``<call>``), bisecting for the one whose teacher share (teacher tokens over
all generated tokens, as the evaluation's call ratio) is within ``--tol`` of
``--target-share`` (:func:`relaypipe.calibrate.calibrate`). The student decodes as
``relaypipe decode`` would: the bounds and prompt format of its ``relay.json`` unless a flag
says otherwise, greedy unless ``--temperature``; the teacher is a folder (``--teacher``) or a
server (``--teacher-url``/``--teacher-model``), as for decode.

Writes ``call_bias.json`` (atomically) into the student folder, or ``--out DIR``, where
``relaypipe decode``, ``serve`` and ``bench`` pick it up as their default ``--call-bias``, and
prints one JSON line: the target, the chosen bias, its teacher share and accuracy on the
held-out problems, whether the target was reached, the file written (or null) and every point
decoded (bias, share, accuracy, token counts).

Exit status: 0 when the target was reached (the file is written). 1 when it was not (out of
reach within ``[--lo, --hi]``, or the share jumps over the target band, or ``--max-iters`` ran
out): the message goes to stderr, the JSON line is still printed, and the file is **not**
written (an existing one is left as it was), because a bias that misses its target would
silently become every later decode's default; ``--write-unreached`` writes the closest point
anyway, marked ``"reached": false`` (decode then says so when it uses it). 2: bad input.

The options are defined here, light (no torch at ``--help``); the work imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from relaypipe.bounds import add_bound_arguments, add_prompt_arguments, positive_arg
from relaypipe.cli_args import finite_float, int_at_least, probability

DEFAULT_PROBLEMS = "data/problems/eval.parquet"
MODES = ("relay", "fixed_help")  # relaypipe.relay.decoder.CALL_MODES: where a bias acts


def add_parser(sub: argparse._SubParsersAction, add_teacher_arguments: Callable) -> None:
    """Register ``calibrate`` (``add_teacher_arguments``: the teacher options decode has)."""
    p = sub.add_parser(
        "calibrate",
        help="find the call bias that gives a target teacher share; store it with the student",
        description="Bisect the student's call bias (a logit bias on <call>) for a target "
        "teacher share on held-out problems and write it to call_bias.json in the student "
        "folder, where decode, serve and bench use it by default. Exit 0: reached; 1: not "
        "reached (nothing written unless --write-unreached); 2: bad input.",
    )
    p.add_argument("--student", required=True, help="student model directory")
    add_teacher_arguments(p, required=True)
    p.add_argument(
        "--problems",
        default=DEFAULT_PROBLEMS,
        help="held-out problems (a ProblemSchema table: question, answer, ...)",
    )
    p.add_argument("--n", type=positive_arg, default=200, help="the first N problems of --problems")
    p.add_argument(
        "--target-share",
        type=probability,
        required=True,
        help="teacher tokens / generated tokens to aim for, in [0, 1]",
    )
    p.add_argument(
        "--tol", type=float, default=0.01, help="a share within this of the target is reached"
    )
    p.add_argument("--lo", type=finite_float, default=-20.0, help="the smallest bias tried")
    p.add_argument("--hi", type=finite_float, default=20.0, help="the largest bias tried")
    p.add_argument(
        "--max-iters", type=int_at_least(0), default=12, help="bisection steps after the two ends"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (every decode uses it)")
    p.add_argument("--mode", choices=MODES, default="relay", help="the decode mode to calibrate")
    p.add_argument("--fixed-n", type=positive_arg, default=8, help="fixed_help tokens per call")
    p.add_argument(
        "--max-new-tokens", type=positive_arg, default=128, help="generated tokens per problem"
    )
    add_bound_arguments(p)
    add_prompt_arguments(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--batch-size", type=positive_arg, default=64, help="problems per decode call")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when there is one)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to write call_bias.json into (default: the --student folder, where "
        "decode, serve and bench look for it)",
    )
    p.add_argument(
        "--write-unreached",
        action="store_true",
        help="write call_bias.json even when the target was not reached (the closest point, "
        "marked reached: false); the exit status is 1 all the same",
    )


def _problems(path: str, n: int) -> list:
    from relaypipe.io import read_table
    from relaypipe.schemas import ProblemSchema, frame_to_problems

    if not Path(path).is_file():
        raise SystemExit(f"error: --problems {path} not found")
    problems = frame_to_problems(read_table(path, ProblemSchema))[:n]
    if not problems:
        raise SystemExit(f"error: --problems {path} holds no problem")
    return problems


def run(args: argparse.Namespace) -> int:
    from relaypipe.bounds import resolve_for_command

    if not (math.isfinite(args.tol) and 0.0 < args.tol < 1.0):
        raise SystemExit(f"error: --tol must be in (0, 1), got {args.tol}")
    if not args.lo < args.hi:
        raise SystemExit(f"error: --lo {args.lo:g} must be below --hi {args.hi:g}")
    try:  # bounds and prompt format only: an old call_bias.json is not read (nor used)
        decoding = resolve_for_command(args.student, args)
    except ValueError as err:  # a bound out of range, kwargs without a chat template
        raise SystemExit(f"error: {err}") from err
    if decoding.record is not None:
        print(
            f"relaypipe calibrate: bounds {decoding.bounds.describe()} ({decoding.bounds_from}); "
            f"prompts framed as {decoding.prompt.describe()} ({decoding.prompt_from}); "
            f"recorded in {decoding.path}",
            file=sys.stderr,
        )
    problems = _problems(args.problems, args.n)
    out = args.out if args.out is not None else Path(args.student)
    if not out.is_dir() and args.out is None:
        raise SystemExit(f"error: --student {args.student} is not a folder: give --out DIR")

    import torch

    from relaypipe import cli_serve
    from relaypipe.calibrate import calibrate, write_calibration
    from relaypipe.models import load_model
    from relaypipe.relay.decoder import RelayConfig, RelayDecoder
    from relaypipe.relay.sampling import Sampling
    from relaypipe.relay.transformers_backend import TransformersBackend

    try:
        config = RelayConfig(
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            **decoding.bounds.relay_kwargs(),
            fixed_n=args.fixed_n,
            student_sampling=Sampling(temperature=args.temperature),
            teacher_sampling=Sampling(temperature=args.temperature),
            seed=args.seed,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    student, tok = load_model(args.student, device=args.device)
    teacher = cli_serve.build_teacher(args, tok)
    decoder = RelayDecoder(TransformersBackend(student, name="student"), teacher, tok, config)
    try:
        with torch.inference_mode():
            result = calibrate(
                decoder,
                problems,
                target_share=args.target_share,
                config=config,
                lo=args.lo,
                hi=args.hi,
                tol=args.tol,
                max_iters=args.max_iters,
                batch_size=args.batch_size,
                **decoding.prompt.format_kwargs(),
            )
    except ValueError as err:  # arguments calibrate refuses
        raise SystemExit(f"error: {err}") from err
    written = None
    if result.reached or args.write_unreached:
        out.mkdir(parents=True, exist_ok=True)
        written = str(write_calibration(out, result))
    line = {
        "target_share": result.target_share,
        "tol": result.tol,
        "bias": result.bias,
        "share": result.share,
        "accuracy": result.accuracy,
        "reached": result.reached,
        "message": result.message,
        "n_problems": result.n_problems,
        "written": written,
        "points": result.to_dict()["points"],
    }
    print(json.dumps(line), flush=True)
    if result.reached:
        print(f"relaypipe calibrate: {result.message}; wrote {written}", file=sys.stderr)
        return 0
    what = (
        f"wrote {written} anyway (--write-unreached)"
        if written
        else ("call_bias.json not written (--write-unreached writes the closest point)")
    )
    print(
        f"relaypipe calibrate: target teacher share {result.target_share:g} not reached: "
        f"{result.message}; closest: bias {result.bias:+.4f}, share {result.share:.4f}; {what}",
        file=sys.stderr,
    )
    return 1
