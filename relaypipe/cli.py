"""The ``relaypipe`` command line.

    relaypipe decode --student data/models/student --teacher data/models/teacher \\
        --prompt "3+4+8+1+9+2"

prints each answer with the teacher's tokens marked ⟦like this⟧ and a one-line summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from relaypipe import cli_bench, cli_import, cli_serve
from relaypipe.relay.backends import Sampling, TransformersBackend
from relaypipe.relay.decoder import MODES, RelayConfig, RelayDecoder
from relaypipe.tasks.base import format_prompt


def _decode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="relay-decode prompts between a student and a teacher")
    p.add_argument("--student", required=True, help="student model directory (or hub id)")
    cli_serve.add_teacher_arguments(p, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a question (repeatable)")
    src.add_argument("--prompts-file", type=Path, help="a text file, one question per line")
    p.add_argument(
        "--raw", action="store_true", help="send prompts as-is, without the Q:/A: template"
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="frame each question with the student tokenizer's chat template (as the stages' "
        "chat_template: true does)",
    )
    p.add_argument(
        "--chat-template-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="variables for the chat template, e.g. '{\"enable_thinking\": false}' for Qwen3 "
        "(the stages' chat_template_kwargs); needs --chat-template",
    )
    p.add_argument("--mode", choices=MODES, default="relay")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-turns", type=int, default=32)
    p.add_argument("--max-call-tokens", type=int, default=64)
    p.add_argument("--max-teacher-tokens", type=int, default=None, help="per-request budget")
    p.add_argument("--max-calls", type=int, default=None, help="per-request call budget")
    p.add_argument("--router-p", type=float, default=0.1, help="random_router probability")
    p.add_argument("--fixed-n", type=int, default=8, help="fixed_help tokens per call")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON trace per line instead")


def _json_object(text: str) -> dict:
    """argparse type: a JSON object (``{"enable_thinking": false}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"a\": 1}}', got {text!r}"
        )
    return value


def _read_questions(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        questions = args.prompt
    else:
        if not args.prompts_file.is_file():
            raise SystemExit(f"error: --prompts-file {args.prompts_file} does not exist")
        questions = [ln for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not questions:
        raise SystemExit("error: no prompts given")
    return questions


def _prompts(args: argparse.Namespace, questions: list[str], tok: Any) -> list[str]:
    """The questions as the stages frame them (``--raw``: as given)."""
    if args.raw:
        return questions
    return [
        format_prompt(
            q,
            tok,
            chat_template=args.chat_template,
            chat_template_kwargs=args.chat_template_kwargs,
        )
        for q in questions
    ]


def cmd_decode(args: argparse.Namespace) -> int:
    from relaypipe.models import load_model
    from relaypipe.render import render_trace, summary_line

    if args.chat_template_kwargs and not args.chat_template:
        raise SystemExit("error: --chat-template-kwargs needs --chat-template")
    if args.raw and args.chat_template:
        raise SystemExit("error: --raw sends prompts as-is; drop --chat-template or --raw")
    questions = _read_questions(args)
    try:
        cfg = RelayConfig(
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            max_turns=args.max_turns,
            max_call_tokens=args.max_call_tokens,
            max_teacher_tokens=args.max_teacher_tokens,
            max_calls=args.max_calls,
            router_p=args.router_p,
            fixed_n=args.fixed_n,
            student_sampling=Sampling(temperature=args.temperature),
            teacher_sampling=Sampling(temperature=args.temperature),
            seed=args.seed,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    student, tok = load_model(args.student, device=args.device)
    prompts = _prompts(args, questions, tok)
    teacher = cli_serve.build_teacher(args, tok)
    decoder = RelayDecoder(TransformersBackend(student), teacher, tok, cfg)
    colour = sys.stdout.isatty() and not args.json
    for prompt, trace in zip(prompts, decoder.decode_text(prompts), strict=True):
        if args.json:
            row = dataclasses.asdict(trace)
            from relaypipe.tasks.grading import reader_text

            row["text"] = reader_text(tok, trace.token_ids)
            print(json.dumps(row))
        else:
            print(prompt + render_trace(trace, tok, colour=colour))
            print(summary_line(trace))
            print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaypipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _decode_parser(sub)
    cli_serve.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_import.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from relaypipe.relay.http_backend import TeacherUnavailable

    try:
        commands = {
            "decode": cmd_decode,
            "serve": cli_serve.run,
            "bench": cli_bench.run,
            "import": cli_import.run,
        }
        return commands[args.command](args)
    except (TeacherUnavailable, OSError) as err:  # a clear line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
