"""Relay decoding speed on a student/teacher pair: how close relay gets to its floor.

For every batch size the same prompts are decoded, in chunks of that size, in several ways:

* ``student`` / ``teacher``: one model writes everything (decoder modes ``student``/``teacher``);
* ``relay p``: decoder mode ``random_router`` with ``router_p = p`` (greedy), which hands a
  share of about ``p`` of the tokens to the teacher at random places;
* ``calls``: decoder mode ``relay``, greedy: the student's own calls, answered by the teacher,
  under the call bias (``--call-bias``, else the student's ``call_bias.json`` from
  ``relaypipe calibrate``, else 0); its teacher share is the student's, not a drawn one (an
  untrained student hardly calls);
* ``generate``: plain ``model.generate()`` of the student (left padding, attention mask,
  greedy, same ``max_new_tokens``), the reference for the student-only mode;
* ``prefill``: one backend call with ``max_new_tokens=1`` per chunk and model, which gives a
  per-token prefill time for each model.

The *floor* of a relay run is what its tokens would cost at the best per-token rates measured
in the same repeat and batch size: the student's tokens at the student-only decode rate, the
teacher's at the teacher-only rate, and every token a model had to prefill (what it had not
seen; the traces count them) at that model's prefill rate. Decode rates exclude the prompt
prefill: ``(student-only seconds - prompt tokens x prefill rate) / generated tokens``.

Timing on a shared machine is noisy: every mode runs once per repeat, repeats interleave the
modes, throughputs are medians over repeats and ratios are medians of per-repeat ratios.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from relaypipe.relay.backends import GenRequest, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.trace import RelayTrace

log = logging.getLogger(__name__)

DEFAULT_PROBLEMS = "data/problems/eval.parquet"
TARGET_P = 0.05
TARGET_BATCH = 8
TARGETS = {  # name: (bound, "max" | "min")
    "relay_over_floor": (1.25, "max"),
    "student_over_generate": (1.0, "min"),
    "relay_over_teacher_only": (3.0, "min"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``relaypipe bench`` and :func:`main`)."""
    p.add_argument("--student", default="data/models/student", help="student model directory")
    p.add_argument("--teacher", default="data/models/teacher", help="teacher model directory")
    p.add_argument("--problems", default=DEFAULT_PROBLEMS, help="parquet with a question column")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--router-ps", default="0,0.05,0.2", help="comma-separated random_router p")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts decoded per measurement")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_bound_arguments(p)
    add_prompt_arguments(p)
    add_call_bias_argument(p)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@dataclass
class _Run:
    seconds: float
    tokens: int  # generated tokens
    traces: list[RelayTrace]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _decode(dec: RelayDecoder, prompts: list[list[int]], batch: int, cfg: RelayConfig) -> _Run:
    traces: list[RelayTrace] = []
    t0 = time.perf_counter()
    for chunk in _chunks(prompts, batch):
        traces.extend(dec.decode(chunk, cfg))
    seconds = time.perf_counter() - t0
    return _Run(seconds, sum(t.n_generated for t in traces), traces)


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


def _relay_floor(tr: Sequence[RelayTrace], rates: dict[str, float]) -> float:
    return sum(
        t.n_student * rates["dec_s"]
        + t.n_teacher * rates["dec_t"]
        + t.student_prefill_tokens * rates["pf_s"]
        + t.teacher_prefill_tokens * rates["pf_t"]
        for t in tr
    )


def run_benchmark(
    student_dir: str,
    teacher_dir: str,
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
) -> dict[str, Any]:
    """Measure every mode for every batch size; returns the JSON-able results.

    ``bounds`` and ``prompt``: what every decode runs under and how questions are framed
    (``decoding_from``: where they came from, for the results' config); ``call_bias``: the
    bias of the ``calls`` decode (mode relay), ``call_bias_from`` where it came from."""
    from relaypipe.models import load_model
    from relaypipe.tasks.base import format_prompt

    student, tok = load_model(student_dir, device=device)
    teacher, _ = load_model(teacher_dir, device=device)
    s_back, t_back = TransformersBackend(student, name="student"), TransformersBackend(teacher)
    dec = RelayDecoder(s_back, t_back, tok)
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
            per["student"].append(_decode(dec, prompts, b, cfg("student")))
            per["teacher"].append(_decode(dec, prompts, b, cfg("teacher")))
            for p in router_ps:
                relay[p].append(_decode(dec, prompts, b, cfg("random_router", p)))
            calls.append(_decode(dec, prompts, b, cfg("relay")))
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
                "student": _median([x["pf_s"] for x in rates]),
                "teacher": _median([x["pf_t"] for x in rates]),
            },
            "decode_s_per_token": {
                "student": _median([x["dec_s"] for x in rates]),
                "teacher": _median([x["dec_t"] for x in rates]),
            },
            "relay": [],
        }

        def relay_summary(
            runs: list[_Run], rates: list[dict[str, float]] = rates, per: dict = per
        ) -> dict[str, Any]:
            tr = runs[0].traces
            floors = [_relay_floor(x.traces, rt) for x, rt in zip(runs, rates, strict=True)]
            n_teacher = sum(t.n_teacher for t in tr)
            return {
                **mode_summary(runs),
                "call_ratio": n_teacher / max(1, runs[0].tokens),
                "teacher_tokens": n_teacher,
                "handoffs": sum(t.calls for t in tr),
                "student_turns": sum(t.turns for t in tr),
                "student_prefill_tokens": sum(t.student_prefill_tokens for t in tr),
                "teacher_prefill_tokens": sum(t.teacher_prefill_tokens for t in tr),
                "floor_seconds": _median(floors),
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
            }

        for p in router_ps:
            row["relay"].append({"router_p": p, **relay_summary(relay[p])})
        row["calls"] = {"call_bias": bias_json(call_bias), **relay_summary(calls)}
        results.append(row)

    return {
        "config": {
            "student": student_dir,
            "teacher": teacher_dir,
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
            "threads": torch.get_num_threads(),
            "device": device,
            "sampling": "greedy",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": results,
        "targets": _targets(results),
    }


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, read at batch 8 (or the nearest measured) and p nearest 0.05."""
    if not results:
        return []
    row = min(results, key=lambda r: abs(r["batch_size"] - TARGET_BATCH))
    out = []
    values = {"student_over_generate": row["student_over_generate"]}
    if row["relay"]:
        rel = min(row["relay"], key=lambda x: abs(x["router_p"] - TARGET_P))
        values["relay_over_floor"] = rel["relay_over_floor"]
        values["relay_over_teacher_only"] = rel["relay_over_teacher_only"]
    for name, (bound, kind) in TARGETS.items():
        if name not in values:
            continue
        v = values[name]
        holds = v <= bound if kind == "max" else v >= bound
        out.append(
            {
                "name": name,
                "batch_size": row["batch_size"],
                "value": v,
                "bound": bound,
                "kind": kind,
                "holds": bool(holds),
            }
        )
    return out


def format_table(res: dict[str, Any]) -> str:
    head = (
        f"{'batch':>5} {'mode':>10} {'call%':>6} {'tok/s':>8} {'seconds':>8} {'floor s':>8} "
        f"{'/floor':>7} {'/teach':>7} {'/stud':>6}"
    )
    lines = [head, "-" * len(head)]
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
                f"{b:>5} {name.split('_')[0]:>10} {'':>6} {m['tokens_per_s']:>8.0f} "
                f"{m['seconds']:>8.3f}{extra}"
            )
        calls = [("calls", row["calls"])] if "calls" in row else []
        for label, rel in [
            ("relay " + format(r["router_p"], "g"), r) for r in row["relay"]
        ] + calls:
            lines.append(
                f"{b:>5} {label:>10} "
                f"{100 * rel['call_ratio']:>5.1f}% {rel['tokens_per_s']:>8.0f} "
                f"{rel['seconds']:>8.3f} {rel['floor_seconds']:>8.3f} "
                f"{rel['relay_over_floor']:>7.2f} {rel['relay_over_teacher_only']:>7.2f} "
                f"{rel['relay_over_student_only']:>6.2f}"
            )
        pf, dc = row["prefill_s_per_token"], row["decode_s_per_token"]
        lines.append(
            f"{b:>5} {'per token':>10}  prefill s/t {1e3 * pf['student']:.3f}/"
            f"{1e3 * pf['teacher']:.3f} ms, decode s/t {1e3 * dc['student']:.3f}/"
            f"{1e3 * dc['teacher']:.3f} ms"
        )
    lines.append("")
    for t in res["targets"]:
        op = "<=" if t["kind"] == "max" else ">="
        verdict = "holds" if t["holds"] else "MISSES"
        lines.append(
            f"target {t['name']} (batch {t['batch_size']}): {t['value']:.2f} {op} "
            f"{t['bound']:g}: {verdict}"
        )
    return "\n".join(lines)


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
    from relaypipe.calibrate import resolve_command

    try:
        decoding = resolve_command(args.student, args)
    except ValueError as err:  # a bound out of range, kwargs without a chat template
        raise SystemExit(f"error: {err}") from err
    if decoding.worth_a_note:
        print(f"relaypipe bench: {decoding.note()}", file=sys.stderr, flush=True)
    questions = list(pd.read_parquet(args.problems, columns=["question"])["question"])
    if not questions:
        raise SystemExit(f"error: no questions in {args.problems}")
    questions = [questions[i % len(questions)] for i in range(args.n_prompts)]
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        res = run_benchmark(
            args.student,
            args.teacher,
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
