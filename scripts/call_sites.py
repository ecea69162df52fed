"""Where does a relay student call? Checks its calls against the steps it is known not to know.

The default micro student is weak by a knowledge gap (``bootstrap.student_train.withhold``:
it never saw a step that adds 7 or 8), so the tokens it cannot write are known in advance. This
script relay-decodes eval problems and matches ``--hard`` (a regular expression over the
teacher's view of each answer, e.g. the operand and sum of such a step) against who wrote
every character:

* ``hard_spans``: matches of ``--hard`` in all answers;
* ``hard_started_by_teacher``: share of them whose first character the teacher wrote (a call
  placed in time: the student never had to write the token it does not know);
* ``teacher_chars_on_hard``: share of the teacher's characters that fall inside a hard span
  (how much of the borrowed text was needed).

    .venv/bin/python scripts/call_sites.py --student data/models/relay --n 300

Prints one JSON line. Works with any tokenizer (token texts are decoded one by one).
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from relaypipe.evaluate.call_sites import call_sites
from relaypipe.evaluate.run import decode_problems, summarize
from relaypipe.io import read_table
from relaypipe.models import load_model
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import ProblemSchema, frame_to_problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default="data/models/relay")
    ap.add_argument("--teacher", default="data/models/teacher")
    ap.add_argument("--problems", default="data/problems/eval.parquet")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument(
        "--hard",
        default=r"(?<=\+)[78]=\d+",
        help="regex over the answer text: the spans the student cannot write (default: the "
        "operand and sum of a step adding 7 or 8)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-call-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = frame_to_problems(read_table(args.problems, ProblemSchema))[: args.n]
    student, tok = load_model(args.student)
    teacher, _ = load_model(args.teacher)
    decoder = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tok)
    config = RelayConfig(
        mode="relay", max_new_tokens=args.max_new_tokens, max_call_tokens=args.max_call_tokens
    )
    graded = decode_problems(decoder, problems, config, batch_size=100)
    result = {"student": args.student, "n": len(problems), **summarize(graded)}
    result |= call_sites([g.trace for g in graded], tok, re.compile(args.hard))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
