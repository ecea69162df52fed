"""Relay decoding speed on a student/teacher pair: how close relay gets to its floor.

The pair (``--pair``):

* ``micro`` (the default): trained model directories, ``--student``/``--teacher`` (default
  ``data/models/student``/``data/models/teacher``, the micro pair ``make run`` trains);
* ``realistic``: a built-in pair of random-weight Llamas (``transformers.LlamaForCausalLM``
  from fixed seeds, the micro character tokenizer), built in memory, nothing read from disk:
  5.3M student / 50.4M teacher parameters, so the teacher costs about 9.6x the student's
  matmul FLOPs per token (measured 6-10x its decode time per token on a CPU), as
  Qwen3-8B is to Qwen3-1.7B; the micro pair (teacher only 2-3x slower per step) lacks that.
  Without ``--problems`` it decodes built-in arithmetic questions.

The results' ``config.pair`` names the pair and gives each model's parameters and matmul FLOPs
per token (:func:`model_cost`).

For every batch size the same prompts are decoded, in chunks of that size, in several ways:

* ``student`` / ``teacher``: one model writes everything (decoder modes ``student``/``teacher``);
* ``relay p``: decoder mode ``random_router`` with ``router_p = p`` (greedy), which hands
  tokens to the teacher at random places, a share of about ``p`` (in expectation
  ``p / (1 - p + p^2)`` as the decoder draws: 5.25 % at p = 0.05, 23.8 % at 0.2). Request ``i``
  of the run is request id ``i`` of the decoder whatever its chunk (``first_id``), so it has
  its own router stream, the same at every batch size. Both the requested ``router_p`` and
  the realised teacher share of the generated tokens (``call_ratio``) are reported;
* ``calls``: decoder mode ``relay``, greedy: the student's own calls, answered by the teacher,
  under the call bias (``--call-bias``, else the student's ``call_bias.json`` from
  ``relaypipe calibrate``, else 0); its teacher share is the student's, not a drawn one (an
  untrained student hardly calls);
* ``generate``: plain ``model.generate()`` of the student (left padding, attention mask,
  greedy, same ``max_new_tokens``), the reference for the student-only mode;
* ``prefill``: one backend call with ``max_new_tokens=1`` per chunk and model, which gives a
  per-token prefill time for each model.

The *floor* of a relay run is what its tokens would cost at the per-token rates measured in the
same batch size with no scheduling overhead: the student's tokens at the student-only decode
rate, the teacher's at the teacher-only rate, and every token a model had to prefill (what it
had not seen; the traces count them) at that model's prefill rate. Decode rates exclude the
prompt prefill: ``(student-only seconds - prompt tokens x prefill rate) / generated tokens``.
``floor`` gives its four parts (``student_decode``, ``teacher_decode``, ``student_prefill``,
``teacher_prefill``, seconds), each at the median rate over repeats; ``floor_seconds`` is their
sum. ``relay_over_floor`` is the median over repeats of relay seconds over that repeat's floor
(at that repeat's rates).

Timing on a shared machine is noisy: every mode runs once per repeat, repeats interleave the
modes, throughputs are medians over repeats and ratios are medians of per-repeat ratios. The
bench reports numbers; it judges none of them.

Every decode runs under the student's recorded bounds and frames questions in its recorded
prompt format when the student folder has a ``relay.json`` (a trained relay model; see
:mod:`relaypipe.bounds`), else under the decoder's defaults and the plain ``Q:/A:`` prompt;
``--max-turns`` and friends, ``--chat-template`` override. The results' ``config`` says which,
and which call bias ``calls`` ran under (``call_bias``, ``call_bias_from``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from relaypipe.bounds import (
    DECODER_DEFAULTS,
    PromptFormat,
    RelayBounds,
    add_bound_arguments,
    add_call_bias_argument,
    add_prompt_arguments,
    bias_json,
)
from relaypipe.cli_bench import teacher_hold
from relaypipe.micro.models import ModelSize
from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import SCHEDULES, RelayConfig, RelayDecoder
from relaypipe.relay.trace import RelayTrace
from relaypipe.relay.transformers_backend import ForwardStats, TransformersBackend

log = logging.getLogger(__name__)

DEFAULT_PROBLEMS = "data/problems/eval.parquet"
DEFAULT_STUDENT = "data/models/student"
DEFAULT_TEACHER = "data/models/teacher"
PAIRS = ("micro", "realistic")
# The realistic pair: 5,271,808 / 50,396,672 parameters (with the micro tokenizer), 4 / 8 heads
# of 64; the teacher's matmul FLOPs per token are 9.6x the student's.
REALISTIC_STUDENT = ModelSize(
    hidden_size=256, layers=5, heads=4, intermediate_size=1024, max_positions=512
)
REALISTIC_TEACHER = ModelSize(
    hidden_size=512, layers=12, heads=8, intermediate_size=2048, max_positions=512
)
REALISTIC_SEED = 0
# built-in questions (the realistic pair without --problems): one-digit chains of six terms
BUILTIN_QUESTIONS = {"difficulty": 1, "terms": 6, "seed": 0, "split": "bench"}
FLOOR_PARTS = ("student_decode", "teacher_decode", "student_prefill", "teacher_prefill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``relaypipe bench`` and :func:`main`)."""
    p.add_argument("--pair", choices=PAIRS, default="micro", help="the model pair")
    p.add_argument("--student", default=None, help="student model directory")
    p.add_argument("--teacher", default=None, help="teacher model directory")
    p.add_argument("--problems", default=None, help="parquet with a question column")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--router-ps", default="0,0.05,0.2", help="comma-separated random_router p")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts decoded per measurement")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="continuous",
        help="the relay decoder's schedule (rounds: the earlier one, for comparison)",
    )
    p.add_argument(
        "--teacher-hold",
        type=teacher_hold,
        default="auto",
        help="student steps a new hand-off may wait for company (auto: as many as one teacher "
        "step costs)",
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
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_bound_arguments(p)
    add_prompt_arguments(p)
    add_call_bias_argument(p)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------- the pair
def model_cost(model: torch.nn.Module) -> dict[str, int]:
    """``parameters`` and ``flops_per_token``: 2 x the weights of every linear layer (the
    attention and MLP projections and the LM head, tied or not), the matmul FLOPs of one
    token's forward without attention over the context (a few % at these lengths). Works on
    meta-device models."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "flops_per_token": 2 * linear}


def realistic_pair(
    student_size: ModelSize | None = None,
    teacher_size: ModelSize | None = None,
    seed: int = REALISTIC_SEED,
    device: str = "cpu",
):
    """(student, teacher, tokenizer): random-weight Llamas from fixed seeds (student ``seed``,
    teacher ``seed + 1``) with the micro character tokenizer, in eval mode; sizes default to
    :data:`REALISTIC_STUDENT` and :data:`REALISTIC_TEACHER`. The same sizes and seed give the
    same weights; the global torch RNG is left as it was."""
    from relaypipe.micro.models import build_model
    from relaypipe.micro.tokenizer import build_char_tokenizer

    student_size = student_size or REALISTIC_STUDENT
    teacher_size = teacher_size or REALISTIC_TEACHER
    tok = build_char_tokenizer()
    models = []
    with torch.random.fork_rng(devices=[]):
        for size, s in ((student_size, seed), (teacher_size, seed + 1)):
            models.append(build_model(size, tok, seed=s).to(device).eval())
    return models[0], models[1], tok


@dataclass
class Pair:
    """A student and a teacher (one vocabulary) and where they came from."""

    name: str  # "micro" (directories) or "realistic" (built in)
    student: Any
    teacher: Any
    tokenizer: Any
    student_source: str
    teacher_source: str

    def describe(self) -> dict[str, Any]:
        s, t = model_cost(self.student), model_cost(self.teacher)
        return {
            "name": self.name,
            "student": {"source": self.student_source, **s},
            "teacher": {"source": self.teacher_source, **t},
            "teacher_over_student_parameters": t["parameters"] / s["parameters"],
            "teacher_over_student_flops_per_token": t["flops_per_token"] / s["flops_per_token"],
        }


def load_pair(student_dir: str, teacher_dir: str, device: str = "cpu") -> Pair:
    """A pair of model directories (``--pair micro``, or any trained pair)."""
    from relaypipe.models import load_model

    student, tok = load_model(student_dir, device=device)
    teacher, _ = load_model(teacher_dir, device=device)
    return Pair("micro", student, teacher, tok, student_dir, teacher_dir)


def build_realistic_pair(
    student_size: ModelSize | None = None,
    teacher_size: ModelSize | None = None,
    seed: int = REALISTIC_SEED,
    device: str = "cpu",
) -> Pair:
    """The built-in realistic-ratio pair (``--pair realistic``; :func:`realistic_pair`)."""
    student_size = student_size or REALISTIC_STUDENT
    teacher_size = teacher_size or REALISTIC_TEACHER
    student, teacher, tok = realistic_pair(student_size, teacher_size, seed, device)

    def source(size: ModelSize, s: int) -> str:
        return (
            f"built-in random-weight Llama (seed {s}, hidden {size.hidden_size}, "
            f"{size.layers} layers, {size.heads} heads, intermediate {size.intermediate_size})"
        )

    return Pair(
        "realistic",
        student,
        teacher,
        tok,
        source(student_size, seed),
        source(teacher_size, seed + 1),
    )


def builtin_questions(n: int) -> list[str]:
    """``n`` seeded arithmetic questions (the realistic pair's default prompts)."""
    from relaypipe.tasks.arith import ArithSpec, generate

    q = BUILTIN_QUESTIONS
    spec = ArithSpec(difficulty=q["difficulty"], terms=q["terms"])
    return [p.question for p in generate(spec, n, seed=q["seed"], split=q["split"])]


# ---------------------------------------------------------------------------------- timing
@dataclass
class _Run:
    seconds: float
    tokens: int  # generated tokens
    traces: list[RelayTrace]
    forwards: dict[str, ForwardStats] = field(default_factory=dict)  # by model

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _decode(
    dec: RelayDecoder, prompts: list[list[int]], batch: int, cfg: RelayConfig, refill: bool = False
) -> _Run:
    """Decode ``prompts`` in chunks of ``batch``, or (``refill``) ``batch`` at a time with the
    next prompt joining as one finishes; prompt ``i`` is request id ``i`` whatever its chunk,
    so every request has its own RNG and router streams (as in one big batch)."""
    traces: list[RelayTrace] = []
    dec.student.reset_stats()
    dec.teacher.reset_stats()
    t0 = time.perf_counter()
    if refill:
        traces = dec.decode(prompts, cfg, max_batch=batch)
    else:
        for start in range(0, len(prompts), batch):
            traces.extend(dec.decode(prompts[start : start + batch], cfg, first_id=start))
    seconds = time.perf_counter() - t0
    forwards = {"student": dec.student.reset_stats(), "teacher": dec.teacher.reset_stats()}
    return _Run(seconds, sum(t.n_generated for t in traces), traces, forwards)


def _prefill(backend: TransformersBackend, prompts: list[list[int]], batch: int) -> float:
    """Seconds per prompt token of a fresh batched prefill (one call, one new token)."""
    seconds, n = 0.0, 0
    for c, chunk in enumerate(_chunks(prompts, batch)):
        reqs = [GenRequest(("bench-prefill", c, i), p, 1) for i, p in enumerate(chunk)]
        t0 = time.perf_counter()
        backend.generate(reqs)
        seconds += time.perf_counter() - t0
        for r in reqs:
            backend.release(r.key)
        n += sum(len(p) for p in chunk)
    return seconds / n


def _hf_generate(model, tokenizer, prompts: list[str], batch: int, max_new: int):
    """Plain ``generate()``: (seconds, tokens, per-prompt new token lists up to EOS)."""
    eos = model.config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    tokenizer.padding_side = "left"
    rows: list[list[int]] = []
    seconds = 0.0
    for chunk in _chunks(prompts, batch):
        enc = tokenizer(list(chunk), padding=True, return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(eos_ids) or None,
            )
        seconds += time.perf_counter() - t0
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            rows.append(row[:cut])
    return seconds, sum(len(r) for r in rows), rows


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _forward_summary(runs: Sequence[_Run]) -> dict[str, dict[str, float]]:
    """Each model's forwards in a relay run (:class:`ForwardStats`), medians over repeats
    field by field: how many, how many rows each, the tokens fed (padding included) and the
    seconds they took."""
    out = {}
    for model in ("student", "teacher"):
        stats = [x.forwards[model].to_dict() for x in runs]
        out[model] = {k: _median([st[k] for st in stats]) for k in stats[0]}
    return out


def _floor_parts(tr: Sequence[RelayTrace], rates: dict[str, float]) -> dict[str, float]:
    """The floor of a relay run's traces at ``rates``, by part (seconds)."""
    return {
        "student_decode": sum(t.n_student for t in tr) * rates["dec_s"],
        "teacher_decode": sum(t.n_teacher for t in tr) * rates["dec_t"],
        "student_prefill": sum(t.student_prefill_tokens for t in tr) * rates["pf_s"],
        "teacher_prefill": sum(t.teacher_prefill_tokens for t in tr) * rates["pf_t"],
    }


def _relay_floor(tr: Sequence[RelayTrace], rates: dict[str, float]) -> float:
    return sum(_floor_parts(tr, rates).values())


def run_benchmark(
    pair: Pair,
    questions: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    router_ps: Sequence[float] = (0.0, 0.05, 0.2),
    max_new_tokens: int = 64,
    repeats: int = 3,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    bounds: RelayBounds = DECODER_DEFAULTS,
    prompt: PromptFormat | None = None,
    decoding_from: dict[str, str] | None = None,
    call_bias: float = 0.0,
    call_bias_from: str = "default",
    schedule: str = "continuous",
    teacher_hold: int | str = "auto",
    forward: str = "lean",
    refill: bool = False,
) -> dict[str, Any]:
    """Measure every mode for every batch size on ``pair``; returns the JSON-able results.

    ``bounds`` and ``prompt``: what every decode runs under and how questions are framed
    (``decoding_from``: where they came from, for the results' config); ``call_bias``: the
    bias of the ``calls`` decode (mode relay), ``call_bias_from`` where it came from;
    ``schedule``: the decoder's (continuous or rounds); ``teacher_hold``: the decoder's
    (:class:`~relaypipe.relay.decoder.RelayDecoder`); ``forward``: ``lean`` (the hand-written
    Llama forward where it applies) or ``model`` (the model's own); ``refill``: every mode
    keeps ``batch`` requests decoding, the next prompt joining as one finishes, instead of
    decoding chunks of ``batch``."""
    from relaypipe.tasks.base import format_prompt

    student, teacher, tok = pair.student, pair.teacher, pair.tokenizer
    fast = None if forward == "lean" else False
    s_back = TransformersBackend(student, name="student", fast=fast)
    t_back = TransformersBackend(teacher, name="teacher", fast=fast)
    dec = RelayDecoder(s_back, t_back, tok, schedule=schedule, teacher_hold=teacher_hold)
    prompt = prompt or PromptFormat()
    texts = [format_prompt(q, tok, **prompt.format_kwargs()) for q in questions]
    prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    prompt_tokens = sum(len(p) for p in prompts)

    def cfg(mode: str, p: float = 0.0, new: int = max_new_tokens) -> RelayConfig:
        return RelayConfig(
            mode=mode,
            router_p=p,
            max_new_tokens=new,
            seed=0,
            call_bias=call_bias if mode == "relay" else 0.0,
            **bounds.relay_kwargs(mode),
        )

    # warm-up: first calls allocate caches and pick kernels
    warm = prompts[: max(batch_sizes)]
    for mode in ("student", "teacher"):
        _decode(dec, warm, len(warm), cfg(mode, new=4))
    _hf_generate(student, tok, texts[:2], 2, 2)

    results = []
    for b in batch_sizes:
        per: dict[str, list] = {"student": [], "teacher": [], "generate": [], "pf": []}
        relay: dict[float, list[_Run]] = {p: [] for p in router_ps}
        calls: list[_Run] = []  # mode relay: the student's own calls
        gen_rows: list[list[int]] = []
        for r in range(repeats):
            if progress:
                progress(f"batch {b}: repeat {r + 1}/{repeats}")
            per["student"].append(_decode(dec, prompts, b, cfg("student"), refill))
            per["teacher"].append(_decode(dec, prompts, b, cfg("teacher"), refill))
            for p in router_ps:
                relay[p].append(_decode(dec, prompts, b, cfg("random_router", p), refill))
            calls.append(_decode(dec, prompts, b, cfg("relay"), refill))
            g_sec, g_tok, gen_rows = _hf_generate(student, tok, texts, b, max_new_tokens)
            per["generate"].append(_Run(g_sec, g_tok, []))
            per["pf"].append((_prefill(s_back, prompts, b), _prefill(t_back, prompts, b)))

        rates = []  # per repeat: per-token prefill and decode seconds
        for r in range(repeats):
            pf_s, pf_t = per["pf"][r]
            s_run, t_run = per["student"][r], per["teacher"][r]
            rates.append(
                {
                    "pf_s": pf_s,
                    "pf_t": pf_t,
                    # clamped: on tiny runs noise can exceed the decode share
                    "dec_s": max(0.0, s_run.seconds - prompt_tokens * pf_s) / s_run.tokens,
                    "dec_t": max(0.0, t_run.seconds - prompt_tokens * pf_t) / t_run.tokens,
                }
            )
        median_rates = {k: _median([x[k] for x in rates]) for k in rates[0]}

        def mode_summary(runs: list[_Run]) -> dict[str, float]:
            return {
                "tokens": runs[0].tokens,
                "seconds": _median([x.seconds for x in runs]),
                "tokens_per_s": _median([x.tokens_per_s for x in runs]),
            }

        student_ids = [t.token_ids for t in per["student"][0].traces]
        same = sum(a == g for a, g in zip(student_ids, gen_rows, strict=True))
        row: dict[str, Any] = {
            "batch_size": b,
            "student_only": mode_summary(per["student"]),
            "teacher_only": mode_summary(per["teacher"]),
            "generate": {
                **mode_summary(per["generate"]),
                "same_tokens_as_student_only": same / len(student_ids),
            },
            "student_over_generate": _median(
                [
                    s.tokens_per_s / g.tokens_per_s
                    for s, g in zip(per["student"], per["generate"], strict=True)
                ]
            ),
            "prefill_s_per_token": {
                "student": median_rates["pf_s"],
                "teacher": median_rates["pf_t"],
            },
            "decode_s_per_token": {
                "student": median_rates["dec_s"],
                "teacher": median_rates["dec_t"],
            },
            "relay": [],
        }

        def relay_summary(
            runs: list[_Run],
            rates: list[dict[str, float]] = rates,
            median_rates: dict[str, float] = median_rates,
            per: dict = per,
        ) -> dict[str, Any]:
            tr = runs[0].traces
            floors = [_relay_floor(x.traces, rt) for x, rt in zip(runs, rates, strict=True)]
            parts = _floor_parts(tr, median_rates)
            n_teacher = sum(t.n_teacher for t in tr)
            return {
                **mode_summary(runs),
                "call_ratio": n_teacher / max(1, runs[0].tokens),
                "teacher_tokens": n_teacher,
                "handoffs": sum(t.calls for t in tr),
                "student_turns": sum(t.turns for t in tr),
                "student_prefill_tokens": sum(t.student_prefill_tokens for t in tr),
                "teacher_prefill_tokens": sum(t.teacher_prefill_tokens for t in tr),
                "floor_seconds": sum(parts.values()),
                "floor": parts,
                "relay_over_floor": _median(
                    [x.seconds / f for x, f in zip(runs, floors, strict=True)]
                ),
                "relay_over_teacher_only": _median(
                    [
                        x.tokens_per_s / t.tokens_per_s
                        for x, t in zip(runs, per["teacher"], strict=True)
                    ]
                ),
                "relay_over_student_only": _median(
                    [
                        x.tokens_per_s / s.tokens_per_s
                        for x, s in zip(runs, per["student"], strict=True)
                    ]
                ),
                "forwards": _forward_summary(runs),
            }

        for p in router_ps:
            row["relay"].append({"router_p": p, **relay_summary(relay[p])})
        row["calls"] = {"call_bias": bias_json(call_bias), **relay_summary(calls)}
        results.append(row)

    return {
        "config": {
            "pair": pair.describe(),
            "student": pair.student_source,
            "teacher": pair.teacher_source,
            "batch_sizes": list(batch_sizes),
            "router_ps": list(router_ps),
            "n_prompts": len(prompts),
            "prompt_tokens": prompt_tokens,
            "max_new_tokens": max_new_tokens,
            "bounds": bounds.relay_kwargs(),
            "chat_template": prompt.chat_template,
            "chat_template_kwargs": dict(prompt.chat_template_kwargs),
            **({"decoding_from": decoding_from} if decoding_from else {}),
            "call_bias": bias_json(call_bias),
            "call_bias_from": call_bias_from,
            "repeats": repeats,
            "schedule": schedule,
            "teacher_hold": teacher_hold,
            "refill": refill,
            "forward": {"student": s_back.fast, "teacher": t_back.fast},
            "threads": torch.get_num_threads(),
            "device": device,
            "sampling": "greedy",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def format_table(res: dict[str, Any]) -> str:
    """The results as text: one line per mode and batch size; relay lines give the requested
    p, the realised teacher share, and the floor with its parts (seconds)."""
    lines = []
    pair = res["config"].get("pair")
    if pair:
        s, t = pair["student"], pair["teacher"]
        lines += [
            f"pair {pair['name']}: student {_millions(s['parameters'])} parameters, teacher "
            f"{_millions(t['parameters'])} ({pair['teacher_over_student_parameters']:.1f}x; "
            f"matmul FLOPs per token {pair['teacher_over_student_flops_per_token']:.1f}x)",
            "",
        ]
    head = (
        f"{'batch':>5} {'mode':>8} {'p':>5} {'share':>6} {'tok/s':>8} {'seconds':>8} "
        f"{'floor s':>8} {'/floor':>7} {'/teach':>7} {'/stud':>6} "
        f"{'s dec':>7} {'t dec':>7} {'s pf':>7} {'t pf':>7}"
    )
    lines += [head, "-" * len(head)]
    for row in res["results"]:
        b = row["batch_size"]
        for name in ("student_only", "teacher_only", "generate"):
            m = row[name]
            extra = ""
            if name == "generate":
                extra = (
                    f"  student/generate {row['student_over_generate']:.2f}, same tokens "
                    f"{m['same_tokens_as_student_only']:.0%}"
                )
            lines.append(
                f"{b:>5} {name.split('_')[0]:>8} {'':>5} {'':>6} {m['tokens_per_s']:>8.0f} "
                f"{m['seconds']:>8.3f}{extra}"
            )
        rels = [("relay", format(r["router_p"], "g"), r) for r in row["relay"]]
        if "calls" in row:
            rels.append(("calls", "-", row["calls"]))
        for label, p, rel in rels:
            fl = rel["floor"]
            lines.append(
                f"{b:>5} {label:>8} {p:>5} {100 * rel['call_ratio']:>5.1f}% "
                f"{rel['tokens_per_s']:>8.0f} {rel['seconds']:>8.3f} {rel['floor_seconds']:>8.3f} "
                f"{rel['relay_over_floor']:>7.2f} {rel['relay_over_teacher_only']:>7.2f} "
                f"{rel['relay_over_student_only']:>6.2f} "
                + " ".join(f"{fl[k]:>7.3f}" for k in FLOOR_PARTS)
            )
            if "forwards" in rel:
                lines.append(f"{'':>5} {'':>8} {'':>5} {'':>6}  " + _forwards_line(rel["forwards"]))
        pf, dc = row["prefill_s_per_token"], row["decode_s_per_token"]
        lines.append(
            f"{b:>5} {'per tok':>8}  prefill s/t {1e3 * pf['student']:.3f}/"
            f"{1e3 * pf['teacher']:.3f} ms, decode s/t {1e3 * dc['student']:.3f}/"
            f"{1e3 * dc['teacher']:.3f} ms"
        )
    lines += [
        "",
        "p: requested router p; share: realised teacher share of the generated tokens; "
        "/floor, /teach, /stud: relay time over its floor, relay throughput over teacher-only "
        "and student-only (medians of per-repeat ratios); s dec, t dec, s pf, t pf: the floor's "
        "parts (student and teacher decode and prefill, seconds); s fwd, t fwd: each model's "
        "forwards in the relay run, rows per forward, tokens fed (padding included) and their "
        "seconds (medians over repeats).",
    ]
    return "\n".join(lines)


def _forwards_line(forwards: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{who[0]} fwd {f['forwards']:.0f} x {f['rows_per_forward']:.2f} rows, "
        f"{f['tokens']:.0f} tok, {f['seconds']:.3f} s"
        for who, f in forwards.items()
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments (see :func:`add_arguments`)."""
    import pandas as pd

    batch_sizes, router_ps = _ints(args.batch_sizes), _floats(args.router_ps)
    if not batch_sizes or min(batch_sizes) < 1:
        raise SystemExit("error: --batch-sizes needs positive integers")
    if any(not 0 <= p <= 1 for p in router_ps):
        raise SystemExit("error: --router-ps must lie in [0, 1]")
    if args.n_prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        raise SystemExit("error: --n-prompts, --max-new-tokens and --repeats must be >= 1")
    realistic = args.pair == "realistic"
    if realistic and (args.student is not None or args.teacher is not None):
        raise SystemExit(
            "error: --pair realistic is built in; --student/--teacher go with --pair micro"
        )
    from relaypipe.calibrate import resolve_command

    student_dir = args.student or DEFAULT_STUDENT
    try:
        if realistic:  # no folder, so no relay.json nor call_bias.json: flags or defaults
            with tempfile.TemporaryDirectory() as empty:
                decoding = resolve_command(empty, args)
        else:
            decoding = resolve_command(student_dir, args)
    except ValueError as err:  # a bound out of range, kwargs without a chat template
        raise SystemExit(f"error: {err}") from err
    if decoding.worth_a_note:
        print(f"relaypipe bench: {decoding.note()}", file=sys.stderr, flush=True)
    if args.problems is None and realistic:
        questions = builtin_questions(args.n_prompts)
    else:
        problems = args.problems or DEFAULT_PROBLEMS
        questions = list(pd.read_parquet(problems, columns=["question"])["question"])
        if not questions:
            raise SystemExit(f"error: no questions in {problems}")
    questions = [questions[i % len(questions)] for i in range(args.n_prompts)]
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if realistic:
            pair = build_realistic_pair(device=args.device)
        else:
            pair = load_pair(student_dir, args.teacher or DEFAULT_TEACHER, device=args.device)
        res = run_benchmark(
            pair,
            questions,
            batch_sizes=batch_sizes,
            router_ps=router_ps,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            device=args.device,
            progress=lambda m: print(m, file=sys.stderr, flush=True),
            bounds=decoding.bounds,
            prompt=decoding.prompt,
            decoding_from={"bounds": decoding.bounds_from, "prompt": decoding.prompt_from},
            call_bias=decoding.call_bias,
            call_bias_from=decoding.call_bias_from,
            schedule=args.schedule,
            teacher_hold=args.teacher_hold,
            forward=args.forward,
            refill=args.refill,
        )
    finally:
        torch.set_num_threads(threads)
    print(format_table(res))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, allow_nan=True) + "\n")
        print(f"wrote {args.out}")
    bad = [
        t
        for row in res["results"]
        for t in [
            row["student_over_generate"],
            *(r["relay_over_floor"] for r in [*row["relay"], row["calls"]]),
        ]
        if not math.isfinite(t)
    ]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaypipe bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
