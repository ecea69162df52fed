"""A model behind an OpenAI-compatible URL, as stages and command lines name it.

A teacher (:mod:`relaypipe.teacher`) or a student (:mod:`relaypipe.student`) can live behind a
``/v1/completions`` server (vLLM, SGLang, llama.cpp's server, ``relaypipe serve --model``).
Both sides name it the same way, a :class:`ModelServer` (``url``, ``model``, ``http``,
``params``), and both are reached through :func:`connect`: an
:class:`~relaypipe.relay.http_backend.HTTPBackend` in the side's ``role`` (named in its errors),
checked against the server's model list before any decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["HTTPOptions", "ModelServer", "connect", "validate_server_options"]


@dataclass(frozen=True)
class HTTPOptions:
    """How to talk to a served model (see :class:`relaypipe.relay.http_backend.HTTPBackend`)."""

    prompt_format: str = "tokens"  # tokens: ids in/out (same tokenizer); text: re-tokenized
    api_key_env: str | None = "RELAYPIPE_TEACHER_API_KEY"  # env var holding the key, if any
    timeout_s: float = 120.0
    max_retries: int = 3
    concurrency: int = 32
    # "fail" by default in a pipeline: a run whose teacher silently dropped out (skip) would
    # be recorded as a relay result while being partly teacher-free.
    on_failure: str = "fail"
    check: bool = True  # list the server's models at start-up (fails fast on a wrong URL/name)

    def __post_init__(self) -> None:
        if self.prompt_format not in ("tokens", "text"):
            raise ValueError(f"prompt_format must be tokens or text, got {self.prompt_format!r}")
        if self.on_failure not in ("fail", "skip"):
            raise ValueError(f"on_failure must be fail or skip, got {self.on_failure!r}")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.concurrency < 1:
            raise ValueError("need timeout_s > 0, max_retries >= 0 and concurrency >= 1")


@dataclass(frozen=True)
class ModelServer:
    """A model served at an OpenAI-compatible ``/v1/completions`` URL."""

    url: str  # e.g. http://gpu-box:8000/v1
    model: str  # the model name the server serves (checked at start-up unless http.check: false)
    http: HTTPOptions = field(default_factory=HTTPOptions)
    # its parameter count, where a stage needs it (evaluate: the report's FLOPs and cost cannot
    # read it from weights behind a server); others ignore it
    params: int | None = None

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise ValueError("url is empty (an OpenAI-compatible server, e.g. http://host:8000/v1)")
        if not self.model.strip():
            raise ValueError("model is empty (the model name the server serves)")
        if self.params is not None and self.params < 1:
            raise ValueError(f"params must be >= 1 or null, got {self.params}")

    @property
    def where(self) -> str:
        return f"{self.model} at {self.url}"


def validate_server_options(url: str | None, model: str | None, role: str = "teacher") -> None:
    """A URL needs a model name and vice versa (``role``: the side, naming its options)."""
    if url and not model:
        raise ValueError(f"{role}_url needs {role}_model (the model name the server serves)")
    if model and not url:
        raise ValueError(f"{role}_model is only used with {role}_url; set both or neither")


def connect(url: str, model: str, tokenizer: Any, http: HTTPOptions, role: str) -> Any:
    """The :class:`~relaypipe.relay.http_backend.HTTPBackend` of ``role`` at ``url``, checked
    against the server's model list unless ``http.check`` is false (closed if that fails)."""
    from relaypipe.relay.http_backend import HTTPBackend

    backend = HTTPBackend(
        url,
        model,
        tokenizer,
        prompt_format=http.prompt_format,  # type: ignore[arg-type]
        api_key_env=http.api_key_env,
        timeout_s=http.timeout_s,
        max_retries=http.max_retries,
        concurrency=http.concurrency,
        on_failure=http.on_failure,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
    )
    try:
        if http.check:
            backend.check()
    except BaseException:
        backend.close()
        raise
    log.info("%s: %s at %s (%s prompts)", role, model, url, http.prompt_format)
    return backend
