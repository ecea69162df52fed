r"""An upper-bound probe: how much of the gap a *well-placed* caller could recover.

The student decodes greedily; whenever its own top probability falls below ``tau`` it hands the
next ``k`` tokens to the teacher (no training). If this recovers most of the
student->teacher gap at a small teacher share, the student's uncertainty marks its mistakes,
and what RelayLLM's training has to teach is to call exactly there.

By default the hand-off leaves no trace in the student's context. ``--commands-in-view`` puts
``<call>k</call>`` before the teacher's tokens in the student's context (the teacher's view
stays clean), as a RelayLLM student sees its own calls: the difference between the two runs is
what reading past its own commands costs this student.

    .venv/bin/python scripts/confidence_caller.py --tau 0.5 0.7 0.9 --k 1 --n 300
    .venv/bin/python scripts/confidence_caller.py --tau 0.6 --n 200 --commands-in-view
    .venv/bin/python scripts/confidence_caller.py --tau 0.6 --n 200 --commands-in-view \
        --commands-take-no-position

``--oracle REGEX`` replaces the student's uncertainty by knowledge of where it is wrong: it calls
wherever a match of REGEX starts in the reference solution, as long as the answer so far follows
that solution (e.g. ``(?<=\+)[78]=`` for the default student, which never saw a step adding 7
or 8). ``--tau`` is then ignored.

The pipeline has a generic oracle that needs no such pattern: ``evaluate.oracle_sweep``
(relaypipe/evaluate/oracle.py) lets the teacher judge every step and write where it would have
written another token, a curve over thresholds that the report sets beside the relay's.

``--commands-take-no-position`` gives command tokens the position of the next text token (RoPE
position ids that skip them), so the text keeps its offsets: does position alone explain the cost?

Prints one JSON line per (tau, k): accuracy, teacher share (teacher tokens / all generated).
Slow on purpose (no KV cache: every step re-reads the whole prefix); micro models only.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from relaypipe.io import read_table
from relaypipe.models import load_model
from relaypipe.relay.grammar import format_call
from relaypipe.schemas import ProblemSchema, frame_to_problems
from relaypipe.tasks.base import format_prompt
from relaypipe.tasks.grading import is_correct


def _skip_command_positions(row: list[int], open_id: int, close_id: int) -> list[int]:
    """Position ids that do not advance inside ``<call>...</call>``."""
    out, pos, inside = [], 0, False
    for t in row:
        inside = inside or t == open_id
        out.append(pos)
        if not inside:
            pos += 1
        inside = inside and t != close_id
    return out


def _left_padded(
    prompts, rows, pad_id: int, skip: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded batch: the last column is every row's next step. ``skip``: the command's
    (open, close) ids, whose span then takes no positions."""
    full = [p + r for p, r in zip(prompts, rows, strict=True)]
    width = max(map(len, full))
    ids = torch.full((len(full), width), pad_id)  # [B, L]
    mask = torch.zeros((len(full), width), dtype=torch.long)  # [B, L]
    for i, row in enumerate(full):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if skip is not None:
        positions = torch.zeros((len(full), width), dtype=torch.long)  # [B, L]
        for i, row in enumerate(full):
            positions[i, width - len(row) :] = torch.tensor(_skip_command_positions(row, *skip))
        batch["position_ids"] = positions
    return batch


@torch.inference_mode()
def run(
    student,
    teacher,
    tok,
    problems,
    tau: float | None,
    k: int,
    max_new: int,
    commands_in_view: bool,
    no_position: bool = False,
    oracle: re.Pattern[str] | None = None,
) -> dict:
    # With an oracle: the character offsets where a hard span starts in each reference solution.
    hard_starts = [
        {m.start() for m in oracle.finditer(p.solution)} if oracle else set() for p in problems
    ]
    prompts = [tok(format_prompt(p.question), add_special_tokens=False).input_ids for p in problems]
    gen: list[list[int]] = [[] for _ in problems]  # the transcript (the teacher's view)
    view: list[list[int]] = [[] for _ in problems]  # the student's view
    command = tok(format_call(k), add_special_tokens=False).input_ids
    owed, teacher_tokens, done = [0] * len(problems), [0] * len(problems), [False] * len(problems)
    for _ in range(max_new):
        skip = (command[0], command[-1]) if no_position else None
        s_batch = _left_padded(prompts, view, tok.pad_token_id, skip)
        s_prob = student(**s_batch).logits[:, -1].softmax(-1)
        t_next = teacher(**_left_padded(prompts, gen, tok.pad_token_id)).logits[:, -1].argmax(-1)
        for i in range(len(gen)):
            if done[i]:
                continue
            if oracle is not None:
                written = tok.decode(gen[i], skip_special_tokens=True)
                stuck = len(written) in hard_starts[i] and problems[i].solution.startswith(written)
            else:
                stuck = bool(s_prob[i].max() < tau)
            if owed[i] == 0 and stuck:
                owed[i] = k
                if commands_in_view:
                    view[i] += command
            if owed[i]:
                token = int(t_next[i])
                owed[i] -= 1
                teacher_tokens[i] += 1
            else:
                token = int(s_prob[i].argmax())
            gen[i].append(token)
            view[i].append(token)
            done[i] = token == tok.eos_token_id
        if all(done):
            break
    texts = [tok.decode(g, skip_special_tokens=True) for g in gen]
    correct = [is_correct(t, p.answer) for t, p in zip(texts, problems, strict=True)]
    return {
        "tau": None if oracle else tau,
        "oracle": oracle.pattern if oracle else None,
        "k": k,
        "commands_in_view": commands_in_view,
        "commands_take_no_position": no_position,
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
    ap.add_argument(
        "--commands-in-view",
        action="store_true",
        help="show the student <call>k</call> before each hand-off, as the relay does",
    )
    ap.add_argument(
        "--oracle",
        metavar="REGEX",
        help="call where REGEX matches the reference solution instead of when unsure",
    )
    ap.add_argument(
        "--commands-take-no-position",
        action="store_true",
        help="with --commands-in-view: position ids that skip the command tokens",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = frame_to_problems(read_table(args.problems, ProblemSchema))[: args.n]
    student, tok = load_model(args.student)
    teacher, _ = load_model(args.teacher)
    oracle = re.compile(args.oracle) if args.oracle else None
    for k in args.k:
        for tau in [None] if oracle else args.tau:
            result = run(
                student,
                teacher,
                tok,
                problems,
                tau,
                k,
                args.max_new_tokens,
                args.commands_in_view,
                args.commands_take_no_position,
                oracle,
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
