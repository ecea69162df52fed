"""One factory for the teacher every stage uses: in-process weights or a server at a URL.

Stages that decode with the teacher (filter, sft's check, grpo, evaluate) name it the same way,
as one nested section of their ``params.yaml`` section (:class:`TeacherSpec`)::

    teacher:
      path: data/models/teacher          # a model directory (in-process), the default
      server: null                       # or a served teacher (:class:`TeacherServer`), e.g.
    # server: {url: http://gpu-box:8000/v1, model: Qwen/Qwen3-8B, http: {timeout_s: 300},
    #          params: 8200000000}

and the bootstrap stage, which makes the teacher folder, names a served teacher with the same
:class:`TeacherServer` (``bootstrap.teacher_server``). The old flat keys (``teacher_url``,
``teacher_model``, ``teacher_http``, evaluate's ``teacher_params``) are refused with the key they
moved to (:data:`MOVED_TEACHER_KEYS`, read by :func:`relaypipe.config.build`).

With a ``server`` (the paper preset: Qwen3-8B behind vLLM), ``path`` still names a directory,
but only its tokenizer is used: the relay exchanges token ids, so the prompt must be
tokenized exactly as the server's model expects (the bootstrap stage writes that directory).
What cannot work over HTTP fails here, before any work: the ``disagreement`` warm-up policy
needs the teacher's logits at every position, which a completions API does not return.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from relaypipe.relay.backends import Backend
from relaypipe.remote import HTTPOptions, ModelServer, connect, validate_server_options

log = logging.getLogger(__name__)

__all__ = [
    "MOVED_TEACHER_KEYS",
    "REMOTE_TEACHER_RECORD",
    "HTTPOptions",
    "Teacher",
    "TeacherServer",
    "TeacherSpec",
    "build_teacher",
    "check_same_tokenizer",
    "validate_teacher_options",
    "write_remote_teacher_dir",
]

# Written by the bootstrap stage into a teacher directory that stands for a served model.
REMOTE_TEACHER_RECORD = "remote_teacher.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class TeacherServer(ModelServer):
    """A teacher served at an OpenAI-compatible ``/v1/completions`` URL (vLLM, ``relaypipe
    serve --model``), as every stage names it (fields: :class:`~relaypipe.remote.ModelServer`;
    ``params``: the evaluate stage needs it, bootstrap records it in bootstrap.json)."""


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher a stage decodes with: a model directory, or a served model (``server``)
    whose tokenizer the directory holds."""

    path: str = "data/models/teacher"  # weights, or (with server) the served model's tokenizer
    server: TeacherServer | None = None  # None: the weights in path, in-process

    # relaypipe.config.build: a plain string is the old ``teacher: <folder>`` form
    SCALAR_HINT: ClassVar[str] = (
        "the teacher is a mapping now: its folder moved to {where}.path "
        "(write `teacher: {{path: {value}}}`), a served one to {where}.server"
    )

    @property
    def remote(self) -> bool:
        return self.server is not None

    def build(self, tokenizer: Any = None, *, device: str = "auto", dtype: str = "auto") -> Teacher:
        """The ready teacher (:func:`build_teacher`)."""
        server = self.server
        return build_teacher(
            self.path,
            tokenizer,
            url=server.url if server else None,
            model_name=server.model if server else None,
            http=server.http if server else None,
            device=device,
            dtype=dtype,
        )


# The flat keys every teacher-using stage had, and where they live now (relaypipe.config.build
# refuses them with this pointer); bootstrap's served teacher is its own ``teacher_server``.
MOVED_TEACHER_KEYS = {
    "teacher_url": "teacher.server.url",
    "teacher_model": "teacher.server.model",
    "teacher_http": "teacher.server.http",
    "teacher_params": "teacher.server.params",
}


def validate_teacher_options(url: str | None, model: str | None) -> None:
    """For a stage's ``__post_init__``: a URL needs a model name and vice versa."""
    validate_server_options(url, model, "teacher")


@dataclass
class Teacher:
    """A ready teacher: the backend the decoder calls, and what else a stage may need."""

    backend: Backend
    tokenizer: Any  # the tokenizer whose ids the backend speaks (frames the prompts)
    model: Any | None = None  # the in-process model (None behind a URL)
    where: str = ""  # for logs and metrics: the directory or the URL and model
    _owned: list[Any] = field(default_factory=list, repr=False)

    @property
    def remote(self) -> bool:
        return self.model is None

    def close(self) -> None:
        """Release the HTTP client and its threads (a no-op in-process)."""
        for item in self._owned:
            item.close()
        self._owned.clear()

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_same_tokenizer(student_tok: Any, teacher_tok: Any, what: str = "teacher") -> None:
    """In-process relay hands token ids between the models: their vocabularies must agree."""
    if student_tok is teacher_tok:
        return
    if len(student_tok) != len(teacher_tok) or student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            f"the student's and the {what}'s tokenizers differ ({len(student_tok)} vs "
            f"{len(teacher_tok)} tokens): the relay exchanges token ids, so both models must "
            "share one tokenizer (serve a different-tokenizer teacher at a URL with "
            "teacher.server.http.prompt_format: text instead)"
        )


def _has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def write_remote_teacher_dir(
    out_dir: str | Path, tokenizer: Any, url: str, model: str, *, atomic: bool = True
) -> None:
    """A teacher directory standing for a served model: the tokenizer the relay speaks to it
    in, and ``remote_teacher.json`` naming the server (for the record; stages still need
    ``teacher.server``, so that no stage talks to a network it was not told about)."""
    from relaypipe.io import atomic_path, write_json

    def fill(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        write_json(folder / REMOTE_TEACHER_RECORD, {"url": url, "model": model})

    if atomic:
        with atomic_path(out_dir, directory=True) as tmp:
            fill(tmp)
    else:
        fill(Path(out_dir))


def build_teacher(
    path: str | None,
    tokenizer: Any = None,
    *,
    url: str | None = None,
    model_name: str | None = None,
    http: HTTPOptions | None = None,
    device: str = "auto",
    dtype: str = "auto",
    name: str = "teacher",
) -> Teacher:
    """The teacher the options describe.

    In-process (no ``url``): loads ``path`` with :func:`relaypipe.models.load_model` on
    ``device`` in ``dtype`` (``auto``: as saved; the stage's ``dtype``); when a ``tokenizer``
    (the student's) is given, it must match the teacher's (token ids are shared).
    Behind a URL (``dtype`` unused: the server chose its own): an
    :class:`~relaypipe.relay.http_backend.HTTPBackend` for ``model_name`` speaking
    ``tokenizer``, or, when none is given, the tokenizer saved in ``path``; checked against the
    server's model list unless ``http.check`` is false.
    """
    validate_teacher_options(url, model_name)
    from relaypipe.models import load_model, load_tokenizer
    from relaypipe.relay.transformers_backend import TransformersBackend

    if url:
        if tokenizer is None:
            if path is None:
                raise ValueError("a URL teacher needs a tokenizer or a directory holding one")
            tokenizer = load_tokenizer(path)
        backend = connect(url, model_name or "", tokenizer, http or HTTPOptions(), "teacher")
        return Teacher(backend, tokenizer, None, f"{model_name} at {url}", [backend])

    if path is None:
        raise ValueError("no teacher: give a model directory (teacher.path) or a server URL")
    folder = Path(path)
    record = folder / REMOTE_TEACHER_RECORD
    if folder.is_dir() and record.is_file() and not _has_weights(folder):
        served = json.loads(record.read_text())
        raise ValueError(
            f"{path} stands for a served teacher ({served.get('model')} at {served.get('url')}) "
            "and holds no weights: set teacher.server (url and model) in this stage's params "
            "(on the command line: --teacher-url and --teacher-model)"
        )
    model, own_tok = load_model(path, device=device, dtype=dtype)
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, own_tok)
    return Teacher(TransformersBackend(model, name=name), tokenizer or own_tok, model, str(path))
