"""``relaypipe serve``: the command-line face of :mod:`relaypipe.serve`.

    relaypipe serve --model data/models/teacher --name teacher            # one model
    relaypipe serve --student data/models/student --teacher data/models/teacher   # the relay
    relaypipe serve --student data/models/student \\
        --teacher-url http://gpu-box:8000/v1 --teacher-model Qwen/Qwen3-8B --teacher-format text

The API key is read from an environment variable (``--api-key-env``, default
``RELAYPIPE_API_KEY``) rather than a flag, so it never shows up in the process list; when
that variable is unset the server accepts every request, which is why it binds loopback by
default.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from starlette.applications import Starlette

from relaypipe.relay.decoder import MODES, RelayConfig

log = logging.getLogger(__name__)


def add_teacher_arguments(group: Any, *, required: bool) -> None:
    """The teacher options shared by ``decode`` and ``serve``: in-process or behind a URL."""
    teacher = group.add_mutually_exclusive_group(required=required)
    teacher.add_argument("--teacher", help="teacher model directory (in-process)")
    teacher.add_argument("--teacher-url", help="an OpenAI-compatible server for the teacher")
    group.add_argument("--teacher-model", help="model name at --teacher-url")
    group.add_argument("--teacher-format", choices=("tokens", "text"), default="tokens")
    group.add_argument("--teacher-api-key-env", default=None, help="env var with its key")
    group.add_argument("--teacher-timeout", type=float, default=60.0)
    group.add_argument("--teacher-retries", type=int, default=3)
    group.add_argument("--teacher-concurrency", type=int, default=8)
    group.add_argument("--on-teacher-failure", choices=("fail", "skip"), default="skip")


def build_teacher(args: argparse.Namespace, tok: Any) -> Any:
    """The teacher backend the arguments describe, through :func:`relaypipe.teacher.build_teacher`
    (the factory the stages use): checked against the server's model list when remote, against
    the student's tokenizer when in-process."""
    from relaypipe.teacher import HTTPOptions
    from relaypipe.teacher import build_teacher as teacher_factory

    if args.teacher_url and not args.teacher_model:
        raise SystemExit("error: --teacher-url needs --teacher-model")
    if args.teacher_model and not args.teacher_url:
        raise SystemExit("error: --teacher-model is only used with --teacher-url")
    try:
        http = HTTPOptions(
            prompt_format=args.teacher_format,
            api_key_env=args.teacher_api_key_env,
            timeout_s=args.teacher_timeout,
            max_retries=args.teacher_retries,
            concurrency=args.teacher_concurrency,
            on_failure=args.on_teacher_failure,
        )
        teacher = teacher_factory(
            args.teacher,
            tok,
            url=args.teacher_url,
            model_name=args.teacher_model,
            http=http,
            device=args.device,
            dtype=getattr(args, "dtype", "float32"),
        )
    except ValueError as err:  # bad options, a weightless teacher dir, mismatched tokenizers
        raise SystemExit(f"error: {err}") from err
    return teacher.backend


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand."""
    p = sub.add_parser("serve", help="serve a model or the relay over an OpenAI-compatible API")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="mode 'model': serve this model directory (or hub id)")
    what.add_argument("--student", help="mode 'relay': the student model directory")
    p.add_argument("--name", help="the served model id (default: the directory, or 'relay')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default="RELAYPIPE_API_KEY", help="env var with the key")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, default=8192)
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-batch", type=int, default=16, help="micro-batch size (model mode)")
    p.add_argument(
        "--cache-slots",
        type=int,
        default=64,
        help="prefix-cache slots: >= concurrent relay requests",
    )

    relay = p.add_argument_group("relay mode")
    add_teacher_arguments(relay, required=False)
    relay.add_argument("--relay-mode", choices=MODES, default="relay")
    relay.add_argument("--max-turns", type=int, default=32)
    relay.add_argument("--max-call-tokens", type=int, default=64)
    relay.add_argument("--max-teacher-tokens", type=int, default=None)
    relay.add_argument("--max-calls", type=int, default=None)
    relay.add_argument("--router-p", type=float, default=0.1)
    relay.add_argument("--fixed-n", type=int, default=8)
    relay.add_argument("--seed", type=int, default=0)
    return p


def build_app(args: argparse.Namespace) -> Starlette:
    """The app ``args`` describe (loads the models); separate from :func:`run` for tests."""
    from relaypipe.models import load_model
    from relaypipe.relay.backends import TransformersBackend
    from relaypipe.relay.decoder import RelayDecoder
    from relaypipe.serve import RelayEngine, ServeLimits, build_model_engine, make_app

    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_cap,
        max_batch=args.max_batch,
    )
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.model:
        if args.teacher or args.teacher_url:
            raise SystemExit("error: --teacher/--teacher-url belong to relay mode (--student)")
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
    try:
        config = RelayConfig(
            mode=args.relay_mode,
            max_turns=args.max_turns,
            max_call_tokens=args.max_call_tokens,
            max_teacher_tokens=args.max_teacher_tokens,
            max_calls=args.max_calls,
            router_p=args.router_p,
            fixed_n=args.fixed_n,
            seed=args.seed,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    student, tok = load_model(args.student, device=args.device, dtype=args.dtype)
    teacher = build_teacher(args, tok)
    decoder = RelayDecoder(TransformersBackend(student, name="student"), teacher, tok, config)
    engine = RelayEngine(decoder, args.name or "relay", config)
    return make_app(engine, api_key=api_key, limits=limits)


def run(args: argparse.Namespace) -> int:
    from relaypipe.serve import run_server

    app = build_app(args)
    if args.api_key_env and not os.environ.get(args.api_key_env):
        log.warning("%s is unset: the server accepts requests without a key", args.api_key_env)
    run_server(app, host=args.host, port=args.port)
    return 0
