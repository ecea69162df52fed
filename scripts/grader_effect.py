"""How much grading with command bodies left in changes a relay's accuracy.

Decodes every benchmark in relay mode once and grades each transcript two ways: as relaypipe
grades it (``reader_text``: call commands removed) and as it was graded before (decoded with
``skip_special_tokens``, which drops the tags but keeps the body, so ``Answer: <call>2</call>12``
reads ``Answer: 212``). Prints both accuracies and how many transcripts the two disagree on.

    .venv/bin/python scripts/grader_effect.py data/models/relay data/models/teacher \\
        data/problems/benchmarks --max-new-tokens 96 --max-call-tokens 8 --max-teacher-tokens 12
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
from relaypipe.tasks.grading import is_correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("teacher")
    parser.add_argument("benchmarks_dir")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-call-tokens", type=int, default=8)
    parser.add_argument("--max-teacher-tokens", type=int, default=12)
    parser.add_argument("--max-turns", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student, tok = load_model(args.student, device="cpu")
    teacher, _ = load_model(args.teacher, device="cpu")
    decoder = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tok)
    config = RelayConfig(
        mode="relay",
        max_new_tokens=args.max_new_tokens,
        max_call_tokens=args.max_call_tokens,
        max_teacher_tokens=args.max_teacher_tokens,
        max_turns=args.max_turns,
    )
    for path in sorted(Path(args.benchmarks_dir).glob("*.parquet")):
        graded = decode_problems(
            decoder, frame_to_problems(read_table(path, ProblemSchema)), config, batch_size=100
        )
        old = [
            is_correct(tok.decode(g.trace.token_ids, skip_special_tokens=True), g.problem.answer)
            for g in graded
        ]
        row = {
            "benchmark": path.stem,
            "n": len(graded),
            "accuracy": round(sum(g.correct for g in graded) / len(graded), 4),
            "accuracy_bodies_kept": round(sum(old) / len(graded), 4),
            "differ": sum(g.correct != o for g, o in zip(graded, old, strict=True)),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
