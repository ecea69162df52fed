"""Run every evaluation mode on every benchmark and record one row per request.

Library code of the ``evaluate`` stage (``python -m relaypipe.stages.evaluate``). A *mode* names
which student decodes and what the decoder lets it do with the teacher (``EVAL_MODES`` in
relaypipe/schemas.py):

===============  ==================  =======================================================
mode             student model       decoder mode
===============  ==================  =======================================================
student          bootstrap student   ``student`` (calls blocked; it never learned them anyway)
warmup           warmed-up student   ``student`` (teacher-free)
relay            GRPO student        ``relay`` (calls answered by the teacher)
teacher_free     GRPO student        ``student`` (calls blocked: what it learned on its own)
teacher          (none)              ``teacher`` (the teacher writes everything)
random_router    bootstrap student   ``random_router`` with ``router_p`` = p, one run per p
relay_sweep      GRPO student        ``relay`` with ``call_bias`` = b, one run per b
===============  ==================  =======================================================

and, outside the decoder, the *oracle caller* (rows of mode ``oracle``, one run per threshold
tau of ``oracle_sweep``; :func:`evaluate_oracle`): the bootstrap student, as the router's, with
the teacher judging every step and writing where it would have written another token
(relaypipe/evaluate/oracle.py). It is the reference for *where* to call that the relay's curve is
compared with; it peeks at the teacher at every step, so it is no deployable mode, and
``evaluate.modes`` cannot name it (``evaluate.oracle_sweep`` turns it on). It decodes under the
relay's bounds and budgets and greedily.

The random router hands each next token to the teacher with probability p, independently
(DESIGN.md §1), with the bootstrap student writing the rest: it is the no-learning baseline that
the relay's learned calls are compared with at equal call ratio or equal accuracy.

The relay sweep decodes the relay mode again at each call bias b of ``call_bias_sweep`` (the
logit bias on the student's ``<call>``, ``RelayConfig.call_bias``), under the relay's bounds
and budgets: the relay's accuracy against teacher share, the curve the report sets beside the
router's (its Pareto section). Each row records the bias in effect (``call_bias``): b for
relay_sweep, the config's bias for relay (``±inf`` as ``±MAX_FINITE_BIAS``: the column holds
finite floats, and a bias that large is as decisive), 0 for the other modes (no bias acts in
them). A sweep bias is absolute: it
replaces the relay's own (calibrated or not), it is not added to it.

The per-request teacher budgets of the bounds (``max_teacher_tokens``, ``max_calls``) are the
relay's: the decoder enforces them in every mode, so the baselines (``teacher`` and the
``random_router`` sweep, ``relaypipe.bounds.UNBUDGETED``) decode without them. Otherwise the
teacher alone would stop after the relay's 12 tokens and the router sweep could not reach high
shares.

Columns (``REQUEST_COLUMNS``, EvalRequestSchema): every row records ``router_p`` (-1 unless a
random_router row), ``call_bias`` (above) and ``oracle_tau`` (the oracle's threshold on its
rows, -1 on every other).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from relaypipe.bounds import UNBUDGETED
from relaypipe.evaluate.oracle import OracleLimits, oracle_decode
from relaypipe.evaluate.run import decode_problems, prompt_ids
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN
from relaypipe.relay.sampling import MAX_FINITE_BIAS
from relaypipe.schemas import EVAL_MODES, ORACLE_MODE
from relaypipe.tasks.base import Problem
from relaypipe.tasks.grading import is_correct, reader_text

log = logging.getLogger(__name__)

__all__ = [
    "MODE_PLAN",
    "NOT_AN_ORACLE",
    "NOT_A_ROUTER",
    "ORACLE_ROLE",
    "ModeRun",
    "evaluate_benchmarks",
    "evaluate_oracle",
    "oracle_label",
    "plan_runs",
]

NOT_A_ROUTER = -1.0  # router_p of every row that is not a random_router run
NOT_AN_ORACLE = -1.0  # oracle_tau of every row that is not an oracle run
ORACLE_ROLE = "student"  # the oracle's student: the bootstrap one, as the router's

# mode -> (student model role, decoder mode)
MODE_PLAN: dict[str, tuple[str, str]] = {
    "student": ("student", "student"),
    "warmup": ("warmup", "student"),
    "relay": ("relay", "relay"),
    "teacher_free": ("relay", "student"),
    # The decoder wants a student backend even when it never asks it: the bootstrap one.
    "teacher": ("student", "teacher"),
    "random_router": ("student", "random_router"),
    "relay_sweep": ("relay", "relay"),
}
assert set(MODE_PLAN) == set(EVAL_MODES)


@dataclass(frozen=True)
class ModeRun:
    """One decode of every benchmark problem."""

    mode: str
    router_p: float = NOT_A_ROUTER
    call_bias: float | None = None  # relay_sweep's bias (the other modes: the config's)

    @property
    def student_role(self) -> str:
        return MODE_PLAN[self.mode][0]

    @property
    def decoder_mode(self) -> str:
        return MODE_PLAN[self.mode][1]

    @property
    def label(self) -> str:
        if self.mode == "random_router":
            return f"{self.mode} p={self.router_p:g}"
        if self.mode == "relay_sweep":
            return f"{self.mode} bias={self.call_bias:+g}"
        return self.mode

    def row_bias(self, config_bias: float) -> float:
        """The ``call_bias`` column of this run's rows (module docstring)."""
        if self.mode == "relay_sweep":
            assert self.call_bias is not None
            return float(self.call_bias)
        if self.mode == "relay":
            return float(max(-MAX_FINITE_BIAS, min(MAX_FINITE_BIAS, config_bias)))
        return 0.0


def plan_runs(
    modes: Sequence[str], router_ps: Sequence[float], call_biases: Sequence[float] = ()
) -> list[ModeRun]:
    """The runs for ``modes``; ``random_router`` expands to one run per p of ``router_ps``,
    ``relay_sweep`` to one per bias of ``call_biases`` (finite; at least one)."""
    unknown = [m for m in modes if m not in MODE_PLAN]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; known: {', '.join(EVAL_MODES)}")
    runs: list[ModeRun] = []
    for mode in modes:
        if mode == "random_router":
            runs.extend(ModeRun(mode, float(p)) for p in sorted(set(router_ps)))
        elif mode == "relay_sweep":
            if not call_biases:
                raise ValueError("relay_sweep needs at least one call bias (call_bias_sweep)")
            bad = [b for b in call_biases if not math.isfinite(b)]
            if bad:
                raise ValueError(f"relay_sweep call biases must be finite, got {bad}")
            runs.extend(ModeRun(mode, call_bias=float(b)) for b in sorted(set(call_biases)))
        else:
            runs.append(ModeRun(mode))
    return runs


def evaluate_benchmarks(
    benchmarks: Mapping[str, Sequence[Problem]],
    runs: Sequence[ModeRun],
    decoders: Mapping[str, RelayDecoder],
    config: RelayConfig,
    batch_size: int = 100,
    *,
    relay_biases: Mapping[str, float] | None = None,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Decode and grade every benchmark in every run; rows shaped like EvalRequestSchema.

    ``decoders`` maps a student role (``MODE_PLAN``) to a decoder holding that student and the
    teacher; ``config`` carries bounds, sampling, seed and the relay's call bias, and each run
    sets its mode and p (a relay_sweep run its own call bias). ``relay_biases``: the relay's
    call bias per benchmark instead of ``config``'s (a calibration per benchmark); every
    benchmark must have one.
    ``chat_template``: prompts in the tokenizer's chat form, rendered with
    ``chat_template_kwargs`` (as in training).
    """
    if relay_biases is not None and set(relay_biases) != set(benchmarks):
        raise ValueError(
            f"relay_biases covers {sorted(relay_biases)}, the benchmarks are {sorted(benchmarks)}"
        )
    rows: list[dict] = []
    jobs = [(name, run) for name in benchmarks for run in runs]
    bar = tqdm(jobs, desc="evaluate", unit="run")
    for name, run in bar:
        bar.set_postfix_str(f"{name} {run.label}")
        base = (
            config
            if relay_biases is None
            else dataclasses.replace(config, call_bias=relay_biases[name])
        )
        cfg = dataclasses.replace(
            base,
            mode=run.decoder_mode,
            router_p=max(run.router_p, 0.0),
        )
        if run.call_bias is not None:
            cfg = dataclasses.replace(cfg, call_bias=run.call_bias)
        bias = run.row_bias(base.call_bias)
        if run.decoder_mode in UNBUDGETED:
            cfg = dataclasses.replace(cfg, max_teacher_tokens=None, max_calls=None)
        graded = decode_problems(
            decoders[run.student_role],
            list(benchmarks[name]),
            cfg,
            batch_size=batch_size,
            desc=f"{name} {run.label}",
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        for g in graded:
            tr = g.trace
            rows.append(
                {
                    "benchmark": name,
                    "mode": run.mode,
                    "router_p": run.router_p,
                    "call_bias": bias,
                    "oracle_tau": NOT_AN_ORACLE,
                    "problem_id": g.problem.problem_id,
                    "correct": g.correct,
                    "student_tokens": tr.n_student,
                    "teacher_tokens": tr.n_teacher,
                    "command_tokens": tr.n_command,
                    "calls": tr.calls,
                    "teacher_prefill_tokens": tr.teacher_prefill_tokens,
                    "teacher_context_tokens": tr.teacher_context_tokens,
                    "student_prefill_tokens": tr.student_prefill_tokens,
                    "latency_s": tr.seconds,
                }
            )
        correct = sum(g.correct for g in graded)
        teacher = sum(g.trace.n_teacher for g in graded)
        generated = sum(g.trace.n_generated for g in graded) or 1
        log.info(
            "%s %s: accuracy %.3f (%d/%d), call ratio %.4f",
            name,
            run.label,
            correct / max(1, len(graded)),
            correct,
            len(graded),
            teacher / generated,
        )
    return pd.DataFrame(rows, columns=REQUEST_COLUMNS)


def oracle_label(tau: float) -> str:
    return f"{ORACLE_MODE} tau={tau:g}"


def evaluate_oracle(
    benchmarks: Mapping[str, Sequence[Problem]],
    taus: Sequence[float],
    student: Any,
    teacher: Any,
    tokenizer: Any,
    limits: OracleLimits,
    batch_size: int = 100,
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The oracle caller at every threshold of ``taus`` on every benchmark; rows shaped like
    EvalRequestSchema (mode ``oracle``, ``oracle_tau`` its threshold).

    ``student`` and ``teacher`` are in-process models sharing ``tokenizer``; ``limits`` are the
    relay's bounds. The (problem, tau) pairs of a benchmark decode in batches of
    ``batch_size``; prompts are framed as in every other mode.
    """
    taus = sorted({float(t) for t in taus})
    eos = {int(e) for e in _eos_ids(student, teacher, tokenizer)}
    tags = [
        i
        for i in tokenizer.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
        if _real_id(i, tokenizer)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    rows: list[dict] = []
    for name, problems in benchmarks.items():
        prompts = prompt_ids(
            tokenizer,
            problems,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        jobs = [(tau, i) for tau in taus for i in range(len(problems))]
        traces = {}
        for start in tqdm(
            range(0, len(jobs), batch_size), desc=f"{name} {ORACLE_MODE}", leave=False
        ):
            chunk = jobs[start : start + batch_size]
            decoded = oracle_decode(
                student,
                teacher,
                [prompts[i] for _, i in chunk],
                [tau for tau, _ in chunk],
                limits,
                eos_ids=eos,
                pad_id=pad,
                banned_ids=tags,
            )
            traces.update(zip(chunk, decoded, strict=True))
        for tau in taus:
            graded = [
                (p, tr, is_correct(reader_text(tokenizer, tr.token_ids), p.answer))
                for p, tr in ((p, traces[(tau, i)]) for i, p in enumerate(problems))
            ]
            for p, tr, correct in graded:
                rows.append(
                    {
                        "benchmark": name,
                        "mode": ORACLE_MODE,
                        "router_p": NOT_A_ROUTER,
                        "call_bias": 0.0,
                        "oracle_tau": tau,
                        "problem_id": p.problem_id,
                        "correct": correct,
                        "student_tokens": tr.n_student,
                        "teacher_tokens": tr.n_teacher,
                        "command_tokens": 0,
                        "calls": tr.calls,
                        "teacher_prefill_tokens": tr.teacher_prefill_tokens,
                        "teacher_context_tokens": tr.teacher_context_tokens,
                        "student_prefill_tokens": tr.student_prefill_tokens,
                        "latency_s": tr.seconds,
                    }
                )
            teacher_tokens = sum(tr.n_teacher for _, tr, _ in graded)
            generated = sum(tr.n_generated for _, tr, _ in graded) or 1
            right = sum(c for _, _, c in graded)
            log.info(
                "%s %s: accuracy %.3f (%d/%d), call ratio %.4f, %d steps refused by a budget",
                name,
                oracle_label(tau),
                right / max(1, len(graded)),
                right,
                len(graded),
                teacher_tokens / generated,
                sum(tr.refused for _, tr, _ in graded),
            )
    return pd.DataFrame(rows, columns=REQUEST_COLUMNS)


def _eos_ids(*holders: Any) -> set[int]:
    """The end-of-sequence ids the models' configs and the tokenizer name."""
    out: set[int] = set()
    for h in holders:
        eos = getattr(getattr(h, "config", h), "eos_token_id", None)
        if eos is None:
            continue
        out.update([eos] if isinstance(eos, int) else eos)
    return out


def _real_id(token_id: Any, tokenizer: Any) -> bool:
    """A tag the tokenizer holds as one token (not its unknown-token id)."""
    return isinstance(token_id, int) and token_id != tokenizer.unk_token_id


REQUEST_COLUMNS = [
    "benchmark",
    "mode",
    "router_p",
    "call_bias",
    "oracle_tau",
    "problem_id",
    "correct",
    "student_tokens",
    "teacher_tokens",
    "command_tokens",
    "calls",
    "teacher_prefill_tokens",
    "teacher_context_tokens",
    "student_prefill_tokens",
    "latency_s",
]
