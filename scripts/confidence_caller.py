"""An upper-bound probe: how much of the gap a *well-placed* caller could recover.

The student decodes greedily; whenever its own top probability falls below ``tau`` it hands the
next ``k`` tokens to the teacher (no command tokens, no training). If this recovers most of the
student->teacher gap at a small teacher share, the student's uncertainty marks its mistakes,
and what RelayLLM's training has to teach is to call exactly there.

    .venv/bin/python scripts/confidence_caller.py --tau 0.5 0.7 0.9 --k 1 --n 300

Prints one JSON line per (tau, k): accuracy, teacher share (teacher tokens / all generated).
Slow on purpose (no KV cache: every step re-reads the whole prefix); micro models only.
"""

from __future__ import annotations

import argparse
import json

import torch

from relaypipe.io import read_table
from relaypipe.models import load_model
from relaypipe.schemas import ProblemSchema, frame_to_problems
from relaypipe.tasks.base import format_prompt
from relaypipe.tasks.grading import is_correct


@torch.inference_mode()
def run(student, teacher, tok, problems, tau: float, k: int, max_new: int) -> dict:
    prompts = [tok(format_prompt(p.question), add_special_tokens=False).input_ids for p in problems]
    gen: list[list[int]] = [[] for _ in problems]
    owed, teacher_tokens, done = [0] * len(problems), [0] * len(problems), [False] * len(problems)
    for _ in range(max_new):
        rows = [p + g for p, g in zip(prompts, gen, strict=True)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: the last column is every row's next step
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        s_prob = student(input_ids=ids, attention_mask=mask).logits[:, -1].softmax(-1)
        t_next = teacher(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
        for i in range(len(rows)):
            if done[i]:
                continue
            if owed[i] == 0 and s_prob[i].max() < tau:
                owed[i] = k
            if owed[i]:
                token = int(t_next[i])
                owed[i] -= 1
                teacher_tokens[i] += 1
            else:
                token = int(s_prob[i].argmax())
            gen[i].append(token)
            done[i] = token == tok.eos_token_id
        if all(done):
            break
    texts = [tok.decode(g, skip_special_tokens=True) for g in gen]
    correct = [is_correct(t, p.answer) for t, p in zip(texts, problems, strict=True)]
    return {
        "tau": tau,
        "k": k,
        "n": len(problems),
        "accuracy": round(sum(correct) / len(problems), 4),
        "teacher_share": round(sum(teacher_tokens) / sum(map(len, gen)), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default="data/models/student")
    ap.add_argument("--teacher", default="data/models/teacher")
    ap.add_argument("--problems", default="data/problems/eval.parquet")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.7, 0.9])
    ap.add_argument("--k", type=int, nargs="+", default=[1])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = frame_to_problems(read_table(args.problems, ProblemSchema))[: args.n]
    student, tok = load_model(args.student)
    teacher, _ = load_model(args.teacher)
    for k in args.k:
        for tau in args.tau:
            result = run(student, teacher, tok, problems, tau, k, args.max_new_tokens)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
