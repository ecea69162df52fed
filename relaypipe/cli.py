"""The ``relaypipe`` command line.

    relaypipe decode --student data/models/student --teacher data/models/teacher \\
        --prompt "3+4+8+1+9+2"

prints each answer with the teacher's tokens marked ⟦like this⟧ and a one-line summary. Either
model may be a server instead (``--teacher-url``/``--teacher-model``;
``--student-url``/``--student-model`` with ``--student-tokenizer``, the local folder holding
the served student's tokenizer; see :mod:`relaypipe.student`).

A student that a training stage wrote (``data/models/relay``, ``data/models/warmup``) carries
``relay.json``: the bounds and prompt format it was trained with. ``decode``, ``serve`` and
``bench`` default to those (each flag overrides its part; see :mod:`relaypipe.bounds`), and
decode says so on stderr; a student without the file gets the decoder's defaults and the plain
``Q:/A:`` prompt.

The call bias (``--call-bias``, a logit bias on the student's ``<call>``) defaults likewise to
the student folder's ``call_bias.json``, which ``relaypipe calibrate`` writes (else 0); decode
says which bias it used and where it came from on the same line.

Bad input (a missing model directory, an option value a command refuses, an unreachable
teacher server) is reported in a line or two on stderr with exit status 2; ``-v`` adds the
full traceback (as ``RELAYPIPE_TRACEBACK=1`` does). See :mod:`relaypipe.errors`.

``relaypipe --help`` and every subcommand's ``--help`` import neither torch nor transformers:
each command imports what it needs when it runs (tests/test_cli_fast.py checks this).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from relaypipe import cli_bench, cli_calibrate, cli_import, errors
from relaypipe.bounds import (
    add_bound_arguments,
    add_call_bias_argument,
    add_prompt_arguments,
    join_negative_values,
)

PROG = "relaypipe"

# relaypipe.relay.decoder.MODES, spelled out so that --help need not import the decoder
# (torch); tests/test_cli_fast.py checks that the two agree.
DECODE_MODES = ("relay", "student", "teacher", "random_router", "fixed_help")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to speak of: a
    required option, or one of a required either/or group (marked by :func:`finish_parser`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required or getattr(action, "no_default", False) or "(default" in help_text:
            return help_text  # nothing to add: no default, or the text says it in words
        return super()._get_help_string(action) or ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with :class:`HelpFormatter` unless told otherwise, so the
    subcommands' parsers (``sub.add_parser``, in other modules too) show defaults as well."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """A bad argument: the message and a pointer to ``--help``; the usage only when it is
        short (decode's and serve's run to 20 lines, which would bury the message)."""
        usage = self.format_usage()
        if usage.count("\n") <= 2:
            self.exit(errors.EXIT_INPUT, f"{usage}{self.prog}: error: {message}\n")
        hint = f"('{self.prog} --help' lists the options)"
        self.exit(errors.EXIT_INPUT, f"{self.prog}: error: {message}\n{hint}\n")


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every option of ``parser`` and its subcommands show its default in ``--help``.

    A parser made with another formatter (serve's keeps its description's line breaks) gets
    :class:`HelpFormatter` mixed in. An option given no help text at all would show nothing
    (argparse prints help text only where there is some), so it gets one that is just its
    default; the options of a required either/or group (``--prompt`` | ``--prompts-file``)
    show none, having no default. Every subcommand also takes ``-v`` after its name.
    """
    if not issubclass(parser.formatter_class, HelpFormatter):  # e.g. a RawDescription one
        parser.formatter_class = type(
            f"HelpFormatterWith{parser.formatter_class.__name__}",
            (HelpFormatter, parser.formatter_class),
            {},
        )
    for group in parser._mutually_exclusive_groups:
        if group.required:
            for action in group._group_actions:
                action.no_default = True  # type: ignore[attr-defined]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                if "-v" not in sub._option_string_actions:  # `relaypipe decode ... -v` too
                    sub.add_argument(
                        "-v",
                        "--verbose",
                        action="store_true",
                        default=argparse.SUPPRESS,  # absent: what `relaypipe [-v]` said
                        help=f"as '{parser.prog} -v' (default: off)",
                    )
                finish_parser(sub)
        elif (
            action.option_strings
            and not action.help
            and action.help is not argparse.SUPPRESS
            and not (action.required or getattr(action, "no_default", False))
        ):
            action.help = "(default: %(default)s)"
    return parser


def _decode_parser(
    sub: argparse._SubParsersAction,
    add_teacher_arguments: Callable,
    add_student_arguments: Callable,
) -> None:
    p = sub.add_parser(
        "decode",
        help="relay-decode prompts between a student and a teacher",
        description="Decode prompts with a student that hands tokens to a teacher when it "
        "writes a call, and print each answer with the teacher's tokens marked.",
    )
    add_student_arguments(p, required=True)
    add_teacher_arguments(p, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a question (repeatable)")
    src.add_argument("--prompts-file", type=Path, help="a text file, one question per line")
    p.add_argument(
        "--raw", action="store_true", help="send prompts as-is, without any prompt template"
    )
    add_prompt_arguments(p)
    p.add_argument(
        "--mode",
        choices=DECODE_MODES,
        default="relay",
        help="relay: the student calls the teacher; student, teacher: one model alone; "
        "random_router: each token the teacher's with probability --router-p; fixed_help: "
        "every call granted --fixed-n tokens",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="generated tokens per prompt, in all"
    )
    add_bound_arguments(p)
    add_call_bias_argument(p)
    p.add_argument("--router-p", type=float, default=0.1, help="random_router probability")
    p.add_argument("--fixed-n", type=int, default=8, help="fixed_help tokens per call")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling and router seed")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when there is one)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON trace per line instead")


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


def _prompts(args: argparse.Namespace, questions: list[str], tok: Any, prompt: Any) -> list[str]:
    """The questions framed as ``prompt`` (a PromptFormat) says (``--raw``: as given)."""
    from relaypipe.tasks.base import format_prompt

    if args.raw:
        return questions
    return [format_prompt(q, tok, **prompt.format_kwargs()) for q in questions]


def resolve_decoding(args: argparse.Namespace, student: str, prog: str) -> Any:
    """The bounds, prompt format and call bias for ``student`` (flags, else its relay.json and
    call_bias.json, else the defaults): :func:`relaypipe.calibrate.resolve_command`, errors as
    brief exits; one line on stderr says what came from where (nothing when all are defaults)."""
    from relaypipe.calibrate import resolve_command

    try:
        decoding = resolve_command(student, args)
    except ValueError as err:  # a bound out of range, kwargs without a chat template
        raise SystemExit(f"error: {err}") from err
    if decoding.worth_a_note:
        note = decoding.note()
        if getattr(args, "raw", False):  # the recorded prompt format goes unused
            note = note.replace(
                f"prompts framed as {decoding.prompt.describe()} ({decoding.prompt_from})",
                "prompts sent as given (--raw)",
            )
        print(f"{prog}: {note}", file=sys.stderr)
    return decoding


def cmd_decode(args: argparse.Namespace) -> int:
    if args.raw and (args.chat_template or args.chat_template_kwargs is not None):
        raise SystemExit("error: --raw sends prompts as-is; drop --chat-template(-kwargs) or --raw")
    questions = _read_questions(args)
    from relaypipe import cli_serve

    folder = cli_serve.student_folder(args)  # --student, or --student-url's tokenizer folder
    decoding = resolve_decoding(args, folder, f"{PROG} decode")

    from relaypipe.relay.decoder import RelayConfig, RelayDecoder
    from relaypipe.relay.sampling import Sampling
    from relaypipe.render import render_trace, summary_line

    try:
        cfg = RelayConfig(
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            **decoding.bounds.relay_kwargs(),
            router_p=args.router_p,
            fixed_n=args.fixed_n,
            student_sampling=Sampling(temperature=args.temperature),
            teacher_sampling=Sampling(temperature=args.temperature),
            seed=args.seed,
            call_bias=decoding.call_bias,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    student = cli_serve.build_student(args)
    tok = student.tokenizer
    prompts = _prompts(args, questions, tok, decoding.prompt)
    teacher = cli_serve.build_teacher(args, tok)
    decoder = RelayDecoder(student.backend, teacher, tok, cfg)
    colour = sys.stdout.isatty() and not args.json
    with student:
        traces = decoder.decode_text(prompts)
    for prompt, trace in zip(prompts, traces, strict=True):
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


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every subcommand registered (for ``--help`` and parsing)."""
    # cli_serve holds the teacher options decode shares with serve; it is the one module here
    # that its own maintainers keep light (no torch at import), see tests/test_cli_fast.py.
    from relaypipe import cli_serve

    parser = ArgumentParser(
        prog=PROG,
        description="Token-level collaborative decoding (RelayLLM) between a small student and a "
        "large teacher model: decode prompts, serve the relay, benchmark it, calibrate the "
        "student's call bias to a teacher budget, import models.",
        epilog=f"Bad input is reported in a line or two with exit status {errors.EXIT_INPUT}; "
        f"-v or {errors.TRACEBACK_ENV}=1 adds the traceback. 'relaypipe COMMAND --help' "
        "lists a command's options.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress (INFO), and show the traceback of bad input too (as "
        f"{errors.TRACEBACK_ENV}=1 does)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _decode_parser(sub, cli_serve.add_teacher_arguments, cli_serve.add_student_arguments)
    cli_serve.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_calibrate.add_parser(sub, cli_serve.add_teacher_arguments)
    cli_import.add_parser(sub)
    return finish_parser(parser)


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs subcommand ``name``."""
    if name == "decode":
        return cmd_decode
    if name == "serve":
        from relaypipe import cli_serve

        return cli_serve.run
    return {"bench": cli_bench.run, "calibrate": cli_calibrate.run, "import": cli_import.run}[name]


# options whose values may start with a dash ("--call-bias -inf"): see join_negative_values
NUMBER_FLAGS = ("--call-bias", "--lo", "--hi")


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv), NUMBER_FLAGS)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    run = command(args.command)
    return errors.run_main(lambda: run(args), prog=f"{PROG} {args.command}", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
