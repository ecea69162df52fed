"""Calibrate the student's call bias to a target teacher share, and keep it with the model.

``RelayConfig.call_bias`` (relaypipe/relay/decoder.py, "Call bias") moves a trained student's
propensity to call without retraining. :func:`calibrate` finds the bias whose *realised teacher
share* on held-out problems is closest to a target; :func:`write_calibration` stores the result
as JSON in the model directory (``call_bias.json``) and :func:`read_calibration` reads it back,
so decode, serve and evaluate can pick the bias up later.

Teacher share: teacher-generated tokens over all generated tokens, summed over the problems,
the evaluation's ``call_ratio`` (:func:`relaypipe.evaluate.run.summarize`, here unrounded; the
student's command tokens count as the student's).

Search. The share is non-decreasing in the bias in expectation (a larger bias raises the open
tag's probability at every step outside a command), so the search is a bisection on the bias:

1. Decode at bias 0 (clamped into [lo, hi]): the student as trained.
2. Below the target (within ``tol`` ends the search at once), decode at ``hi``; above it, at
   ``lo``. If that end is still on the same side of the target (and not within ``tol``) the
   target is out of reach in [lo, hi]: the result is the closest point seen, with
   ``reached=False`` and a message saying which way and by how much. Never a silent wrong
   value.
3. Bisect the bracket: decode at the midpoint, keep the half whose ends straddle the target,
   until a share within ``tol`` of the target, ``max_iters`` midpoints, or a bracket narrower
   than ``min_step`` (the share jumps over the target band there: the problems are finitely
   many and greedy decoding is a step function of the bias).

Real shares are noisy and need not be monotone from one bias to the next; the bisection
follows the comparison with the target at each midpoint and the result is the best point
*seen* (closest share; on a tie the smaller ``|bias|``, the lighter touch), not the last.
Every decode is reported as a :class:`CalibrationPoint` (bias, share, accuracy, token counts)
in evaluation order. Each decode uses ``config``'s seed, so a calibration is reproducible and
neighbouring biases see the same random numbers (common random numbers make the share a
smoother function of the bias).

Library code: a command (``relaypipe calibrate``, relaypipe/cli_calibrate.py) or the evaluate
stage builds the decoder and problems and calls :func:`calibrate` then
:func:`write_calibration`. Who reads the file: :func:`resolve_command`, the bounds, prompt format
and call bias of ``relaypipe decode``, ``serve`` and ``bench`` (``--call-bias``, else the
student folder's call_bias.json, else 0). Nothing here imports trl, DVC or Prefect.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaypipe.bounds import BOUND_NAMES, CommandDecoding, RelayBounds, resolve_for_command
from relaypipe.evaluate.run import accuracy, decode_problems
from relaypipe.io import read_json, write_json
from relaypipe.relay.decoder import CALL_MODES, RelayConfig, RelayDecoder
from relaypipe.tasks.base import Problem

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationPoint",
    "CalibrationResult",
    "calibrate",
    "pick_call_bias",
    "read_calibration",
    "resolve_command",
    "teacher_share",
    "write_calibration",
]

CALIBRATION_FILE = "call_bias.json"  # in the model directory
FORMAT = 1  # the file's layout version


@dataclass(frozen=True)
class CalibrationPoint:
    """One decode of the held-out problems at one bias."""

    bias: float
    share: float  # teacher tokens / generated tokens
    accuracy: float
    teacher_tokens: int
    generated_tokens: int
    calls: int  # hand-offs, all problems together


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen bias and everything that was tried.

    ``bias``/``share``/``accuracy`` are those of the best point seen; ``reached`` says whether
    its share is within ``tol`` of ``target_share``, ``message`` says what happened in words.
    ``config`` is the decode it was calibrated for (``RelayConfig`` fields but ``call_bias``,
    samplings as dicts): a bias means little under other settings.
    """

    target_share: float
    tol: float
    bias: float
    share: float
    accuracy: float
    reached: bool
    message: str
    points: tuple[CalibrationPoint, ...]
    n_problems: int
    lo: float
    hi: float
    config: dict[str, Any] = field(default_factory=dict)

    def apply(self, config: RelayConfig) -> RelayConfig:
        """``config`` with this calibration's bias."""
        return dataclasses.replace(config, call_bias=self.bias)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["points"] = [dataclasses.asdict(p) for p in self.points]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationResult:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"a calibration needs {', '.join(missing)}")
        kwargs = {k: data[k] for k in names}
        kwargs["points"] = tuple(CalibrationPoint(**p) for p in data["points"])
        kwargs["config"] = dict(data["config"])
        return cls(**kwargs)


def teacher_share(traces: Sequence[Any]) -> tuple[float, int, int]:
    """(share, teacher tokens, generated tokens) of some traces: the evaluation's call ratio,
    token-weighted over the traces, unrounded (0 when nothing was generated)."""
    teacher = sum(t.n_teacher for t in traces)
    generated = sum(t.n_generated for t in traces)
    return (teacher / generated if generated else 0.0), teacher, generated


def _config_record(config: RelayConfig) -> dict[str, Any]:
    record = dataclasses.asdict(config)
    record.pop("call_bias", None)
    return record


def _check_args(
    problems: Sequence[Problem],
    target_share: float,
    config: RelayConfig,
    lo: float,
    hi: float,
    tol: float,
    max_iters: int,
    min_step: float,
) -> None:
    def real(x: object) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    if not problems:
        raise ValueError("calibrate needs at least one problem")
    if not (real(target_share) and 0.0 <= target_share <= 1.0):
        raise ValueError(f"target_share must be in [0, 1], got {target_share!r}")
    if config.mode not in CALL_MODES:
        raise ValueError(
            f"call_bias has no effect in mode {config.mode!r} (only in {', '.join(CALL_MODES)}): "
            "nothing to calibrate"
        )
    if not (real(lo) and real(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got lo={lo!r}, hi={hi!r}")
    if not (real(tol) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if not (isinstance(max_iters, int) and not isinstance(max_iters, bool) and max_iters >= 0):
        raise ValueError(f"max_iters must be an integer >= 0, got {max_iters!r}")
    if not (real(min_step) and min_step > 0):
        raise ValueError(f"min_step must be > 0, got {min_step!r}")


def calibrate(
    decoder: RelayDecoder,
    problems: Sequence[Problem],
    *,
    target_share: float,
    config: RelayConfig,
    lo: float = -20.0,
    hi: float = 20.0,
    tol: float = 0.02,
    max_iters: int = 12,
    min_step: float = 1e-3,
    batch_size: int = 64,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> CalibrationResult:
    """The ``call_bias`` in [lo, hi] whose teacher share on ``problems`` is closest to
    ``target_share`` (module docstring: search, noise, reachability).

    ``config`` is the decode to calibrate (mode ``relay`` or ``fixed_help``; its ``call_bias``
    is ignored, its seed fixes every decode). Problems are decoded and graded as the evaluation
    does (:func:`relaypipe.evaluate.run.decode_problems`, with ``batch_size``,
    ``chat_template`` and ``chat_template_kwargs``). At most ``max_iters + 2`` decodes.
    Raises ValueError for arguments that cannot be calibrated (a mode without calls, a target
    outside [0, 1], lo >= hi, ...); an unreachable target is a result with ``reached=False``.
    """
    _check_args(problems, target_share, config, lo, hi, tol, max_iters, min_step)
    seen: dict[float, CalibrationPoint] = {}
    order: list[CalibrationPoint] = []

    def at(bias: float) -> CalibrationPoint:
        bias = float(bias)
        if bias in seen:
            return seen[bias]
        graded = decode_problems(
            decoder,
            problems,
            dataclasses.replace(config, call_bias=bias),
            batch_size=batch_size,
            desc=f"calibrate bias {bias:+.3f}",
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        traces = [g.trace for g in graded]
        share, teacher, generated = teacher_share(traces)
        point = CalibrationPoint(
            bias=bias,
            share=share,
            accuracy=accuracy(graded),
            teacher_tokens=teacher,
            generated_tokens=generated,
            calls=sum(t.calls for t in traces),
        )
        log.info(
            "calibrate: bias %+.4f -> teacher share %.4f (target %.4f), accuracy %.4f",
            bias,
            share,
            target_share,
            point.accuracy,
        )
        seen[bias] = point
        order.append(point)
        return point

    def close(p: CalibrationPoint) -> bool:
        return abs(p.share - target_share) <= tol

    def result(message: str) -> CalibrationResult:
        best = min(order, key=lambda p: (abs(p.share - target_share), abs(p.bias)))
        reached = close(best)
        if reached:
            message = (
                f"bias {best.bias:+.4f} gives teacher share {best.share:.4f} (target "
                f"{target_share:.4f} +- {tol:g}) after {len(order)} decodes"
            )
        else:
            log.warning("calibrate: target share %.4f not reached: %s", target_share, message)
        return CalibrationResult(
            target_share=float(target_share),
            tol=float(tol),
            bias=best.bias,
            share=best.share,
            accuracy=best.accuracy,
            reached=reached,
            message=message,
            points=tuple(order),
            n_problems=len(problems),
            lo=float(lo),
            hi=float(hi),
            config=_config_record(config),
        )

    start = at(min(max(0.0, lo), hi))
    if close(start):
        return result("")
    # bracket: a has share below the target, b above (in expectation)
    if start.share < target_share:
        end = at(hi)
        if close(end):
            return result("")
        if end.share < target_share:
            return result(
                f"out of reach: at the largest bias {hi:+g} the teacher share is "
                f"{end.share:.4f}, still below the target {target_share:.4f} - {tol:g}; raise "
                "hi, or the student cannot call more under these settings (budgets, "
                "max_new_tokens, what its commands ask for)"
            )
        a, b = start, end
    else:
        end = at(lo)
        if close(end):
            return result("")
        if end.share > target_share:
            return result(
                f"out of reach: at the smallest bias {lo:+g} the teacher share is "
                f"{end.share:.4f}, still above the target {target_share:.4f} + {tol:g}; lower "
                "lo, or the teacher's share does not come from the student's calls "
                "(fixed_help's fixed grants, a student that never stops calling)"
            )
        a, b = end, start
    for _ in range(max_iters):
        if b.bias - a.bias < min_step:
            return result(
                f"the teacher share jumps from {a.share:.4f} at bias {a.bias:+.4f} to "
                f"{b.share:.4f} at bias {b.bias:+.4f}: no bias between gives the target "
                f"{target_share:.4f} +- {tol:g} on these {len(problems)} problems (more "
                "problems, sampled decoding or a larger tol smooth the share)"
            )
        mid = at((a.bias + b.bias) / 2)
        if close(mid):
            return result("")
        if mid.share < target_share:
            a = mid
        else:
            b = mid
    return result(
        f"no share within {tol:g} of the target {target_share:.4f} after {max_iters} "
        f"bisection steps (bracket [{a.bias:+.4f}, {b.bias:+.4f}], shares {a.share:.4f} to "
        f"{b.share:.4f}); raise max_iters or tol"
    )


def write_calibration(model_dir: str | os.PathLike[str], result: CalibrationResult) -> Path:
    """Store ``result`` as ``<model_dir>/call_bias.json`` (atomically); returns the path."""
    path = Path(model_dir) / CALIBRATION_FILE
    write_json(path, {"format": FORMAT, **result.to_dict()})
    return path


def read_calibration(model_dir: str | os.PathLike[str]) -> CalibrationResult | None:
    """The calibration stored in ``model_dir``, or None when it has none. A file that is not
    a calibration (bad JSON, another format, missing fields) is a ValueError naming it."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a call-bias calibration of format {FORMAT}")
    try:
        return CalibrationResult.from_dict(data)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a valid calibration: {err}") from err


def pick_call_bias(
    student: str, given: float | None, bounds: RelayBounds | None = None
) -> tuple[float, str, CalibrationResult | None]:
    """The call bias a command decodes under, where it came from, and the calibration it came
    from (None when it came from none): ``given`` (the flag), else ``call_bias.json`` in the
    student folder, else 0. A calibration made under other bounds than ``bounds`` still
    applies, and the source says so. A broken call_bias.json is a ValueError naming it."""
    if given is not None:  # the file is not even read (a broken one does not matter)
        return float(given), "--call-bias", None
    path = Path(student) / CALIBRATION_FILE
    if not (Path(student).is_dir() and path.is_file()):
        return 0.0, "default", None
    calibration = read_calibration(student)
    assert calibration is not None
    source = (
        f"{path}: calibrated to teacher share {calibration.share:.4f}, target "
        f"{calibration.target_share:g}"
    )
    if not calibration.reached:
        source += ", target not reached"
    if bounds is not None:
        then = {k: calibration.config.get(k, "?") for k in BOUND_NAMES}
        if then != bounds.relay_kwargs():
            shown = ", ".join(f"{k} {'none' if v is None else v}" for k, v in then.items())
            source += f"; calibrated under other bounds ({shown})"
    return float(calibration.bias), source, calibration


def resolve_command(student: str, args: argparse.Namespace) -> CommandDecoding:
    """What ``relaypipe decode``/``serve``/``bench`` decode ``student`` under: the bounds and
    prompt format of :func:`relaypipe.bounds.resolve_for_command`, and the call bias of
    :func:`pick_call_bias` (``args.call_bias``, the ``--call-bias`` flag; None: not given).
    ``ValueError`` for flags that do not fit and for a broken call_bias.json."""
    decoding = resolve_for_command(student, args)
    bias, source, calibration = pick_call_bias(
        student, getattr(args, "call_bias", None), decoding.bounds
    )
    return dataclasses.replace(
        decoding, call_bias=bias, call_bias_from=source, calibration=calibration
    )
