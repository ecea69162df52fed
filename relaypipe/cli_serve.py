"""``relaypipe serve``: the command-line face of :mod:`relaypipe.serve`.

    relaypipe serve --model data/models/teacher --name teacher            # one model
    relaypipe serve --student data/models/student --teacher data/models/teacher   # the relay
    relaypipe serve --student data/models/student \\
        --teacher-url http://gpu-box:8000/v1 --teacher-model Qwen/Qwen3-8B --teacher-format text
    relaypipe serve --student-url http://gpu-a:8001/v1 --student-model student \\
        --student-tokenizer data/models/relay \\
        --teacher-url http://gpu-b:8000/v1 --teacher-model teacher      # a stateless proxy

The student, like the teacher, is a model directory (in-process) or a server
(``--student-url``/``--student-model``, speaking token ids in the tokenizer of
``--student-tokenizer``, a local folder that must hold the ``<call>``/``</call>`` tokens; see
:mod:`relaypipe.student`). With both behind URLs the relay server loads no model: it holds no
state between requests and only routes tokens between the two servers.

The API key is read from an environment variable (``--api-key-env``, default
``RELAYPIPE_API_KEY``) rather than a flag, so it never shows up in the process list; when
that variable is unset the server accepts every request, which is why it binds loopback by
default.

Every operator option that bounds a request's work is a ceiling: a request may ask for less,
never more (over the cap: a 400 naming the field), and a request that leaves the field out or
sends ``null`` gets the operator's value, never "unbounded" (see :data:`LIMITS_HELP`).

A student folder with ``relay.json`` (written by grpo/sft, see :mod:`relaypipe.bounds`) sets the
relay caps a flag leaves out to the bounds it was trained under, and string prompts are framed
as questions in its recorded prompt format (``--no-frame-prompts``: sent as they are); both are
logged at start-up and shown in ``/v1/models`` (the card's ``relay`` field).

The call bias (``--call-bias``, a logit bias on the student's ``<call>``) defaults to the
student folder's ``call_bias.json`` (``relaypipe calibrate`` writes it), else 0; it is the
bias of requests that name none, and a request's ``relay.call_bias`` replaces it (a knob, not a
budget: the teacher budgets above still cap what any bias can buy). The card shows it
(``call_bias``, ``"inf"``/``"-inf"`` for the infinite ones, and ``call_bias_from``).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from relaypipe.bounds import add_bound_arguments, add_call_bias_argument, add_prompt_arguments
from relaypipe.cli_args import int_at_least, probability

if TYPE_CHECKING:  # the CLI's --help must not import torch, transformers or the server
    from starlette.applications import Starlette

log = logging.getLogger(__name__)


def add_server_arguments(
    group: Any,
    role: str,
    *,
    required: bool,
    dir_help: str,
    choice: Any = None,
    timeout_s: float = 60.0,
    concurrency: int = 8,
    text_and_skip: bool = True,
) -> None:
    """A model given as ``--ROLE DIR`` (in-process) or ``--ROLE-url URL`` (a server), and the
    options of the URL: ``--ROLE-model``, ``--ROLE-api-key-env``, ``--ROLE-timeout``,
    ``--ROLE-retries``, ``--ROLE-concurrency``, and with ``text_and_skip`` (the teacher; a
    student has neither choice) ``--ROLE-format`` and ``--on-ROLE-failure``. ``choice``: the
    mutually exclusive group the two forms join (a new one, required or not, by default).
    Read back with :func:`http_options` and :func:`check_server_flags`."""
    either = choice or group.add_mutually_exclusive_group(required=required)
    either.add_argument(f"--{role}", help=dir_help)
    either.add_argument(f"--{role}-url", help=f"an OpenAI-compatible server for the {role}")
    group.add_argument(f"--{role}-model", help=f"model name at --{role}-url")
    if text_and_skip:
        group.add_argument(f"--{role}-format", choices=("tokens", "text"), default="tokens")
    group.add_argument(f"--{role}-api-key-env", default=None, help="env var with its key")
    group.add_argument(f"--{role}-timeout", type=float, default=timeout_s)
    group.add_argument(f"--{role}-retries", type=int, default=3)
    group.add_argument(f"--{role}-concurrency", type=int, default=concurrency)
    if text_and_skip:
        group.add_argument(f"--on-{role}-failure", choices=("fail", "skip"), default="skip")


def add_teacher_arguments(group: Any, *, required: bool) -> None:
    """The teacher options shared by ``decode`` and ``serve``: in-process or behind a URL."""
    add_server_arguments(
        group, "teacher", required=required, dir_help="teacher model directory (in-process)"
    )


def add_student_arguments(group: Any, *, required: bool, choice: Any = None) -> None:
    """The student options shared by ``decode`` and ``serve``: ``--student DIR`` or
    ``--student-url`` with ``--student-model`` and ``--student-tokenizer`` (module
    :mod:`relaypipe.student`)."""
    add_server_arguments(
        group,
        "student",
        required=required,
        choice=choice,
        dir_help="student model directory (in-process; or a hub id)",
        text_and_skip=False,
    )
    group.add_argument(
        "--student-tokenizer",
        help="with --student-url: a local folder with the served student's tokenizer, "
        "<call>/</call> included (its own model folder; its relay.json and call_bias.json "
        "are read too)",
    )


def check_server_flags(args: argparse.Namespace, role: str) -> None:
    """A URL needs a model name and vice versa (a brief exit naming the flags)."""
    url, model = getattr(args, f"{role}_url"), getattr(args, f"{role}_model")
    if url and not model:
        raise SystemExit(
            f"error: --{role}-url needs --{role}-model (the model name the server serves)"
        )
    if model and not url:
        raise SystemExit(f"error: --{role}-model is only used with --{role}-url")


def http_options(args: argparse.Namespace, role: str) -> Any:
    """The :class:`~relaypipe.remote.HTTPOptions` of ``role``'s URL flags (a student speaks
    token ids and fails on a failure: it has no flags for either)."""
    from relaypipe.remote import HTTPOptions

    return HTTPOptions(
        prompt_format=getattr(args, f"{role}_format", "tokens"),
        api_key_env=getattr(args, f"{role}_api_key_env"),
        timeout_s=getattr(args, f"{role}_timeout"),
        max_retries=getattr(args, f"{role}_retries"),
        concurrency=getattr(args, f"{role}_concurrency"),
        on_failure=getattr(args, f"on_{role}_failure", "fail"),
    )


def student_folder(args: argparse.Namespace) -> str:
    """The local folder of the student: ``--student``, or with ``--student-url`` its
    ``--student-tokenizer`` (where relay.json and call_bias.json are looked for too); a brief
    exit naming the flags when they do not fit together."""
    check_server_flags(args, "student")
    tokenizer = getattr(args, "student_tokenizer", None)
    if args.student_url:
        if not tokenizer:
            raise SystemExit(
                "error: --student-url needs --student-tokenizer DIR: a local folder with the "
                "served student's tokenizer, its <call>/</call> tokens included (the student's "
                "own model folder)"
            )
        return tokenizer
    if tokenizer:
        raise SystemExit(
            "error: --student-tokenizer is only used with --student-url (a --student "
            "directory has its own tokenizer)"
        )
    return args.student


def build_student(args: argparse.Namespace) -> Any:
    """The student the arguments describe (a :class:`relaypipe.student.Student`), through
    :func:`relaypipe.student.build_student`; a served one is checked against the server's
    model list and its tokenizer folder for the call tokens."""
    from relaypipe.student import build_student as student_factory

    folder = student_folder(args)
    try:
        return student_factory(
            folder,
            url=args.student_url,
            model_name=args.student_model,
            http=http_options(args, "student") if args.student_url else None,
            device=args.device,
            dtype=getattr(args, "dtype", "auto"),
            what="--student-tokenizer",
        )
    except ValueError as err:  # bad options, a tokenizer without the call tokens
        raise SystemExit(f"error: {err}") from err


def build_teacher(args: argparse.Namespace, tok: Any) -> Any:
    """The teacher backend the arguments describe, through :func:`relaypipe.teacher.build_teacher`
    (the factory the stages use): checked against the server's model list when remote, against
    the student's tokenizer when in-process."""
    from relaypipe.teacher import build_teacher as teacher_factory

    check_server_flags(args, "teacher")
    try:
        teacher = teacher_factory(
            args.teacher,
            tok,
            url=args.teacher_url,
            model_name=args.teacher_model,
            http=http_options(args, "teacher"),
            device=args.device,
            dtype=getattr(args, "dtype", "float32"),
        )
    except ValueError as err:  # bad options, a weightless teacher dir, mismatched tokenizers
        raise SystemExit(f"error: {err}") from err
    return teacher.backend


# relaypipe.relay.decoder.MODES, spelled out so that building the parser imports no torch
# (tests/test_serve.py checks the two agree)
MODES = ("relay", "student", "teacher", "random_router", "fixed_help")

LIMITS_HELP = """\
limits: every option below that bounds a request's work is a ceiling. A request may ask
for less, never more (asking more is a 400 naming the field), and a field a request leaves
out or sends as null means the operator's value, never "unbounded".
  --max-tokens N          cap on a request's max_tokens (absent: min(16, N), OpenAI's default)
  --max-prompt-tokens N   tokens per prompt;   --max-prompts N   prompts per request
  --max-body-bytes N      request body size (larger: 413)
relay mode (a request's "relay": {...} options):
  --max-teacher-tokens N  teacher tokens per prompt (relay.max_teacher_tokens)
  --max-calls N           calls per prompt (relay.max_calls)
  --max-call-tokens N     tokens one call may borrow (relay.max_call_tokens)
  --max-turns N           student rounds per prompt (relay.max_turns)
  Left out, each of these four is what the student's relay.json recorded (the bounds it was
  trained under), else the decoder's default (none, none, 64, 32); "none" lifts a budget.
  --allowed-modes M ...   the modes a request may choose (relay.mode; default: all)
  In modes teacher and random_router, where the student makes no calls, the teacher budgets
  also lower the request's max_tokens (each teacher token and each hand-off takes one token).
  --relay-mode (within --allowed-modes), --router-p, --fixed-n, --seed and --call-bias
  are defaults a request may change (relay.call_bias: a number, Infinity or -Infinity;
  left out, the student's call_bias.json from 'relaypipe calibrate', else 0).
prompts (relay mode): with --frame-prompts (the default when the student has a relay.json,
or with --chat-template/--no-chat-template) a string prompt is a question, framed as the
student was trained (Q:/A:, or its chat template); token-id prompts are sent as they are.
Bad requests (wrong types, out-of-range numbers, unknown fields, non-JSON) get an
OpenAI-style JSON 4xx: {"error": {"message", "type", "param", "code"}}.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="serve a model or the relay over an OpenAI-compatible API",
        description="Serve a model (--model) or the relay system (--student) over an\n"
        "OpenAI-compatible /v1/completions API.",
        epilog=LIMITS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    positive, non_negative = int_at_least(1), int_at_least(0)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="mode 'model': serve this model directory (or hub id)")
    p.add_argument("--name", help="the served model id (default: the directory, or 'relay')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default="RELAYPIPE_API_KEY", help="env var with the key")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--max-body-bytes", type=positive, default=1 << 20, help="largest request body (413)"
    )
    p.add_argument(
        "--max-prompt-tokens", type=positive, default=8192, help="cap on tokens per prompt"
    )
    p.add_argument("--max-prompts", type=positive, default=64, help="cap on prompts in one request")
    p.add_argument(
        "--max-tokens",
        "--max-tokens-cap",
        dest="max_tokens_cap",
        type=positive,
        default=4096,
        help="cap on a request's max_tokens (absent in a request: min(16, this))",
    )
    p.add_argument("--max-batch", type=positive, default=16, help="micro-batch size (model mode)")
    p.add_argument(
        "--cache-slots",
        type=non_negative,
        default=64,
        help="prefix-cache slots: >= concurrent relay requests",
    )

    relay = p.add_argument_group("relay mode (--student DIR or --student-url URL)")
    add_student_arguments(relay, required=False, choice=what)
    add_teacher_arguments(relay, required=False)
    relay.add_argument(
        "--relay-mode", choices=MODES, default="relay", help="the mode of requests that name none"
    )
    relay.add_argument(
        "--allowed-modes",
        nargs="+",
        choices=MODES,
        default=None,
        metavar="MODE",
        help=f"modes a request may ask for (default: all of {', '.join(MODES)})",
    )
    add_bound_arguments(relay, caps=True, int_type=positive)
    relay.add_argument(
        "--frame-prompts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="frame each string prompt as a question in the student's prompt format "
        "(default: on when the student has a relay.json or --(no-)chat-template is given, "
        "else off)",
    )
    add_prompt_arguments(relay)
    relay.add_argument("--router-p", type=probability, default=0.1, help="random_router default")
    relay.add_argument("--fixed-n", type=positive, default=8, help="fixed_help default")
    relay.add_argument("--seed", type=non_negative, default=0, help="seed of unseeded requests")
    add_call_bias_argument(relay, server=True)
    return p


def build_app(args: argparse.Namespace) -> Starlette:
    """The app ``args`` describe (loads the models); separate from :func:`run` for tests."""
    from relaypipe.relay.decoder import RelayConfig, RelayDecoder
    from relaypipe.serve import RelayEngine, ServeLimits, build_model_engine, make_app

    try:
        limits = ServeLimits(
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens_cap,
            max_prompts=getattr(args, "max_prompts", 64),
            max_batch=args.max_batch,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.model:
        if args.teacher or args.teacher_url:
            raise SystemExit("error: --teacher/--teacher-url belong to relay mode (--student)")
        if args.student_model or args.student_tokenizer:
            raise SystemExit(
                "error: --student-model/--student-tokenizer belong to relay mode (--student-url)"
            )
        engine = build_model_engine(
            args.model,
            name=args.name,
            device=args.device,
            dtype=args.dtype,
            cache_slots=args.cache_slots,
            max_batch=args.max_batch,
        )
        return make_app(engine, api_key=api_key, limits=limits)

    if not (args.teacher or args.teacher_url):
        raise SystemExit("error: relay mode needs --teacher or --teacher-url")
    folder = student_folder(args)  # the flags fit together before anything is loaded
    decoding = _relay_decoding(args, folder)
    allowed = getattr(args, "allowed_modes", None)
    if allowed is not None and args.relay_mode not in allowed:
        modes = " ".join(allowed)
        raise SystemExit(
            f"error: --relay-mode {args.relay_mode} is not among --allowed-modes {modes}"
        )
    try:
        config = RelayConfig(
            mode=args.relay_mode,
            **decoding.bounds.relay_kwargs(),
            router_p=args.router_p,
            fixed_n=args.fixed_n,
            seed=args.seed,
            call_bias=decoding.call_bias,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    student = build_student(args)
    tok = student.tokenizer
    teacher = build_teacher(args, tok)
    decoder = RelayDecoder(student.backend, teacher, tok, config)
    try:
        engine = RelayEngine(decoder, args.name or "relay", config, allowed_modes=allowed)
    except ValueError as err:  # a seed the decoder cannot scale, say
        raise SystemExit(f"error: {err}") from err
    frame = getattr(args, "frame_prompts", None)
    if frame is None:  # on for a recorded student, or when asked for a format
        frame = decoding.record is not None or (
            getattr(args, "chat_template", None) is not None
            or getattr(args, "chat_template_kwargs", None) is not None
        )
    framer = None
    if frame:
        from relaypipe.tasks.base import format_prompt

        kwargs = decoding.prompt.format_kwargs()

        def framer(text: str) -> str:
            return format_prompt(text, tok, **kwargs)

    card = {
        "bounds": decoding.bounds.relay_kwargs(),
        "bounds_from": decoding.bounds_from,
        "frame_prompts": bool(frame),
        "chat_template": decoding.prompt.chat_template,
        "chat_template_kwargs": dict(decoding.prompt.chat_template_kwargs),
        "prompt_from": decoding.prompt_from,
        **decoding.bias_json(),  # the default bias; a request's relay.call_bias replaces it
    }
    log.info(
        "relay: %s; string prompts %s",
        decoding.note(),
        "framed as questions" if frame else "sent as they are",
    )
    return make_app(engine, api_key=api_key, limits=limits, frame_prompt=framer, card=card)


def _relay_decoding(args: argparse.Namespace, folder: str) -> Any:
    """The caps, prompt format and default call bias: flags, else the student folder's
    relay.json (call_bias.json), else the defaults."""
    from relaypipe.calibrate import resolve_command

    if getattr(args, "frame_prompts", None) is False and (
        getattr(args, "chat_template", None) is not None
        or getattr(args, "chat_template_kwargs", None) is not None
    ):
        raise SystemExit(
            "error: --no-frame-prompts sends prompts as they are; drop --chat-template(-kwargs)"
        )
    try:
        return resolve_command(folder, args)
    except ValueError as err:  # a cap out of range, kwargs without a chat template
        raise SystemExit(f"error: {err}") from err


def run(args: argparse.Namespace) -> int:
    from relaypipe.serve import run_server

    app = build_app(args)
    if args.api_key_env and not os.environ.get(args.api_key_env):
        log.warning("%s is unset: the server accepts requests without a key", args.api_key_env)
    run_server(app, host=args.host, port=args.port)
    return 0
