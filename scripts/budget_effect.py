"""Why long problems recover less of the gap: the per-request teacher budget, measured.

Decodes every benchmark in relay mode with one trained relay student and several values of
``max_teacher_tokens`` (the per-request budget grpo trained and evaluate decodes with), and, for
the trained budget, splits the requests by whether they spent the whole budget. Prints one JSON
line per (benchmark, budget): accuracy, teacher share, the share of requests that spent the
budget and their accuracy against the others'. No retraining: the student is the one trained
under the first budget given.

    .venv/bin/python scripts/budget_effect.py data/models/relay data/models/teacher \\
        data/problems/benchmarks --budgets 12,24,48,none --max-new-tokens 96 --max-call-tokens 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from relaypipe.evaluate.run import decode_problems
from relaypipe.io import read_table
from relaypipe.models import load_model
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import ProblemSchema, frame_to_problems


def _budget(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("teacher")
    parser.add_argument("benchmarks_dir")
    parser.add_argument("--budgets", default="12,24,none", help="max_teacher_tokens values")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-call-tokens", type=int, default=8)
    parser.add_argument("--max-turns", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="problems per benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student, tok = load_model(args.student, device="cpu")
    teacher, _ = load_model(args.teacher, device="cpu")
    decoder = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tok)
    for path in sorted(Path(args.benchmarks_dir).glob("*.parquet")):
        problems = frame_to_problems(read_table(path, ProblemSchema))[: args.limit]
        for budget in map(_budget, args.budgets.split(",")):
            config = RelayConfig(
                mode="relay",
                max_new_tokens=args.max_new_tokens,
                max_call_tokens=args.max_call_tokens,
                max_teacher_tokens=budget,
                max_turns=args.max_turns,
            )
            graded = decode_problems(decoder, problems, config, batch_size=100)
            teacher = sum(g.trace.n_teacher for g in graded)
            total = sum(g.trace.n_generated for g in graded)
            row = {
                "benchmark": path.stem,
                "max_teacher_tokens": budget,
                "n": len(graded),
                "accuracy": round(sum(g.correct for g in graded) / len(graded), 4),
                "teacher_share": round(teacher / max(1, total), 4),
                "calls_per_request": round(sum(g.trace.calls for g in graded) / len(graded), 3),
            }
            if budget is not None:
                spent = [g for g in graded if g.trace.n_teacher >= budget]
                rest = [g for g in graded if g.trace.n_teacher < budget]
                row["spent_budget"] = round(len(spent) / len(graded), 4)
                row["accuracy_spent"] = (
                    round(sum(g.correct for g in spent) / len(spent), 4) if spent else None
                )
                row["accuracy_rest"] = (
                    round(sum(g.correct for g in rest) / len(rest), 4) if rest else None
                )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
