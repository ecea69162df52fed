"""One factory for a student: in-process weights or a server at a URL.

The relay student usually runs in-process, but it can live behind an OpenAI-compatible
``/v1/completions`` server as the teacher can (vLLM, SGLang, ``relaypipe serve --model``;
see :mod:`relaypipe.relay.http_backend` for what such a server must do: take token-id prompts,
honour ``stop_token_ids`` and return the generated ids). A served student is a
:class:`StudentServer` (the fields of :class:`~relaypipe.remote.ModelServer`), and its
tokenizer still comes from a local folder: the relay exchanges token ids, and the decoder
finds the student's commands by the ids of ``<call>``/``</call>``, so that folder must hold
the tokenizer the served model was trained with, call tokens included (the student's own
model folder does). A tokenizer without them is refused rather than extended: ids added
here would mean nothing to the served model.

What differs from a served teacher: the student speaks token ids only (its view holds its
own commands, which as special tokens no text carries), and its failure is never skipped
(nobody else can write its tokens), so ``http.prompt_format`` must be ``tokens`` and
``http.on_failure`` ``fail``; a failing student server raises
:class:`~relaypipe.relay.http_backend.TeacherUnavailable` with ``role == "student"`` and a
message that says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from relaypipe.remote import HTTPOptions, ModelServer, connect, validate_server_options
from relaypipe.teacher import Teacher

log = logging.getLogger(__name__)

__all__ = [
    "STUDENT_API_KEY_ENV",
    "Student",
    "StudentServer",
    "build_student",
    "check_student_http",
    "load_served_tokenizer",
]

STUDENT_API_KEY_ENV = "RELAYPIPE_STUDENT_API_KEY"


def student_http(**kw: Any) -> HTTPOptions:
    """:class:`HTTPOptions` with a student's defaults (its own API key variable)."""
    return HTTPOptions(**{"api_key_env": STUDENT_API_KEY_ENV, **kw})


def check_student_http(http: HTTPOptions, where: str = "http") -> None:
    """Refuse HTTP options a student cannot work under (module docstring)."""
    if http.prompt_format != "tokens":
        raise ValueError(
            f"{where}.prompt_format must be tokens for a student: its view holds its own "
            "<call> commands, special tokens that a text prompt would drop"
        )
    if http.on_failure != "fail":
        raise ValueError(
            f"{where}.on_failure must be fail for a student: nobody else can write its tokens "
            "when its server fails"
        )


@dataclass(frozen=True)
class StudentServer(ModelServer):
    """A student served at an OpenAI-compatible URL (fields: :class:`ModelServer`; ``http``
    defaults to the key in ``RELAYPIPE_STUDENT_API_KEY``; ``params``: the evaluate stage needs
    it for the report's FLOPs and cost)."""

    http: HTTPOptions = field(default_factory=student_http)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_student_http(self.http)


class Student(Teacher):
    """A ready student: the backend the decoder calls, its tokenizer, the in-process model
    (None behind a URL), and where it is (for logs and records); ``close()`` releases an
    HTTP client. The same record as :class:`~relaypipe.teacher.Teacher`."""


def load_served_tokenizer(path: str, what: str = "the student's tokenizer folder") -> Any:
    """The tokenizer in ``path`` for a served student: it must know ``<call>``/``</call>``
    already (a ValueError naming ``what`` otherwise)."""
    from transformers import AutoTokenizer

    from relaypipe.models import add_call_tokens
    from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"{what} {path!r} holds no tokenizer ({str(err).rstrip('. ')}): a served student "
            "is spoken to in token ids, so it needs its own tokenizer saved locally (the "
            "student's model folder has it)"
        ) from err
    missing = [t for t in (CALL_OPEN, CALL_CLOSE) if t not in tok.get_vocab()]
    if missing:
        raise ValueError(
            f"{what} {path!r} has no {'/'.join(missing)} token: a served student writes "
            "<call>n</call> commands as single tokens, so its tokenizer must already have "
            "them (use the student's own folder, as a relaypipe training stage saved it)"
        )
    add_call_tokens(tok)  # adds nothing now; sets the pad token as load_model does
    return tok


def build_student(
    path: str | None,
    *,
    url: str | None = None,
    model_name: str | None = None,
    http: HTTPOptions | None = None,
    device: str = "auto",
    dtype: str = "auto",
    name: str = "student",
    what: str = "the student's tokenizer folder",
) -> Student:
    """The student the options describe.

    In-process (no ``url``): loads ``path`` with :func:`relaypipe.models.load_model`. Behind a
    URL: an :class:`~relaypipe.relay.http_backend.HTTPBackend` in the student role for
    ``model_name``, speaking the tokenizer saved in ``path`` (:func:`load_served_tokenizer`;
    ``what`` names that folder in its errors), checked against the server's model list unless
    ``http.check`` is false.
    """
    validate_server_options(url, model_name, "student")
    if url:
        opts = http or student_http()
        check_student_http(opts)
        if path is None:
            raise ValueError(
                "a served student needs a local folder with its tokenizer (call tokens "
                "included); none was given"
            )
        tokenizer = load_served_tokenizer(path, what)
        backend = connect(url, model_name or "", tokenizer, opts, "student")
        return Student(backend, tokenizer, None, f"{model_name} at {url}", [backend])

    from relaypipe.models import load_model
    from relaypipe.relay.transformers_backend import TransformersBackend

    if path is None:
        raise ValueError("no student: give a model directory or a server URL")
    model, tok = load_model(path, device=device, dtype=dtype)
    return Student(TransformersBackend(model, name=name), tok, model, str(path))
